"""Where rectification's pooling should run (issue 4), at the Wan2.1-1.3B 480p shape (B1 H12 S32760
D128 bf16, grid 21×30×52, 128-token blocks), or with `wan14b` as argument at Wan2.1-14B 720p's (H40,
S75600, grid 21×45×80).

  * pool:     our pooling kernel (pool_triton._pool_qkv, one launch) for a few slice widths and warp
              counts, as effective bandwidth over the bytes of q, k, v;
  * reorder:  the gather into tile order as Inductor compiles it, against our reorder that pools in
              the same pass (compact.tile_pool), from q, k, v in the model's [B, S, H, D] storage;
  * estimate: the static plan's estimate (estimate_triton.py), a few tilings, key shares and dot
              precisions, in GPU time per kernel (profiler: the host's launch overhead would
              dominate CUDA-event timing of so short a call);
  * select:   the dynamic plan's online choice and block lists (select_triton.py), a few tilings;
  * graph:    the producers of a Wan attention site as Inductor compiles them (RMSNorm over the
              heads, RoPE, the [B, S, H, D] → [B, H, S, D] view and the gather into tile order),
              alone, with our pooling kernel after them, and with the pooling written as torch ops
              in the same graph (rectified.block_pool), which Inductor may fuse into the producers.
Writes $OUT/pooling.json and $OUT/pooling_graph_code.py (Inductor's code for the fused graph).
"""
import os
import sys

import torch
import triton
from torch._inductor.utils import run_and_get_code

from compact_compile.kernels.estimate_triton import estimate_static_triton
from compact_compile.kernels.pool_triton import block_pool_qkv_triton, tile_pool_qkv_triton
from compact_compile.kernels.rectified import block_pool
from compact_compile.kernels.select_triton import select_blocks_triton
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import neighbour_blocks, window_blocks
from timing import SITES, Results, bench, kernel_times, matching

SITE = SITES[sys.argv[1] if len(sys.argv) > 1 else "wan1.3b"]
GRID, H = SITE["grid"], SITE["heads"]
D, BS = 128, 128
dev, dt = "cuda", torch.bfloat16
results = Results("pooling.json")
emit = results.emit


def rope(x, cos, sin):
    """diffusers' real-valued Wan RoPE: interleaved pairs (x1, x2) rotated by (cos, sin)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2).type_as(x)


def producers(xq, xk, xv, wq, wk, cos, sin, src):
    """q, k, v of a Wan self-attention site in tile order, from the projections' outputs [B, S, H·D]."""
    def norm(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w
    q = rope(norm(xq, wq).unflatten(-1, (H, D)), cos, sin)
    k = rope(norm(xk, wk).unflatten(-1, (H, D)), cos, sin)
    v = xv.unflatten(-1, (H, D))
    return [t.transpose(1, 2).index_select(-2, src) for t in (q, k, v)]


def main():
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    layout = TokenLayout(GRID, auto_tile(GRID, BS), BS)
    S = layout.seq_len
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dt, generator=g) for _ in range(3))
    qkv_bytes = 3 * q.numel() * q.element_size()

    for cols in (64, 128):
        for warps in (2, 4):
            ms = bench(lambda: block_pool_qkv_triton(q, k, v, S, BS, config=dict(COLS=cols, num_warps=warps)))
            emit(kind="pool", COLS=cols, num_warps=warps, ms=ms, TBps=qkv_bytes / ms / 1e9)

    # the reorder alone (Inductor's gathers) against the reorder that also pools (compact.tile_pool)
    src = layout.source_index(dev)
    model_order = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]   # [B, S, H, D] storage
    gathers = torch.compile(lambda q, k, v: [x.index_select(-2, src) for x in (q, k, v)])
    t_gather = bench(lambda: gathers(*model_order))
    for cols in (64, 128):
        for warps in (2, 4):
            cfg = dict(COLS=cols, num_warps=warps)
            ms = bench(lambda: tile_pool_qkv_triton(*model_order, src, S, BS, config=cfg))
            emit(kind="reorder", inductor_gather_ms=t_gather, tile_pool_ms=ms, **cfg,
                 tile_pool_TBps=2 * qkv_bytes / ms / 1e9, pooling_extra_ms=ms - t_gather)

    pools = block_pool_qkv_triton(q, k, v, S, BS)
    keep = window_blocks(layout, (3, 3, 3))[None].to(dev)   # ~91% sparse; the work does not depend on it
    for bq, keys, bn, stages, precision in (
            (16, 32, 32, 1, None), (16, 64, 32, 1, None), (16, 64, 16, 1, None), (16, 128, 16, 1, None),
            (16, 256, 16, 1, None), (16, 256, 16, 3, None), (32, 64, 16, 1, None), (32, 256, 16, 3, None),
            (64, 64, 16, 1, None), (16, 64, 16, 1, "tf32x3")):
        cfg = dict(BQ=bq, CH=32, KEYS=keys, BN=bn, num_warps=4, num_stages=stages)
        if precision:   # else the default for bf16 inputs (estimate_triton.dot_precision)
            cfg.update(precision=precision)
        try:
            times = kernel_times(lambda: estimate_static_triton(pools, k, keep, S, D ** -0.5, BS, config=cfg))
        except Exception as e:  # a tiling may not fit in shared memory
            emit(kind="estimate", **cfg, error=str(e)[:200])
            continue
        emit(kind="estimate", **cfg, gpu_us=matching(times, "_estimate_share", "_merge_shares"),
             kernels_us=times)

    static = neighbour_blocks(layout)[None].to(dev)   # the dynamic plan's static part
    for bq, warps in ((16, 4), (16, 8), (32, 8), (32, 16)):
        cfg = dict(BQ=bq, num_warps=warps)
        try:
            times = kernel_times(lambda: select_blocks_triton(pools[0], pools[2], k, static, S, D ** -0.5, BS, 0.05,
                                                              25, config=cfg))
        except Exception as e:  # a tiling may not fit
            emit(kind="select", **cfg, error=str(e)[:200])
            continue
        emit(kind="select", **cfg, gpu_us=matching(times, "_select_blocks"))

    # the producers of one site, compiled by Inductor, with and without pooling
    B1 = 1
    xq, xk, xv = (torch.randn(B1, S, H * D, device=dev, dtype=dt, generator=g) for _ in range(3))
    wq, wk = (1 + 0.1 * torch.randn(H * D, device=dev, dtype=dt, generator=g) for _ in range(2))
    angle = torch.rand(S, 1, D, device=dev, generator=g) * 6.28
    cos, sin = angle.cos(), angle.sin()
    args = (xq, xk, xv, wq, wk, cos, sin, src)

    def with_graph_pooling(*a):
        qt, kt, vt = producers(*a)
        (qm, qd), (km, kd), (vm, _) = (block_pool(t, S, BS) for t in (qt, kt, vt))
        return qt, kt, vt, qm, qd, km, kd, vm

    plain = torch.compile(producers)
    fused = torch.compile(with_graph_pooling)
    plain(*args)
    _, code = run_and_get_code(fused, *args)
    with open(os.path.join(os.environ.get("OUT", "."), "pooling_graph_code.py"), "w") as f:
        f.write("\n\n# ----- next file -----\n\n".join(code))
    qt, kt, vt, *graph_pools = fused(*args)
    ours = block_pool_qkv_triton(qt, kt, vt, S, BS)
    diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(graph_pools, ours))

    def then_kernel():
        qt, kt, vt = plain(*args)
        return block_pool_qkv_triton(qt, kt, vt, S, BS)

    t_plain, t_fused, t_kernel = bench(lambda: plain(*args)), bench(lambda: fused(*args)), bench(then_kernel)
    emit(kind="graph", producers_ms=t_plain, producers_then_pool_kernel_ms=t_kernel,
         producers_with_graph_pooling_ms=t_fused, pool_kernel_extra_ms=t_kernel - t_plain,
         graph_pooling_extra_ms=t_fused - t_plain, max_rel_diff_graph_vs_kernel=diff)

    results.save(shape=dict(B=1, H=H, S=S, D=D, grid=GRID, block=BS, dtype="bf16"))


if __name__ == "__main__":
    main()
