"""A diffusers WanTransformer3DModel, unchanged, compiled with backend="compact".

    python examples/wan_compact.py              # tiny config, random weights, CPU (a minute)
    python examples/wan_compact.py --size 1.3b  # the Wan2.1-1.3B config at 480p 81 frames, GPU

Prints what the backend did with every attention site, and how far the sparse output is from dense.
No import of compact_compile is needed for the compile itself: the backend is an entry point.
"""
import argparse
import time

import torch
from diffusers import WanTransformer3DModel

SIZES = {
    "tiny": (dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
                  text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2, qk_norm="rms_norm_across_heads",
                  rope_max_seq_len=64), (1, 4, 9, 32, 40), 16),
    "1.3b": (dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024), (1, 16, 21, 60, 104), 512),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--plan", default="window", help='"window", "dense" or a plan file')
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config, latent, text_len = SIZES[args.size]
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(device, dtype).eval()
    x = torch.randn(latent, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    ctx = torch.randn(1, text_len, config["text_dim"], device=device, dtype=dtype)

    fast = torch.compile(model, backend="compact", options={"plan": args.plan})
    with torch.no_grad():
        dense = model(x, t, ctx, return_dict=False)[0]
        t0 = time.time()
        sparse = fast(x, t, ctx, return_dict=False)[0]
        print(f"compiled and ran in {time.time() - t0:.1f} s on {device}\n")

    import compact_compile  # only to read the report
    print(compact_compile.report())
    rel = ((sparse.float() - dense.float()).norm() / dense.float().norm()).item()
    print(f"\nrelative difference to dense attention (plan {args.plan!r}): {rel:.3e}")


if __name__ == "__main__":
    main()
