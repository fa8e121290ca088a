"""Inductor's row reductions at Wan2.1-14B 720p's widths (75,600 tokens; model 5,120, FFN 13,824), as
the FP8-linear graph has them: a row's reduction feeds the same row's output, so a kernel that keeps the
row in registers (Inductor's persistent reduction) reads it once, where the looped one Inductor picks
above 1,024 columns reads it once per loop and recomputes what feeds it (the GELU) in each.

  * gelu:            FFN GELU (tanh) alone, bf16 out (the dense model's kernel);
  * quant:           the per-row amax and e4m3 quantization alone (torchao's row-wise FP8);
  * gelu-quant:      both, as the FP8 graph fuses them;
  * ln-mod-quant:    LayerNorm, AdaLN modulation and the same quantization;
  * rmsnorm-rope:    RMSNorm over the heads and rotary embedding (q or k of self-attention).
Each compiled as Inductor does by default (looped) and with a choices handler that makes inner
reductions up to 16,384 wide persistent (the RMSNorm's is not an inner reduction to Inductor, and stays
looped), and with --tuned both again with Inductor's coordinate-descent tuning; GB/s over the bytes each
must move. Writes $OUT/wide-reductions.json and each variant's generated code to $OUT/wide-reductions-code/.

    OUT=out python benchmarks/bench_wide_reductions.py [--tuned]

Inductor's caches are off: their keys do not include the choices handler, so a cached looped kernel
could stand in for the persistent one.
"""
import os
import re
import sys

import torch
import torch.nn.functional as F
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.utils import run_and_get_code
from torch._inductor.virtualized import V

from timing import Results, bench

S, DIM, FFN, HEADS = 75600, 5120, 13824, 40
E4M3_MAX = 448.0
results = Results("wide-reductions.json")


class PersistentWideRows(InductorChoices):
    """Inner reductions up to 16,384 wide persistent (Inductor's default limit is 1,024)."""

    @staticmethod
    def should_use_persistent_reduction(features, *args, **kwargs):
        if (features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, 16384)):
            return True
        return InductorChoices.should_use_persistent_reduction(features, *args, **kwargs)


CHOICES = [("inductor-default", InductorChoices()), ("persistent-wide-rows", PersistentWideRows())]


def quantize_rows(y):
    """torchao's row-wise arithmetic: a multiply by the reciprocal scale, not a division per element."""
    amax = y.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    return (y.float() * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), amax / E4M3_MAX


def gelu(h):
    return F.gelu(h, approximate="tanh")


def gelu_quant(h):
    return quantize_rows(gelu(h))


def quant(h):
    return quantize_rows(h)


def ln_mod_quant(x, shift, scale):
    y = F.layer_norm(x.float(), (DIM,), eps=1e-6) * (1 + scale) + shift
    return quantize_rows(y.to(x.dtype))


def rmsnorm_rope(x, weight, cos, sin):
    y = F.rms_norm(x.float(), (DIM,), weight, eps=1e-6).unflatten(-1, (HEADS, -1, 2))
    real, imag = y.unbind(-1)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], -1)
    return rotated.flatten(1).to(x.dtype)


def main():
    torch._inductor.config.force_disable_caches = True
    g = torch.Generator(device="cuda").manual_seed(0)
    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)
    angles = rnd(S, 1, DIM // HEADS // 2, dtype=torch.float32)
    h = rnd(S, FFN)
    cases = {"gelu": (gelu, (h,), S * FFN * 4), "quant": (quant, (h,), S * FFN * 3),
             "gelu-quant": (gelu_quant, (h,), S * FFN * 3),
             "ln-mod-quant": (ln_mod_quant, (rnd(S, DIM), rnd(DIM), rnd(DIM)), S * DIM * 3),
             "rmsnorm-rope": (rmsnorm_rope, (rnd(S, DIM), rnd(DIM), angles.cos(), angles.sin()), S * DIM * 4)}
    choices = [(name, handler, False) for name, handler in CHOICES]
    if "--tuned" in sys.argv:
        choices += [(name + "-coordinate-descent", handler, True) for name, handler in CHOICES]
    code_dir = os.path.join(os.environ.get("OUT", "."), "wide-reductions-code")
    os.makedirs(code_dir, exist_ok=True)
    for name, (fn, args, moved) in cases.items():
        first = None
        for choice, handler, tuned in choices:
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False)
            with V.set_choices_handler(handler), torch._inductor.config.patch(coordinate_descent_tuning=tuned):
                out, code = run_and_get_code(compiled, *args)
            with open(os.path.join(code_dir, f"{name}-{choice}.py"), "w") as f:
                f.write("\n".join(code))
            kernels = sorted(set(re.findall(r"def (triton_(?:red|per|poi)_\w+)\(", "\n".join(code))))
            ms = bench(lambda: compiled(*args))
            out = out if isinstance(out, torch.Tensor) else out[0]
            first = out if first is None else first
            results.emit(case=name, choice=choice, ms=ms, gb_per_s=moved / ms / 1e6, kernels=kernels,
                         max_abs_diff_vs_first=(out.float() - first.float()).abs().max().item())
    results.save(S=S, DIM=DIM, FFN=FFN, inductor_caches_disabled=True)


if __name__ == "__main__":
    main()
