"""Row-wise e4m3 quantization of a linear's input (torchao's float8 dynamic activations, PerRow), with
the GELU before it fused in, at Wan2.1-14B 720p's widths (75,600 tokens; FFN 13,824, model 5,120):
compact_compile.kernels.quant_rows against the same arithmetic compiled by Inductor (how the FP8
graph runs it today: one looped reduction), each checked against the eager reference bit for bit.
GB/s over the bytes each must move (bf16 in, e4m3 and a scale a row out). Writes $OUT/quant-rows.json.

    OUT=out python benchmarks/bench_quant_rows.py
"""
import torch

from compact_compile.kernels.quant_rows import quant_rows_reference
from compact_compile.kernels.quant_rows_triton import quant_rows_triton
from compact_compile.quantize import FP8_AMAX_FLOOR
from timing import Results, bench

S = 75600
CASES = [("gelu_tanh", 13824), ("none", 5120), ("none", 13824)]
results = Results("quant-rows.json")


def main():
    torch.manual_seed(0)
    for prologue, n in CASES:
        h = torch.randn(S, n, device="cuda", dtype=torch.bfloat16) * 2
        ref8, ref_scale = quant_rows_reference(h, prologue, FP8_AMAX_FLOOR)
        gb = S * n * 3 / 1e9
        inductor = torch.compile(lambda x, p=prologue: quant_rows_reference(x, p, FP8_AMAX_FLOOR))
        candidates = {"inductor": lambda: inductor(h)}
        for warps in (4, 8, 16, 32):
            candidates[f"triton-{warps}-warps"] = lambda w=warps: quant_rows_triton(h, prologue, FP8_AMAX_FLOOR,
                                                                                    num_warps=w)
        for name, fn in candidates.items():
            x8, scale = fn()
            ms = bench(fn)
            results.emit(prologue=prologue, width=n, impl=name, ms=ms, gb_per_s=gb / ms * 1e3,
                         scales_equal=bool(torch.equal(scale, ref_scale)),
                         values_differing=int((x8.float() != ref8.float()).sum()),
                         max_diff_in_e4m3_steps=float(((x8.float() - ref8.float()).abs() /
                                                       ref8.float().abs().clamp(min=2 ** -6) * 8).max()))
        del h, ref8
    results.save(rows_tokens=S)


if __name__ == "__main__":
    main()
