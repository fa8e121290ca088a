"""One launch each of every block-sparse kernel that runs here (FA4 where installed, our Triton
kernel at its autotuned best for the shape, chosen first, and FlexAttention) at the Wan2.1-1.3B 480p
shape, 90% window sparsity, bf16: the workload for Nsight Compute. With --fp8, the FP8 kernels
instead (FA4's Hopper FP8 kernel and our Triton kernel's FP8 path) on e4m3 tiles quantized beforehand.

    ncu --kernel-name regex:"_attn_fwd|flex|cutlass" --launch-skip-before-match 0 --section SpeedOfLight \
        --section WarpStateStats python benchmarks/ncu_kernels.py [--fp8]
Warm-up and autotuning run before the profiled region; only the launches inside it are marked
(NVTX range "profiled"), so `--nvtx --nvtx-include profiled/` limits ncu to them.
"""
import argparse

import torch
import triton

from bench_kernels import BLOCK, kernels_for, make_blocks
from compact_compile.kernels.fp8 import quantize_tiles, smoothing_stats
from compact_compile.kernels.registry import FP8_KERNELS, kernel_class
from compact_compile.kernels.triton_sparse import chosen_config
from timing import available_kernels

B, H, S, D = 1, 12, 32760, 128


def fp8_kernels(names, blocks, q, k, v) -> dict:
    """{name: () -> O} of the FP8 kernels among `names` over tiles of q, k, v made once."""
    tiles = quantize_tiles(q, k, v, *smoothing_stats(k, v), BLOCK)
    runs = {}
    fp8_names = [n for n in names if n in FP8_KERNELS and not kernel_class(n).fp8_unsupported(D, BLOCK)]
    for name, sparse in kernels_for(fp8_names, H, S, blocks).items():
        runs[name] = lambda s=sparse: s.kernel.attend_fp8(tiles, s.prepared, None, q.dtype)
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp8", action="store_true")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    blocks = make_blocks("window", H, triton.cdiv(S, BLOCK), 0.9, gen)
    names = available_kernels(torch.bfloat16, D, BLOCK)
    if args.fp8:
        runs = fp8_kernels(names, blocks, q, k, v)
    else:
        runs = {name: lambda f=f: f(q, k, v) for name, f in kernels_for(names, H, S, blocks).items()}
    for _ in range(3):
        for run in runs.values():
            run()
    torch.cuda.synchronize()
    if "triton" in runs:
        print("ours:", chosen_config(), flush=True)
    torch.cuda.nvtx.range_push("profiled")
    for run in runs.values():
        run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main()
