"""One launch each of every block-sparse kernel that runs here (FA4 where installed, our Triton
kernel at its autotuned best for the shape, chosen first, and FlexAttention) at the Wan2.1-1.3B 480p
shape, 90% window sparsity, bf16: the workload for Nsight Compute.

    ncu --kernel-name regex:"_attn_fwd|flex|cutlass" --launch-skip-before-match 0 --section SpeedOfLight \
        --section WarpStateStats python benchmarks/ncu_kernels.py
Warm-up and autotuning run before the profiled region; only the launches inside it are marked
(NVTX range "profiled"), so `--nvtx --nvtx-include profiled/` limits ncu to them.
"""
import torch
import triton

from bench_kernels import BLOCK, kernels_for, make_blocks
from compact_compile.kernels.triton_sparse import chosen_config
from timing import available_kernels

B, H, S, D = 1, 12, 32760, 128
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
nb = triton.cdiv(S, BLOCK)
blocks = make_blocks("window", H, nb, 0.9, gen)
kernels = kernels_for(available_kernels(torch.bfloat16, D, BLOCK), H, S, blocks)
for _ in range(3):
    for attend in kernels.values():
        attend(q, k, v)
torch.cuda.synchronize()
if "triton" in kernels:
    print("ours:", chosen_config(), flush=True)
torch.cuda.nvtx.range_push("profiled")
for attend in kernels.values():
    attend(q, k, v)
torch.cuda.synchronize()
torch.cuda.nvtx.range_pop()
