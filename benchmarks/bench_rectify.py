"""Rectification on the GPU (issue 4), one process, same inputs for every row.

Wan2.1-1.3B 480p shape (grid 21×30×52, B1 H12 S32760 D128, bf16, tokens already tiled):
  * cost: pooling + P̂ + selection + GAPR (estimate) and the R·O + Ō merge, as a share of the sparse
    attention time, for a static window plan (~75% and ~90% sparse; rectified per block and per row)
    and for the dynamic plan, on every kernel of the registry that runs here (FA4 where installed,
    our Triton kernel with R·O + Ō in its epilogue, FlexAttention), each against the same kernel
    without rectification (kind "cost"), with GPU time per kernel from the profiler (kind "gpu");
    a static plan's estimate is one pooling pass over q, k, v then one Triton launch
    (estimate_triton.estimate_static_triton), timed against the pooling alone and the general
    (torch, Inductor-compiled) estimate (kind "estimate");
  * error vs dense attention (fp32 SDPA) at about equal density, on FlexAttention: plain window,
    window + rectify (block and rows), dynamic without and with rectification — on random inputs
    and on smooth inputs (a low-frequency field over the video grid plus noise, closer to real
    activations).
  * cost in a compiled site: a Wan self-attention layer (projections, RMSNorm, RoPE, attention,
    output projection) compiled with backend="compact" on each kernel, the window plans plain and
    rectified (where the reorder also pools, compact.tile_pool), next to Inductor's dense layer; wall
    time (CUDA events) and GPU time per kernel (profiler); and the dynamic plan (online top-k +
    rectify) at about 75% and 90% sparsity.
Site runtimes are built from a SiteSpec as the backend builds them (kernels/site.py).
`--site-only` runs the last part only. Writes $OUT/rectify.json.
"""
import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton

import compact_compile
from compact_compile.kernels import triton_sparse as ts
from compact_compile.kernels.rectified import pooled
from compact_compile.kernels.site import make_site
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import density, neighbour_blocks, window_blocks
from compact_compile.spec import Selection, SiteSpec, single_range
from timing import Results, SparseAttention, available_kernels, bench, kernel_times, matching

GRID, H, D = (21, 30, 52), 12, 128
dev, dt = "cuda", torch.bfloat16
results = Results("rectify.json")
emit = results.emit


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


class WanSelfAttention(nn.Module):
    """diffusers' Wan 2.1 self-attention at the 1.3B width (RoPE as real-valued interleaved pairs)."""

    def __init__(self, dim: int = H * D):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x, cos, sin):
        def rope(t):
            x1, x2 = t.unflatten(-1, (H, D)).unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(t)
        q, k = rope(self.norm_q(self.to_q(x))), rope(self.norm_k(self.to_k(x)))
        v = self.to_v(x).unflatten(-1, (H, D))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out(o.transpose(1, 2).flatten(2))


def site_runtime(layout, blocks, kernel: str, rectify=None, drop=None):
    """A site's runtime as the backend builds it: static `blocks` `[H or 1, nb, nb]`, rectification
    None / "block" / "rows", an online choice (p_remain 0.3) if `drop` is given."""
    selection = None if drop is None else Selection(drop=drop)
    return make_site(SiteSpec("bench", layout, single_range(blocks), selection=selection, rectify=rectify,
                              kernel=kernel))


def site_costs(layout, kernels, g):
    """ms per layer call, compiled: Inductor dense, and compact plain vs rectified per plan/kernel."""
    S = layout.seq_len
    layer = WanSelfAttention().to(dev, dt).eval()
    x = torch.randn(1, S, H * D, device=dev, dtype=dt, generator=g)
    angle = torch.rand(S, 1, D // 2, device=dev, generator=g) * 6.28
    args = (x, angle.cos().to(dt), angle.sin().to(dt))
    variants = [("inductor dense", "inductor", {})]
    for window in ((5, 5, 5), (3, 3, 3)):
        for kernel in kernels:
            for rectify in (False, True):
                variants.append((f"window{window} {kernel}{' rectify' if rectify else ''}", "compact",
                                 dict(plan="window", window=window, grid=GRID, kernel=kernel, rectify=rectify)))
    for drop in (0.75, 0.9):   # at least (1 − drop) of the key blocks; p_remain small so that bound decides
        for kernel in kernels:
            variants.append((f"dynamic drop={drop} {kernel} rectify", "compact",
                             dict(plan="dynamic", grid=GRID, kernel=kernel, rectify=True, drop=drop, p_remain=0.05)))
    with torch.no_grad():
        ref = layer(*args).float()
        for name, backend, options in variants:
            torch._dynamo.reset()
            model = torch.compile(copy.deepcopy(layer), backend=backend, **({"options": options} if options else {}))
            out = model(*args).float()
            gpu = kernel_times(lambda: model(*args))
            site = compact_compile.report().sites[-1] if backend == "compact" else {}
            emit(kind="site", variant=name, window=options.get("window"), kernel=options.get("kernel"),
                 rectify=options.get("rectify"), ms=bench(lambda: model(*args)), gpu_total_us=sum(gpu.values()),
                 attention_us=matching(gpu, "_attn_fwd", "flex_attention", "sdpa", "kernel_cutlass"),
                 density=site.get("min_density", site.get("density")),
                 rel_err_vs_dense=((out - ref).norm() / ref.norm()).item(), kernels_us=gpu)


def main():
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    layout = TokenLayout(GRID, auto_tile(GRID, 128), 128)
    kernels = available_kernels(dt, D, layout.block_size)
    g = torch.Generator(device=dev).manual_seed(0)
    if "--site-only" not in sys.argv:
        kernel_costs_and_errors(layout, kernels, g)
    site_costs(layout, kernels, g)
    results.save(shape=dict(B=1, H=H, S=layout.seq_len, D=D, grid=GRID, tile=layout.tile, dtype="bf16"),
                 kernels=kernels)


def kernel_costs_and_errors(layout, kernels, g):
    rand = [torch.randn(1, H, layout.seq_len, D, device=dev, dtype=dt, generator=g) for _ in range(3)]
    nbr = neighbour_blocks(layout)
    plans = {"window(5,5,5)": window_blocks(layout, (5, 5, 5)), "window(3,3,3)": window_blocks(layout, (3, 3, 3))}

    # cost of the rectification around a static plan, per kernel
    q, k, v = rand
    for name, blocks in plans.items():
        blocks, sparsity = blocks[None], 1 - density(blocks)
        for kernel in kernels:
            plain = SparseAttention(kernel, layout, blocks.to(dev))
            t_sparse = bench(lambda: plain(q, k, v))
            rectified = {mode: site_runtime(layout, blocks, kernel, rectify=mode) for mode in ("block", "rows")}
            for mode, kern in rectified.items():
                t_all, t_est = bench(lambda: kern(q, k, v)), bench(lambda: kern.estimate(q, k, v))
                emit(kind="cost", plan=name, kernel=kernel, rectify=True if mode == "block" else mode,
                     sparsity=sparsity, sparse_ms=t_sparse, rectified_ms=t_all, estimate_ms=t_est,
                     overhead_share=(t_all - t_sparse) / t_sparse,
                     **({"config": ts.chosen_config()} if kernel == "triton" else {}))
            gpu_plain = kernel_times(lambda: plain(q, k, v))
            gpu_rect = kernel_times(lambda: rectified["block"](q, k, v))
            emit(kind="gpu", plan=name, kernel=kernel, sparsity=sparsity, plain_total_us=sum(gpu_plain.values()),
                 rectified_total_us=sum(gpu_rect.values()), plain_us=gpu_plain, rectified_us=gpu_rect)
        # the static plan's estimate, the same on every kernel: pooling + one Triton launch, against the
        # general (torch) estimate, which an all-True key mask selects (the Triton one takes no key masks)
        kern = site_runtime(layout, blocks, kernels[0], rectify="block")
        every_key = torch.ones(1, layout.seq_len, dtype=torch.bool, device=dev)
        general = lambda: kern.estimate(q, k, v, None, pooled(q, k, v, layout.n_video, 128), every_key)  # noqa: E731
        t_pool = bench(lambda: pooled(q, k, v, layout.n_video, 128))
        t_est, t_general = bench(lambda: kern.estimate(q, k, v)), bench(general)
        (_, r, o_bar), (_, r_ref, o_bar_ref) = kern.estimate(q, k, v), general()
        emit(kind="estimate", plan=name, sparsity=sparsity, estimate_ms=t_est, pool_ms=t_pool,
             general_estimate_ms=t_general, max_diff_r_vs_general=(r - r_ref).abs().max().item(),
             rel_diff_obar_vs_general=((o_bar - o_bar_ref).norm() / o_bar_ref.norm()).item())
    for drop in (0.75, 0.9):
        for kernel in kernels:
            kern = site_runtime(layout, nbr[None], kernel, rectify="block", drop=drop)
            keep = kern.estimate(q, k, v)[0]
            plain = SparseAttention(kernel, layout, keep[0])   # the same blocks, chosen ahead of time
            t_sparse, t_all = bench(lambda: plain(q, k, v)), bench(lambda: kern(q, k, v))
            emit(kind="cost", plan=f"dynamic drop={drop}", kernel=kernel, rectify=True,
                 sparsity=1 - keep.float().mean().item(), sparse_ms=t_sparse, rectified_ms=t_all,
                 overhead_share=(t_all - t_sparse) / t_sparse)

    # error vs dense at about equal density
    for data, (q, k, v) in (("random", rand), ("smooth", smooth_inputs(layout, g))):
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        err = lambda o: ((o.float() - dense).norm() / dense.norm()).item()  # noqa: E731
        blocks = plans["window(3,3,3)"][None]
        variants = {
            "window": site_runtime(layout, blocks, "flex"),
            "window+rectify": site_runtime(layout, blocks, "flex", rectify="block"),
            "window+rectify rows": site_runtime(layout, blocks, "flex", rectify="rows"),
            "dynamic (top-k, no rectify)": site_runtime(layout, nbr[None], "flex", drop=0.97),
            "dynamic+rectify": site_runtime(layout, nbr[None], "flex", rectify="block", drop=0.97),
        }
        for name, kern in variants.items():
            keep = kern.estimate(q, k, v)[0]
            emit(kind="error", data=data, variant=name, density=keep.float().mean().item(), rel_err=err(kern(q, k, v)))


if __name__ == "__main__":
    main()
