"""Attention-level benchmark of the Flex path (issue 2), one GPU process, baseline in the same run.

Shape: Wan2.1-1.3B 480p 81 frames = grid (21, 30, 52) = 32760 tokens, B1 H12 D128 bf16.
  * SDPA default (cuDNN on H100) dense;
  * our FlexBlockSparse on tiled inputs, window plans (~50/75/90/95% sparsity) and random block maps
    at exactly those sparsities: ms, speedup, effective TFLOP/s = 4·B·H·S²·D·density / t;
  * the token reorder's cost inside a compiled attention site: the same small module (elementwise
    q/k producers like RoPE, SDPA, output transpose) compiled with backend="compact", minus the same
    module calling our op on untiled tokens (no gathers).
Writes $OUT/attention.json.
"""
import sys

import torch
import torch.nn.functional as F
import triton

from compact_compile.kernels.flex import FlexBlockSparse
from compact_compile.kernels.ops import register_site
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import density, window_blocks
from timing import Results, bench

GRID, H, D, B = (21, 30, 52), 12, 128, 1
S = GRID[0] * GRID[1] * GRID[2]
dev, dt = "cuda", torch.bfloat16
flops = 4 * B * H * S * S * D
results = Results("attention.json")
emit = results.emit


def closest_window(layout, target):
    odd = range(1, 16, 2)
    cands = [(abs(density(window_blocks(layout, (t, h, h))) - target), (t, h, h)) for t in odd[:5] for h in odd]
    return min(cands)[1]


def main():
    torch.manual_seed(0)
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    layout = TokenLayout(GRID, auto_tile(GRID, 128), 128)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3))
    sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    emit(impl="sdpa-default", sparsity=0.0, ms=sdpa, tflops=flops / sdpa / 1e9)
    nb = layout.n_blocks
    for target in (0.5, 0.25, 0.10, 0.05):
        w = closest_window(layout, target)
        rnd = torch.rand(nb, nb) < target
        rnd.fill_diagonal_(True)
        for name, blocks in ((f"window{w}", window_blocks(layout, w)), ("random", rnd)):
            kern = FlexBlockSparse(blocks[None], S, 128)
            ms = bench(lambda: kern(q, k, v))
            dens = density(blocks)
            emit(impl=f"flex-{name}", sparsity=round(1 - dens, 4), ms=ms, speedup=sdpa / ms,
                 tflops_effective=flops * dens / ms / 1e9)
    reorder_cost(layout)
    results.save(shape=dict(B=B, H=H, S=S, D=D, grid=GRID, tile=layout.tile, dtype="bf16"))


class Site(torch.nn.Module):
    """What an attention site looks like to the compiler: q/k/v made by elementwise ops (RoPE-like),
    attention, output back to [B, S, H·D] for the output projection."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    @staticmethod
    def qkv(x, cos, sin):  # x [B, S, 3, H, D]
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
        return q * cos + q.flip(-1) * sin, k * cos + k.flip(-1) * sin, v

    def forward(self, x, cos, sin):
        return self.attend(*self.qkv(x, cos, sin)).transpose(1, 2).flatten(2)


def reorder_cost(layout):
    blocks = window_blocks(layout, (3, 3, 3))
    x = torch.randn(B, S, 3, H, D, device=dev, dtype=dt)
    cos, sin = torch.randn(S, D, device=dev, dtype=dt), torch.randn(S, D, device=dev, dtype=dt)
    handle = register_site(FlexBlockSparse(blocks[None], S, 128))
    untiled = torch.compile(Site(lambda q, k, v: torch.ops.compact.attention(q, k, v, handle, None, [])), dynamic=False)
    compact = torch.compile(Site(F.scaled_dot_product_attention), backend="compact", dynamic=False,
                            options=dict(plan="window", window=(3, 3, 3), grid=GRID))
    dense = torch.compile(Site(F.scaled_dot_product_attention), dynamic=False)
    with torch.no_grad():
        t_untiled, t_compact, t_dense = (bench(lambda m=m: m(x, cos, sin)) for m in (untiled, compact, dense))
        # the compact module must equal the kernel applied in tiled order, mapped back
        src = layout.source_index(dev)
        q, k, v = (t[:, :, src] for t in Site.qkv(x, cos, sin))
        want = torch.empty_like(q).index_copy_(2, src, FlexBlockSparse(blocks[None], S, 128)(q, k, v))
        want = want.transpose(1, 2).flatten(2).float()
        err = ((compact(x, cos, sin).float() - want).norm() / want.norm()).item()
    emit(impl="site-module", density=density(blocks), dense_inductor_ms=t_dense, compact_ms=t_compact,
         compact_without_reorder_ms=t_untiled, reorder_ms=t_compact - t_untiled,
         reorder_share_of_sparse_site=(t_compact - t_untiled) / t_compact, rel_err_vs_manual=err)


if __name__ == "__main__":
    sys.exit(main())
