"""A diffusers WanTransformer3DModel, unchanged: plain torch.compile against backend="compact".

    python examples/wan_compact.py              # tiny config, random weights, CPU (under a minute)
    python examples/wan_compact.py --size 1.3b  # the Wan2.1-1.3B config at 480p 81 frames, GPU

Each model runs a short denoising loop (decreasing timesteps, as a sampler calls it): with no options
the compact backend keeps the first 4 steps dense (its default warm-up) and the window plan after.
Prints the time of a generation and of its last step (past the warm-up) for both compiled models, the
share of attention work the compact one skips in its sparse steps, and how far its output is
from dense there. The compile itself needs no import of compact_compile
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
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per generation (the default warm-up: the first 4 dense)")
    ap.add_argument("--runs", type=int, default=2, help="timed generations after the compiling one (median)")
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
    timesteps = torch.linspace(1000, 1000 / args.steps, args.steps, device=device)   # one per step, decreasing
    text = torch.randn(1, text_len, config["text_dim"], device=device, dtype=dtype)

    dense = torch.compile(model)                                            # Inductor, dense attention
    compact = torch.compile(model, backend="compact", options={"plan": args.plan})
    models = {"dense": dense, "compact": compact}

    def generation(m):
        """Per step: its output and seconds (the same latent each step: timing, not sampling)."""
        return [timed(lambda: m(x, t[None], text, return_dict=False)[0], sync) for t in timesteps]

    with torch.no_grad():
        first = {name: timed(lambda m=m: generation(m), sync)[1] for name, m in models.items()}   # compiles
        runs = {name: [] for name in models}
        for _ in range(args.runs):   # interleaved: a busy machine slows both alike
            for name, m in models.items():
                runs[name].append(generation(m))
    last = args.steps - 1                                                    # a step past the warm-up
    (ref, _), (out, _) = runs["dense"][-1][last], runs["compact"][-1][last]
    whole = {name: statistics.median(sum(s for _, s in run) for run in r) for name, r in runs.items()}
    step = {name: statistics.median(run[last][1] for run in r) for name, r in runs.items()}

    import compact_compile
    report = compact_compile.report()
    sites = [s for s in report.sites if s["rewritten"]]
    warmup = max((s.get("dense_steps") or 0 for s in sites), default=0)    # the plan's, or the default's
    skipped = report.skipped_work()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

    print(f"Wan {args.size}, latent {tuple(latent)}, {device} {str(dtype).removeprefix('torch.')}, plan {args.plan!r}")
    print(f"  first generation       dense {first['dense']:6.1f} s    compact {first['compact']:6.1f} s   "
          f"(compiles)")
    print(f"  a generation           dense {whole['dense'] * 1e3:7.1f} ms  compact {whole['compact'] * 1e3:7.1f} ms  "
          f"speed-up {whole['dense'] / whole['compact']:.2f}x   ({args.steps} steps, the first "
          f"{min(warmup, args.steps)} dense in compact's warm-up; median of {args.runs})")
    if warmup >= args.steps:
        print(f"  (every step is in the warm-up: give --steps above {warmup} to time a sparse step)")
    print(f"  the last step          dense {step['dense'] * 1e3:7.1f} ms  compact {step['compact'] * 1e3:7.1f} ms  "
          f"speed-up {step['dense'] / step['compact']:.2f}x")
    print(f"  attention work         {skipped:.1%} skipped at those steps in the {len(sites)} video self-attention "
          f"sites (cross-attention stays dense)")
    closeness = ("below" if rel < BF16_ROUNDING else f"{rel / BF16_ROUNDING:.1f}x")
    print(f"  output vs dense        relative L2 difference {rel:.1e} at the last step: {closeness} the change from "
          f"rounding the output to bf16 (~{BF16_ROUNDING:.0e}).")
    print("  With random weights attention is spread evenly, so this shows the path works, not how a trained "
          "model's\n  videos change: for that see benchmarks/fidelity.py (PSNR/SSIM on a trained video DiT).")
    if device == "cpu":
        print("  On a CPU at this size the times say little (they move with the machine's load, and attention is "
              "a small\n  share of the work): the speed-up that matters is a GPU's at real size (BENCHMARKS.md: "
              "2.5-3x a sparse step\n  on an H200; try --size 1.3b).")


if __name__ == "__main__":
    main()
