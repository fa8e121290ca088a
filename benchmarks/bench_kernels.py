"""GPU benchmark of block-sparse attention kernels, one process, same inputs for every kernel.

For the video DiT shapes below (bf16, block 128) at 50/75/90/95% block sparsity with random
(per head) and window (a band over tiles, shared by the heads) masks, times:
  SDPA default (dense, cuDNN on Hopper) · every kernel of the registry that runs here, on the same
  block lists: FA4 (where installed), our Triton kernel (autotuned), FlexAttention,
with triton.testing.do_bench (median after warm-up) on N(0,1) inputs, checks each against Flex on
every config, and at 90% (random) also times the fused rectification epilogue (R·O + Ō) of the
kernels that have one (Triton) against the unfused equivalent.
Effective TFLOP/s = 4·B·H·S²·D·density / t (the work of the kept blocks only).

Run on the GPU machine:  python benchmarks/bench_kernels.py   (JSON to $OUT/kernels.json)
Options: --shapes NAME... (substrings), --budget-s: past this many seconds the 50%-sparsity points
of the big shapes (the slowest) are skipped, and the skips are recorded.
--configs: instead, time every launch configuration of our Triton kernel in CONFIG_SWEEP (tile
shape, warps, stages, TMA descriptor loads) at 90% sparsity against the other kernels and the
autotuned choice, each checked against Flex (JSON to $OUT/kernel-configs.json). The recorded H100
sweep also tried Triton's automatic warp specialisation, from a build of the kernel that had the
switch; it gained nothing and was dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from compact_compile.kernels import triton_sparse as ts
from compact_compile.kernels.registry import kv_block_lists
from compact_compile.layout import TokenLayout
from timing import SparseAttention, available_kernels

SHAPES = [  # name, B, H, S, D
    ("wan1.3B-480p", 1, 12, 32760, 128),
    ("wan14B-720p", 1, 40, 75600, 128),
    ("hunyuan-720p", 1, 24, 119040, 128),
]
SPARSITIES = [0.90, 0.95, 0.75, 0.50]   # 90% first: the autotuner tunes at the target point
PATTERNS = ["random", "window"]
BLOCK = 128
DEV = "cuda"
CONFIG_SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st, tma=tma)
                for m, n, w, st in [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4),
                                    (128, 64, 4, 3), (64, 128, 4, 3)]
                for tma in (False, True)]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_blocks(pattern: str, H: int, nb: int, sparsity: float, gen) -> torch.Tensor:
    """bool [H or 1, nb, nb] with the diagonal kept."""
    density = 1.0 - sparsity
    if pattern == "random":
        blocks = torch.rand(H, nb, nb, device=DEV, generator=gen) < density
    else:  # window: |i − j| ≤ w over tiles, the same for every head (lists broadcast over heads)
        w = max(0, round((density * nb - 1) / 2))
        i = torch.arange(nb, device=DEV)
        blocks = ((i[:, None] - i[None, :]).abs() <= w)[None].clone()
    d = torch.arange(nb, device=DEV)
    blocks[:, d, d] = True
    return blocks


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float())
    return dict(max_abs_err=diff.abs().max().item(), rel_err=(diff.norm() / ref.float().norm()).item(),
                finite=bool(torch.isfinite(out).all()))


def kernels_for(names, H: int, S: int, blocks: torch.Tensor) -> dict:
    """{name: SparseAttention} over `blocks` `[H or 1, nb, nb]` on a plain sequence of S tokens, Flex
    first (the reference). Flex gets the per-head copy of a shared mask: one BlockMask shape per
    sequence length, so its compiled kernel is reused across patterns (no recompiles)."""
    layout = TokenLayout((1, 1, S), (1, 1, BLOCK), BLOCK)
    nb = blocks.shape[-1]
    return {name: SparseAttention(name, layout, blocks.expand(H, nb, nb) if name == "flex" else blocks)
            for name in sorted(names, key=lambda n: n != "flex")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--configs", action="store_true")
    args = ap.parse_args()
    if args.configs:
        return config_sweep(args)
    t_start = time.time()
    torch.manual_seed(0)
    gen = torch.Generator(device=DEV).manual_seed(0)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                block_size=BLOCK, dtype="bfloat16", sm90_configs=ts.SM90_CONFIGS)
    print(meta, flush=True)
    rows, configs, skipped = [], [], []

    def record(**r):
        rows.append(r)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)

    def note_config(shape, variant):
        c = dict(shape=shape, variant=variant, **ts.chosen_config())
        tuner = ts._attn_fwd_tuned
        timings = getattr(tuner, "configs_timings", None) or {}
        c["tuning_ms"] = {str(k): (v[0] if isinstance(v, (list, tuple)) else v) for k, v in timings.items()}
        tuner.configs_timings = None  # report each tuning once
        configs.append(c)
        print("  config", shape, variant, {k: v for k, v in c.items() if k != "tuning_ms"}, flush=True)

    shapes = [s for s in SHAPES if not args.shapes or any(p in s[0] for p in args.shapes)]
    for shape, B, H, S, D in shapes:
        names = available_kernels(torch.bfloat16, D, BLOCK)
        meta["kernels"] = names
        q, k, v = (torch.randn(B, H, S, D, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        nb = triton.cdiv(S, BLOCK)
        flops = 4 * B * H * S * S * D
        sdpa_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        record(shape=shape, impl="sdpa-default", sparsity=0.0, ms=sdpa_ms, tflops=flops / sdpa_ms / 1e9)
        for sparsity in SPARSITIES:
            if sparsity == 0.5 and shape != SHAPES[0][0] and time.time() - t_start > args.budget_s:
                skipped.append(f"{shape} at 50% (time budget)")
                print("  skip", skipped[-1], flush=True)
                continue
            for pattern in PATTERNS:
                blocks = make_blocks(pattern, H, nb, sparsity, gen)
                density = blocks.float().mean().item()
                eff = flops * density
                kernels = kernels_for(names, H, S, blocks)
                for name, attend in kernels.items():
                    out = attend(q, k, v)              # first call: autotune (Triton, per key) + compile
                    if name == "triton" and sparsity == SPARSITIES[0] and pattern == PATTERNS[0]:
                        note_config(shape, "plain")
                    ms = bench(lambda: attend(q, k, v))
                    if name == "flex":                 # first: the reference
                        ref, flex_ms = out, ms
                    r = dict(shape=shape, pattern=pattern, kernel=name, sparsity=round(1 - density, 4),
                             density=density, sdpa_ms=sdpa_ms, flex_ms=flex_ms, ms=ms, speedup_vs_sdpa=sdpa_ms / ms,
                             speedup_vs_flex=flex_ms / ms, tflops_eff=eff / ms / 1e9, **errors(out, ref))
                    if sparsity == 0.9:
                        r["ms_repeat"] = bench(lambda: attend(q, k, v))   # run-to-run spread
                    record(impl="compare", **r)
                    if sparsity == 0.9 and pattern == "random" and attend.kernel.fuses_rectify:
                        fused_rectify(shape, name, q, k, v, attend, gen, record, note_config)
                    del out
                del kernels, ref
        del q, k, v
        torch.cuda.empty_cache()

    summary(rows)
    result = dict(meta=meta, rows=rows, configs=configs, skipped=skipped, total_s=time.time() - t_start)
    os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
    path = os.path.join(os.environ.get("OUT", "."), "kernels.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {path}; total {time.time() - t_start:.0f} s; skipped: {skipped or 'none'}")


def config_sweep(args):
    gen = torch.Generator(device=DEV).manual_seed(0)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                block_size=BLOCK, dtype="bfloat16", sparsity=0.9)
    print(meta, flush=True)
    rows = []
    for shape, B, H, S, D in [s for s in SHAPES if not args.shapes or any(p in s[0] for p in args.shapes)]:
        names = available_kernels(torch.bfloat16, D, BLOCK)
        assert "triton" in names, "the launch-configuration sweep is of our Triton kernel"
        q, k, v = (torch.randn(B, H, S, D, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        nb = triton.cdiv(S, BLOCK)
        for pattern in PATTERNS:
            blocks = make_blocks(pattern, H, nb, 0.9, gen)
            eff = 4 * B * H * S * S * D * blocks.float().mean().item()
            kernels = kernels_for(names, H, S, blocks)
            ours = kernels.pop("triton")
            num, idx = kv_block_lists(blocks)
            ref = kernels["flex"](q, k, v)
            others = {f"{name}_ms": bench(lambda attend=attend: attend(q, k, v)) for name, attend in kernels.items()}
            ours(q, k, v)
            auto = dict(config="autotuned " + str(ts.chosen_config()), ms=bench(lambda: ours(q, k, v)))
            for c in [None] + CONFIG_SWEEP:
                r = dict(shape=shape, pattern=pattern, **others, autotuned_ms=auto["ms"])
                if c is None:
                    r.update(auto)
                else:
                    r["config"] = c
                    try:
                        run = lambda: ts.block_sparse_attention(q, k, v, num, idx, BLOCK, config=c)  # noqa: E731
                        r.update(errors(run(), ref), ms=bench(run), **ts.chosen_config())
                    except Exception as e:  # a configuration this Triton cannot build: record why
                        r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                if "ms" in r:
                    r.update(tflops_eff=eff / r["ms"] / 1e9, speedup_vs_flex=others["flex_ms"] / r["ms"])
                rows.append(r)
                print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
            del kernels, ours, ref
        del q, k, v
        torch.cuda.empty_cache()
    path = os.path.join(os.environ.get("OUT", "."), "kernel-configs.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    print("wrote", path)


def fused_rectify(shape, name, q, k, v, attend, gen, record, note_config):
    """The fused R·O + Ō epilogue against the same merge in torch ops after the kernel. (The fused
    token permutation that used to be timed here too is gone: the kernel no longer has `src=`.)"""
    B, H, S, D = q.shape
    nq = triton.cdiv(S, BLOCK)
    R = torch.rand(B, H, nq, device=DEV, generator=gen) + 0.5
    Obar = torch.randn(B, H, nq, D, device=DEV, generator=gen)
    qb = torch.arange(S, device=DEV) // BLOCK

    def fused():
        return attend(q, k, v, rectify=(R, Obar))

    def unfused():
        o = attend(q, k, v)
        return (R[..., qb, None] * o.float() + Obar[:, :, qb]).to(o.dtype)

    base_ms = bench(lambda: attend(q, k, v))
    got = fused()
    if name == "triton":
        note_config(shape, "rectify")
    want = unfused()
    fused_ms, unfused_ms = bench(fused), bench(unfused)
    record(shape=shape, impl="fused-rectify", kernel=name, pattern="random", sparsity=0.9, plain_ms=base_ms,
           fused_ms=fused_ms, unfused_ms=unfused_ms, fused_overhead=fused_ms / base_ms - 1, **errors(got, want))


def summary(rows):
    cmp = sorted((r for r in rows if r.get("impl") == "compare"),
                 key=lambda r: (r["shape"], r["pattern"], r["sparsity"]))   # stable: Flex first
    head = f"{'shape':14} {'mask':7} {'spars':>5} {'kernel':7} {'sdpa ms':>8} {'ms':>8} {'x sdpa':>7} " \
           f"{'x flex':>7} {'TF/s':>6} {'max err':>8} {'rel err':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in cmp:
        print(f"{r['shape']:14} {r['pattern']:7} {r['sparsity']:5.2f} {r['kernel']:7} {r['sdpa_ms']:8.2f} "
              f"{r['ms']:8.3f} {r['speedup_vs_sdpa']:7.2f} {r['speedup_vs_flex']:7.2f} {r['tflops_eff']:6.0f} "
              f"{r['max_abs_err']:8.1e} {r['rel_err']:8.1e}")
    for r in rows:
        if r.get("impl") == "fused-rectify":
            print(f"{r['shape']:14} fused-rectify {r['kernel']:7} plain {r['plain_ms']:.3f} ms, fused "
                  f"{r['fused_ms']:.3f} ms, unfused {r['unfused_ms']:.3f} ms, max err {r['max_abs_err']:.1e}, "
                  f"rel err {r['rel_err']:.1e}")


if __name__ == "__main__":
    main()
