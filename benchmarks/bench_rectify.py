"""Rectification on the GPU (issue 4), one process, same inputs for every row.

Wan2.1-1.3B 480p shape (grid 21×30×52, B1 H12 S32760 D128, bf16, tokens already tiled):
  * cost: pooling + P̂ + selection + GAPR (estimate) and the R·O + Ō merge, as a share of the sparse
    attention time, for a static window plan (~75% and ~90% sparse) and for the dynamic plan, on
    FlexAttention and on our Triton kernel (R·O + Ō in its epilogue), against the same kernel without
    rectification; a static plan's estimate is one pooling pass over q, k, v then one Triton launch
    (pool_triton._estimate_static), the dynamic plan's is compiled by Inductor;
  * error vs dense attention (fp32 SDPA) at about equal density: plain window, window + rectify
    (block and rows), dynamic without and with rectification — on random inputs and on smooth
    inputs (a low-frequency field over the video grid plus noise, closer to real activations).
Writes $OUT/rectify.json.
"""
import json
import os

import torch
import torch.nn.functional as F
import triton

from compact_compile.kernels.flex import FlexBlockSparse
from compact_compile.kernels.rectified import RectifiedSparse, pooled
from compact_compile.kernels import triton_sparse as ts
from compact_compile.kernels.triton_sparse import TritonBlockSparse
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import density, neighbour_blocks, window_blocks

GRID, H, D = (21, 30, 52), 12, 128
dev, dt = "cuda", torch.bfloat16
bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
rows = []


def emit(**row):
    rows.append(row)
    print(json.dumps(row), flush=True)


def smooth_inputs(layout, g):
    """q, k, v varying slowly over (t, h, w), in tiled order: a sum of a few random plane waves."""
    T, Hh, W = GRID
    t, h, w = torch.meshgrid(*(torch.arange(n, device=dev, dtype=torch.float32) for n in GRID), indexing="ij")
    coords = torch.stack([t / T, h / Hh, w / W], -1).reshape(-1, 3)[layout.source_index(dev)]
    out = []
    for _ in range(3):
        freq = torch.randn(H, 8, 3, device=dev, generator=g) * 4
        amp = torch.randn(H, 8, D, device=dev, generator=g)
        field = torch.einsum("hfs,hfd->hsd", torch.sin(torch.einsum("sc,hfc->hfs", coords, freq)), amp)
        out.append((field + 0.3 * torch.randn(field.shape, device=dev, generator=g))[None].to(dt))
    return out


def main():
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    layout = TokenLayout(GRID, auto_tile(GRID, 128), 128)
    g = torch.Generator(device=dev).manual_seed(0)
    rand = [torch.randn(1, H, layout.seq_len, D, device=dev, dtype=dt, generator=g) for _ in range(3)]
    nbr = neighbour_blocks(layout)
    plans = {"window(5,5,5)": window_blocks(layout, (5, 5, 5)), "window(3,3,3)": window_blocks(layout, (3, 3, 3))}

    # cost of the rectification around a static plan, and of the dynamic plan's estimate
    q, k, v = rand
    for name, blocks in plans.items():
        plain = FlexBlockSparse(blocks[None], layout.seq_len, 128)
        t_sparse = bench(lambda: plain(q, k, v))
        for mode in (True, "rows"):
            kern = RectifiedSparse(layout, blocks[None], dynamic=False, rectify=True, rows=mode == "rows")
            t_all = bench(lambda: kern(q, k, v))
            t_est = bench(lambda: kern.estimate(q, k, v))
            emit(kind="cost", plan=name, rectify=mode, sparsity=1 - density(blocks), sparse_ms=t_sparse,
                 rectified_ms=t_all, estimate_ms=t_est, overhead_share=(t_all - t_sparse) / t_sparse)
        plain = TritonBlockSparse(blocks[None], layout.seq_len, 128)
        kern = RectifiedSparse(layout, blocks[None], dynamic=False, rectify=True, kernel="triton")
        general = RectifiedSparse(layout, blocks[None], dynamic=False, rectify=True, kernel="triton")
        general.static_estimate = False  # the Inductor-compiled estimate that dynamic plans use
        t_sparse, t_all = bench(lambda: plain(q, k, v)), bench(lambda: kern(q, k, v))
        t_pool = bench(lambda: pooled(q, k, v, layout.n_video, 128))
        t_est, t_general = bench(lambda: kern.estimate(q, k, v)), bench(lambda: general.estimate(q, k, v))
        (_, r, o_bar), (_, r_ref, o_bar_ref) = kern.estimate(q, k, v), general.estimate(q, k, v)
        emit(kind="cost-triton", plan=name, rectify=True, sparsity=1 - density(blocks), sparse_ms=t_sparse,
             rectified_ms=t_all, estimate_ms=t_est, pool_ms=t_pool, general_estimate_ms=t_general,
             overhead_share=(t_all - t_sparse) / t_sparse, config=ts.chosen_config(),
             max_diff_r_vs_general=(r - r_ref).abs().max().item(),
             rel_diff_obar_vs_general=((o_bar - o_bar_ref).norm() / o_bar_ref.norm()).item())
    for drop in (0.75, 0.9):
        kern = RectifiedSparse(layout, nbr[None], dynamic=True, rectify=True, drop=drop)
        keep = kern.estimate(q, k, v)[0]
        plain = FlexBlockSparse(keep[0], layout.seq_len, 128)  # the same blocks, chosen ahead of time
        t_sparse, t_all = bench(lambda: plain(q, k, v)), bench(lambda: kern(q, k, v))
        emit(kind="cost", plan=f"dynamic drop={drop}", rectify=True, sparsity=1 - keep.float().mean().item(),
             sparse_ms=t_sparse, rectified_ms=t_all, overhead_share=(t_all - t_sparse) / t_sparse)

    # error vs dense at about equal density
    for data, (q, k, v) in (("random", rand), ("smooth", smooth_inputs(layout, g))):
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        err = lambda o: ((o.float() - dense).norm() / dense.norm()).item()  # noqa: E731
        blocks = plans["window(3,3,3)"][None]
        variants = {
            "window": RectifiedSparse(layout, blocks, dynamic=False, rectify=False),
            "window+rectify": RectifiedSparse(layout, blocks, dynamic=False, rectify=True),
            "window+rectify rows": RectifiedSparse(layout, blocks, dynamic=False, rectify=True, rows=True),
            "dynamic (top-k, no rectify)": RectifiedSparse(layout, nbr[None], dynamic=True, rectify=False, drop=0.97),
            "dynamic+rectify": RectifiedSparse(layout, nbr[None], dynamic=True, rectify=True, drop=0.97),
        }
        for name, kern in variants.items():
            keep = kern.estimate(q, k, v)[0]
            emit(kind="error", data=data, variant=name, density=keep.float().mean().item(), rel_err=err(kern(q, k, v)))
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   shape=dict(B=1, H=H, S=layout.seq_len, D=D, grid=GRID, tile=layout.tile, dtype="bf16"), rows=rows),
              open(os.path.join(os.environ.get("OUT", "."), "rectify.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
