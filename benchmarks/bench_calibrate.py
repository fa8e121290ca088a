"""Calibration on the GPU (issue 3), one process, the dense baseline measured in the same run.

Shape: Wan2.1-1.3B 480p 81 frames = grid (21, 30, 52) = 32760 tokens, B1 H12 D128 bf16, tile auto
(4, 4, 8), 128-token blocks (256 blocks).
  1. statistics cost: dense SDPA (default backend) vs the block-mass Triton kernel given the lse, a
     launch-config sweep of it, the lse pass it needs when no flash lse exists, flash-with-lse, and
     the whole calibration kernel (flash + block mass) — ms and ratio to dense SDPA;
  2. statistics check: the calibration kernel's output vs SDPA, and its block mass vs the chunked
     torch float64 reference, on one head (a slice) with peaked attention;
  3. search time: 30 sites × 12 heads of random but structured statistics (local / cross /
     temporal / global heads with noise) on the same layout — the greedy search and the plan build;
  4. an example plan from (3): inspect table and plot PNGs.
Writes $OUT/calibrate.json, $OUT/inspect.txt, $OUT/example.plan.safetensors and $OUT/plots/*.png.

    python benchmarks/bench_calibrate.py          (needs CUDA; about 2 minutes)
"""
import contextlib
import io
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from compact_compile.calibrate import triton_mass
from compact_compile.calibrate.build import build_plan
from compact_compile.calibrate.patterns import Family
from compact_compile.calibrate.search import search_sites
from compact_compile.calibrate.stats import (CalibrationStats, SiteStats, block_mass, dense_attention_with_mass)
from compact_compile.layout import TokenLayout, auto_tile
from timing import SITES

GRID, H, D, B, BS = SITES["wan1.3b"]["grid"], SITES["wan1.3b"]["heads"], 128, 1, 128
S = GRID[0] * GRID[1] * GRID[2]
dev, dt = "cuda", torch.bfloat16
OUT = os.environ.get("OUT", ".")
CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)]
bench = lambda fn, rep=300: triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")  # noqa: E731
result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
              shape=dict(B=B, H=H, S=S, D=D, grid=GRID, block_size=BS, dtype="bf16"))


def emit(key, value):
    result[key] = value
    print(key, json.dumps(value), flush=True)


def statistics_cost(layout):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3))
    scale = D ** -0.5
    sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    flash = bench(lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale))
    lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[1]
    emit("lse_from_flash", dict(shape=list(lse.shape), dtype=str(lse.dtype), stride=list(lse.stride())))
    sweep = []
    for bm, bn, w, st in CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        try:
            ms = bench(lambda: triton_mass.block_mass(q, k, lse, BS, scale, config=cfg))
        except Exception as e:  # a config the compiler rejects (shared memory, registers): record and go on
            sweep.append(dict(config=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        sweep.append(dict(config=cfg, ms=ms, ratio_to_sdpa=ms / sdpa))
        print(sweep[-1], flush=True)
    best = min((r for r in sweep if "ms" in r), key=lambda r: r["ms"])
    lse_pass = bench(lambda: triton_mass.row_lse(q, k, scale))
    whole = bench(lambda: dense_attention_with_mass(q, k, v, scale, BS))
    chunked = bench(lambda: block_mass(q, k, BS, scale, dtype=torch.float32), rep=20)
    emit("stats_cost", dict(
        sdpa_default_ms=sdpa, flash_with_lse_ms=flash, block_mass_kernel_default_config_ms=sweep[0].get("ms"),
        block_mass_kernel_best=best, row_lse_pass_ms=lse_pass, calibration_kernel_ms=whole,
        calibration_kernel_ratio_to_sdpa=whole / sdpa, block_mass_kernel_best_ratio_to_sdpa=best["ms"] / sdpa,
        torch_chunked_fp32_ms=chunked, sweep=sweep,
        note="calibration kernel = flash attention with lse (the site's output) + block-mass kernel (default config)"))


def statistics_check(layout):
    """One head, all 32760 queries, attention peaked enough that block masses differ by orders."""
    torch.manual_seed(1)
    q = (torch.randn(1, 1, S, D, device=dev) * 2.5).to(dt)
    k = torch.randn(1, 1, S, D, device=dev).to(dt)
    v = torch.randn(1, 1, S, D, device=dev).to(dt)
    out, mass = dense_attention_with_mass(q, k, v, None, BS)
    ref = block_mass(q, k, BS, None, dtype=torch.float64)
    lse = triton_mass.row_lse(q, k)
    mass2 = triton_mass.block_mass(q, k, lse, BS)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    emit("stats_check", dict(
        output_max_abs_diff_vs_sdpa=(out.float() - sdpa.float()).abs().max().item(),
        block_mass_max_abs_err_flash_lse=(mass.double() - ref).abs().max().item(),
        block_mass_max_abs_err_triton_lse=(mass2.double() - ref).abs().max().item(),
        block_mass_max=ref.max().item(), block_mass_min=ref.min().item(),
        row_sum_max_dev=(mass.double().sum(-1) - 1).abs().max().item()))


def structured_stats(layout, sites=30, heads=12, seed=0) -> CalibrationStats:
    """Block mass of planted local / cross / temporal / global heads (random extents and sharpness)
    over a background that decays with tile distance, with noise:
    softmax over key blocks of β·[planted] − α·|Δ tile| + noise."""
    g = torch.Generator().manual_seed(seed)
    fam = Family(layout)
    _, nth, ntw = layout.tile_grid
    G = fam.n_groups
    rep, _ = fam.block_representatives()
    c = fam.tile_coords()[rep].double()
    dist = (c[:, None] - c[None, :]).abs().sum(-1)                       # [nb, nb] tile distance
    st = CalibrationStats((15, None), calls=50, generations=2)
    for i in range(sites):
        params = []
        for _ in range(heads):
            kind = int(torch.randint(0, 4, (1,), generator=g))
            r = lambda n: int(torch.randint(0, n, (1,), generator=g))  # noqa: E731
            if kind == 0:      # local: a box in the near frame groups
                p = torch.full((G, 4), -1)
                p[: 1 + r(2)] = torch.tensor([r(3), r(3)] * 2)
            elif kind == 1:    # cross: a tile row ∪ a tile column
                p = torch.tensor([ntw - 1, r(2), r(2), nth - 1]).repeat(G, 1)
            elif kind == 2:    # temporal stripe: the same small window in every frame
                p = torch.tensor([r(2), r(2)] * 2).repeat(G, 1)
            else:              # global
                p = fam.full_params(1)[0]
            params.append(p)
        planted = fam.block_map(torch.stack(params)).double()
        beta = 4 + 6 * torch.rand(heads, 1, 1, generator=g, dtype=torch.float64)
        alpha = 0.2 + 1.3 * torch.rand(heads, 1, 1, generator=g, dtype=torch.float64)
        noise = 0.3 * torch.randn(heads, layout.n_blocks, layout.n_blocks, generator=g, dtype=torch.float64)
        s = SiteStats.empty(layout, heads, D)
        s.add(torch.softmax(beta * planted - alpha * dist + noise, -1))
        st.sites[f"blocks.{i}.attn1"] = s
    return st


def search_time(layout):
    st = structured_stats(layout)
    fam = Family(layout)
    masses = {n: s.mass for n, s in st.sites.items()}
    search_sites(dict(list(masses.items())[:1]), fam)       # warm the geometry caches
    t0 = time.perf_counter()
    found = search_sites(masses, fam, 0.9, 0.011)
    t_search = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = build_plan([[st]], recall_target=0.9, cost=0.011, dense_steps=15, merge="mean")
    t_build = time.perf_counter() - t0
    rec = torch.cat([r.recall for r in found.values()])
    dens = torch.cat([r.density for r in found.values()])
    classes = {}
    for name in plan.sites:
        for c in plan.info["heads"][name]["pattern"]:
            classes[c] = classes.get(c, 0) + 1
    emit("search", dict(sites=30, heads=12, blocks=layout.n_blocks, tile_grid=layout.tile_grid,
                        search_s=t_search, build_plan_s=t_build, cpu_threads=torch.get_num_threads(),
                        recall_min=rec.min().item(), density_mean=dens.mean().item(), pattern_classes=classes))
    return plan


def plots(plan):
    from compact_compile.cli import main

    path = os.path.join(OUT, "example.plan.safetensors")
    plan.save(path)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        main(["inspect", path, "--sites", "4"])
    open(os.path.join(OUT, "inspect.txt"), "w").write(text.getvalue())
    main(["plot", path, "--out", os.path.join(OUT, "plots"), "--sites", "2"])


def main():
    layout = TokenLayout(GRID, auto_tile(GRID, BS), BS)
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(),
          "tile", layout.tile, "blocks", layout.n_blocks, flush=True)
    t0 = time.time()
    for part in (statistics_cost, statistics_check):
        try:
            part(layout)
        except Exception as e:  # keep the other parts' numbers
            emit(part.__name__ + "_error", f"{type(e).__name__}: {e}")
        json.dump(result, open(os.path.join(OUT, "calibrate.json"), "w"), indent=1)
    plan = search_time(layout)
    plots(plan)
    emit("wall_s", time.time() - t0)
    json.dump(result, open(os.path.join(OUT, "calibrate.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
