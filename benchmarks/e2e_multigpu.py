"""Wan2.1-14B 720p 81 frames on one GPU and on two through diffusers' Ulysses context parallelism,
Inductor dense against backend="compact" (a window plan, and a per-head plan).

    torchrun --nproc_per_node 2 benchmarks/e2e_multigpu.py [--reps 3] [--phases 1gpu ulysses]
    torchrun --nproc_per_node 2 benchmarks/e2e_multigpu.py --smoke      # a tiny Wan on the CPU, gloo

Random weights (they do not change speed), bf16, the model built from diffusers' config by
benchmarks/e2e.py (wan14b: 75,600 video tokens, 40 heads), which also compiles and times it. The
repeated transformer blocks are compiled (diffusers' compile_repeated_blocks), as in BENCHMARKS.md:
one graph for the 40 blocks compiles in tens of seconds, the whole model in minutes per variant,
and the run has to fit in 9 minutes on two H200s. One process per GPU, two phases:

  1gpu     every rank runs the model alone on its own GPU (rank 0's numbers are the result, rank 1's
           a second sample);
  ulysses  the same model after `enable_parallelism(ContextParallelConfig(ulysses_degree=n))`: each
           rank holds 1/n of the tokens, and each attention the whole sequence for 1/n of the heads,
           after an all-to-all that stays in the compiled graph.

Variants: `inductor-dense-regional`; `compact-window-regional`, the window plan at e2e's window for
the model; `compact-perhead-regional`, a SYNTHETIC per-head plan: head i runs the window
PER_HEAD_WINDOWS[i % 4]. It is not calibrated (no calibration data here): it measures what a per-head
plan costs on the per-head path, each rank running the plan rows of the heads the graph proves it
holds (compact_compile/passes/heads.py), not a plan's quality.

Per variant and phase: the first call's seconds (compile and one forward), forward ms (the median of --reps calls
after a warm one, CUDA events, the ranks started together by a barrier before each call; a step
takes the slowest rank's time), the compact report (sites rewritten, density, kernel, the model
heads rank by rank), and the output's relative difference to the same variant on one GPU and to the
phase's dense output. Writes $OUT/e2e-multigpu-<model>.json after every variant.
"""
import argparse
import functools
import json
import logging
import os
import tempfile
import time
from contextlib import nullcontext
from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist

import compact_compile
import e2e
from compact_compile.balance import balanced_heads, rank_loads
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import window_blocks
from compact_compile.plan import Plan, SitePlan

PER_HEAD_WINDOWS = [(1, 3, 3), (3, 3, 3), (3, 5, 5), (5, 7, 7)]
BLOCK = 128
# a Wan small enough for a CPU: 3×8×8 = 192 video tokens, 4 heads of 16, two blocks, 64-token blocks
SMOKE = dict(cls="WanTransformer3DModel", window=(1, 3, 3), latent=(1, 4, 3, 16, 16), text=(1, 16, 32), block=64,
             config=dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                         out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                         qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32))


def variants(plan_path: str, block: int) -> dict:
    """name → torch.compile keyword arguments, in e2e.compiled's terms ("WINDOW": the model's window)."""
    return {
        "inductor-dense-regional": dict(backend="inductor"),
        "compact-window-regional": dict(backend="compact", options=dict(plan="window", window="WINDOW",
                                                                        block_size=block)),
        "compact-perhead-regional": dict(backend="compact", options=dict(plan=plan_path)),
    }


def synthetic_per_head_plan(spec, block: int) -> Plan:
    """One per-head mask for every layer's self-attention (site `attn1`, which each block's name ends
    with): head i the window PER_HEAD_WINDOWS[i % 4] in tiles. Uncalibrated: for timing only."""
    grid, cfg = e2e.grid_of(spec), spec["config"]
    layout = TokenLayout(grid, auto_tile(grid, block), block)
    windows = [window_blocks(layout, w) for w in PER_HEAD_WINDOWS]
    heads = cfg["num_attention_heads"]
    blocks = torch.stack([windows[i % len(windows)] for i in range(heads)])
    return Plan(grid, layout.tile, block, {"attn1": SitePlan(heads, cfg["attention_head_dim"], layout.seq_len, 0, 0,
                                                             blocks)},
                info=dict(synthetic=f"head i: window {PER_HEAD_WINDOWS}[i % {len(windows)}], not calibrated"))


def gathered(value):
    """`value` from every rank, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def measure(model, spec, x, t, text, name, plan_path, reps):
    """(first call s, forward ms, output) of the model compiled as variant `name`."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    m = e2e.compiled(model, name, spec, 0, variants(plan_path, spec["block"]))
    call = functools.partial(e2e.forward, m, spec, x, t, text)
    dist.barrier()
    t0 = time.time()
    out = call()
    sync()
    first_s = time.time() - t0
    call()                                             # warm
    ms = e2e.event_ms(call, reps, before=dist.barrier)
    return first_s, ms, out


def run_phase(phase, model, spec, inputs, plan_path, args, outs_1gpu, results, save):
    outs = {}
    for name in variants(plan_path, spec["block"]):
        torch._dynamo.reset()
        compact_compile.report(clear=True)
        with torch.no_grad():
            first_s, ms, outs[name] = measure(model, spec, *inputs, name, plan_path, args.reps)
        rewritten = [s for s in compact_compile.report().sites if s["rewritten"]]
        r = dict(first_call_s=gathered(first_s), ms=gathered(ms),
                 model_heads=gathered(rewritten[0].get("model_heads") if rewritten else None))
        r["step_ms"] = max(r["ms"])
        r.update(e2e.describe(name, outs))
        if phase != "1gpu" and name in outs_1gpu:
            r["rel_diff_vs_1gpu"] = gathered(e2e.rel(outs[name], outs_1gpu[name]))
        results.setdefault(phase, {})[name] = r
        save()
        if dist.get_rank() == 0:
            print(phase, name, json.dumps(r), flush=True)
        e2e.uncompile_blocks(model)
    return outs


def speedups(results):
    """Each variant's step time against its phase's dense one and against the same variant on 1 GPU."""
    dense = "inductor-dense-regional"
    for phase, rows in results.items():
        for name, r in rows.items():
            if dense in rows:
                r["speedup_vs_phase_dense"] = rows[dense]["step_ms"] / r["step_ms"]
            if phase != "1gpu" and name in results.get("1gpu", {}):
                r["speedup_vs_1gpu"] = results["1gpu"][name]["step_ms"] / r["step_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan14b", choices=["wan14b", "wan1.3b"])
    ap.add_argument("--reps", type=int, default=3, help="timed forwards per variant (after one warm)")
    ap.add_argument("--phases", nargs="*", default=["1gpu", "ulysses"], choices=["1gpu", "ulysses"])
    ap.add_argument("--smoke", action="store_true", help="a tiny Wan on the CPU over gloo: checks the script runs")
    args = ap.parse_args()

    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # long enough for a phase's compile on one rank while the other waits at a barrier
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    spec = dict(SMOKE) if args.smoke else dict(e2e.MODELS[args.model], block=BLOCK)
    model, x, text = e2e.build(spec, device)
    spec["extra"] = e2e.extra_inputs(spec)
    inputs = (x, torch.tensor([500], device=device), text)

    plan = synthetic_per_head_plan(spec, spec["block"])
    plan_path = os.path.join(tempfile.gettempdir(), f"e2e-multigpu-perhead-rank{rank}.plan.safetensors")
    plan.save(plan_path)
    density = plan.sites["attn1"].blocks.float().mean((1, 2)).tolist()
    model_name = "smoke" if args.smoke else args.model
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", world_size=world, torch=torch.__version__,
                model=model_name, config=spec["config"], latent=spec["latent"], text=spec["text"],
                window=spec["window"], block_size=spec["block"], reps=args.reps, compile="regional",
                per_head_plan=dict(plan.info, density=density,
                                   rank_loads_contiguous=rank_loads(density, list(range(len(density))), world),
                                   rank_loads_balanced=rank_loads(density, balanced_heads(density, world), world)))
    results = {}
    out_path = os.path.join(os.environ.get("OUT", "."), f"e2e-multigpu-{model_name}.json")

    def save():
        if rank == 0:
            speedups(results)
            with open(out_path, "w") as f:
                json.dump(dict(meta, results=results), f, indent=1)

    outs_1gpu = {}
    if "1gpu" in args.phases:
        outs_1gpu = run_phase("1gpu", model, spec, inputs, plan_path, args, {}, results, save)
    if "ulysses" in args.phases:
        from diffusers import ContextParallelConfig

        # diffusers 0.42.1's context-parallel hook logs Wan's 1-D timestep (not split) with
        # logger.warning_once, which only exists once transformers has added it to logging.Logger
        # (its pipelines import transformers; this script does not): the same, added here
        if not hasattr(logging.Logger, "warning_once"):
            logging.Logger.warning_once = functools.lru_cache(None)(logging.Logger.warning)
        # diffusers picks its device as rank % accelerator count, which a CPU-only machine has 0 of
        cpu_device = mock.patch("torch.accelerator.device_count", return_value=1) if args.smoke else nullcontext()
        with cpu_device:
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        run_phase(f"ulysses{world}", model, spec, inputs, plan_path, args, outs_1gpu, results, save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
