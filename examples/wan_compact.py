"""A diffusers WanTransformer3DModel, unchanged: plain torch.compile against backend="compact".

    python examples/wan_compact.py              # tiny config, random weights, CPU (under a minute)
    python examples/wan_compact.py --size 1.3b  # the Wan2.1-1.3B config at 480p 81 frames, GPU

Prints the time per call of both compiled models, the fraction of attention blocks the compact one
skips, and how far its output is from dense. The compile itself needs no import of compact_compile
(the backend is an entry point); it is imported at the end only to read the report.
"""
import argparse
import logging
import statistics
import time


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


# diffusers imports torchao (installed for the `quantize` option) on import, and three known false
# alarms follow; none concerns this example, which quantizes nothing. Each is dropped by its exact
# text, at its own logger, before the import: everything else still prints.
for logger, text in (
        ("torchao", "Failed to load"),   # optional kernels (mxfp8, sm90 cutlass) not built for this python/GPU
        ("torch.utils._pytree", "register_constant() on Enum subclasses is deprecated"),   # torchao on torch 2.13
        ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects")):
    logging.getLogger(logger).addFilter(_DropMessage(text))

import torch  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402

SIZES = {   # model config, latent shape [B, C, F, H, W], text tokens
    "tiny": (dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
                  text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2, qk_norm="rms_norm_across_heads",
                  rope_max_seq_len=64), (1, 4, 9, 32, 40), 16),
    "1.3b": (dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024), (1, 16, 21, 60, 104), 512),
}
BF16_ROUNDING = 4e-3   # relative L2 change of a tensor rounded to bfloat16 (8 mantissa bits)


def cast_like_from_pretrained(model, dtype):
    """What from_pretrained(torch_dtype=dtype) does: the modules diffusers keeps in float32 (norms,
    time embedding, RoPE) stay float32. `model.to(dtype)` would cast them too, and diffusers warns."""
    keep = set(model._keep_in_fp32_modules or [])
    for name, param in model.named_parameters():
        if not keep & set(name.split(".")):
            param.data = param.data.to(dtype)
    return model


def timed(fn, sync):
    """(fn(), seconds it took, GPU work included)."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--plan", default="window", help='"window", "dynamic", "dense" or a plan file')
    ap.add_argument("--calls", type=int, default=10, help="timed calls after the compiling one (median)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    config, latent, text_len = SIZES[args.size]
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(device).eval()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if dtype != torch.float32:
        cast_like_from_pretrained(model, dtype)
        # the time embedding stays float32, so its matmuls do: TF32 for them, as Inductor advises (and warns)
        torch.set_float32_matmul_precision("high")
    x = torch.randn(latent, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    text = torch.randn(1, text_len, config["text_dim"], device=device, dtype=dtype)

    dense = torch.compile(model)                                            # Inductor, dense attention
    compact = torch.compile(model, backend="compact", options={"plan": args.plan})
    calls = {"dense": lambda: dense(x, t, text, return_dict=False)[0],
             "compact": lambda: compact(x, t, text, return_dict=False)[0]}
    with torch.no_grad():
        first = {name: timed(call, sync) for name, call in calls.items()}      # each compiles here
        times = {name: [] for name in calls}
        for _ in range(args.calls):   # interleaved: a busy machine slows both alike
            for name, call in calls.items():
                times[name].append(timed(call, sync)[1])
    (ref, dense_first), (out, compact_first) = first["dense"], first["compact"]
    dense_t, compact_t = statistics.median(times["dense"]), statistics.median(times["compact"])

    import compact_compile
    sites = [s for s in compact_compile.report().sites if s["rewritten"]]
    skipped = 1 - sum(s["density"] for s in sites) / max(1, len(sites))
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

    print(f"Wan {args.size}, latent {tuple(latent)}, {device} {str(dtype).removeprefix('torch.')}, plan {args.plan!r}")
    print(f"  compile (first call)   dense {dense_first:6.1f} s    compact {compact_first:6.1f} s")
    print(f"  time per call          dense {dense_t * 1e3:6.1f} ms   compact {compact_t * 1e3:6.1f} ms   "
          f"speed-up {dense_t / compact_t:.2f}x   (median of {args.calls})")
    print(f"  attention blocks       {skipped:.1%} skipped in the {len(sites)} video self-attention sites "
          f"(cross-attention stays dense)")
    closeness = ("below" if rel < BF16_ROUNDING else f"{rel / BF16_ROUNDING:.1f}x")
    print(f"  output vs dense        relative L2 difference {rel:.1e}: {closeness} the change from rounding the "
          f"output to bf16 (~{BF16_ROUNDING:.0e}).")
    print("  With random weights attention is spread evenly, so this shows the path works, not how a trained "
          "model's\n  videos change: for that see benchmarks/fidelity.py (PSNR/SSIM on a trained video DiT).")
    if device == "cpu":
        print("  On a CPU at this size attention is a small share of the work and FlexAttention's CPU kernel is "
              "no faster\n  than dense: the speed-up is a GPU's at real size (BENCHMARKS.md: 2.5-3x on an H200; "
              "try --size 1.3b).")


if __name__ == "__main__":
    main()
