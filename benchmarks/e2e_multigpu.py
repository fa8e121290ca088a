"""A video DiT from benchmarks/e2e.py on one GPU and on n through diffusers' context parallelism
(Ulysses, or ring × Ulysses), Inductor dense against backend="compact" (a window plan, a per-head plan).

    # issue #17: Wan2.1-14B 720p 81 frames, 1 GPU and Ulysses 2
    torchrun --nproc_per_node 2 benchmarks/e2e_multigpu.py --model wan14b --steps 10 --dense-steps 2
    # issue #19: 8 GPUs, Ulysses 8 and ring 2 × Ulysses 4, Wan2.1-14B and HunyuanVideo 13B 129 frames
    torchrun --nproc_per_node 8 benchmarks/e2e_multigpu.py --model wan14b --steps 10 --dense-steps 2
    torchrun --nproc_per_node 8 benchmarks/e2e_multigpu.py --model wan14b --ring 2 --ulysses 4 --phases parallel \
        --steps 10 --dense-steps 2
    torchrun --nproc_per_node 8 benchmarks/e2e_multigpu.py --model hunyuan13b-129f --steps 10 --dense-steps 2
    # with a calibrated plan (per-layer sites: the per-head variant compiles the whole model): a plan
    # file, or one calibrated here on the random-weight model at a density budget (--calibrate 0.1)
    torchrun --nproc_per_node 8 benchmarks/e2e_multigpu.py --model wan14b --plan wan14b.plan.safetensors ...
    torchrun --nproc_per_node 2 benchmarks/e2e_multigpu.py --model wan14b --calibrate 0.1 --variants perhead
    # the same in two calls of under 10 minutes each, one phase per call (--state keeps what the second needs)
    torchrun --nproc_per_node 2 benchmarks/e2e_multigpu.py --model wan14b --calibrate 0.1 --variants perhead \
        --phases 1gpu --state .bench_state
    torchrun --nproc_per_node 2 benchmarks/e2e_multigpu.py --model wan14b --variants perhead --phases parallel \
        --state .bench_state
    # CPU smoke test (a tiny model of the family, gloo): the same code paths, nothing timed that matters
    torchrun --nproc_per_node 2 benchmarks/e2e_multigpu.py --smoke --model wan14b
    torchrun --nproc_per_node 4 benchmarks/e2e_multigpu.py --smoke --model wan14b --ring 2 --ulysses 2

Random weights (they do not change speed), bf16, the model built by benchmarks/e2e.py from diffusers'
config. The repeated transformer blocks are compiled (diffusers' compile_repeated_blocks: one graph
for all blocks compiles in tens of seconds, the whole model takes minutes per variant). One process
per GPU, two phases (--phases):

  1gpu      every rank runs the model alone on its own GPU (rank 0's numbers are the result, the
            others more samples); skip it (--phases parallel) where one GPU cannot hold the model;
  parallel  the model after `enable_parallelism(ContextParallelConfig(ulysses_degree=N, ring_degree=M))`,
            N·M = world size (--ulysses, --ring; default Ulysses = world size). Ulysses: each rank holds
            1/N of the tokens, each attention the whole sequence for H/N heads, after an all-to-all the
            compiled graph holds. Ring (M > 1) needs an attention backend returning the log-sum-exp
            (--ring-backend, default diffusers' _native_cudnn): compact leaves those calls dense and
            says so in its report, recorded per phase as `attention_sites` (kind, rewritten, reason).

Variants: `inductor-dense-regional`; `compact-window-regional`, the window plan at e2e's window for the
model; the per-head plan: `--plan PATH`, a calibrated plan file (`compact-perhead`, whole model: its
sites are per layer, which regional graphs cannot take), else `compact-perhead-regional`, a SYNTHETIC
plan, head i the window PER_HEAD_WINDOWS[i % 4] (uncalibrated: what the per-head path costs, not a
plan's quality). `--calibrate D`: rank 0 calibrates the model as built (random weights, so the plan is
what Compact Attention's search makes of near-uniform attention at a budget of D of the blocks: its
speed and per-head shape are real, its quality means nothing), one forward at the timed timestep,
and every rank runs that plan. --variants picks which of dense, window and per-head run. Before enable_parallelism, `compact_compile.balance_heads(model, plan, ranks=N)`
permutes the heads so that the ranks' head groups carry the same work (--no-balance, or a model it
refuses: diffusers' split); the per-rank loads (summed block density) before and after are in the JSON.

Per variant and phase: first call s (compile and one forward), forward ms (median of --reps calls
after a warm one, CUDA events, the ranks started together by a barrier; a step takes the slowest
rank's time), with --steps a denoising loop (e2e.denoise: --steps Euler steps, compact variants dense
for the first --dense-steps, the step clock fed from the model's timestep since the block graphs do
not see it) in s, the compact report (sites rewritten, density, kernel, model heads per rank, each
attention site's kind and reason), and the output's relative difference to the same variant on one
GPU (when 1gpu ran) and to the phase's dense output. Forward ms and outputs are taken at a sparse step.
Writes $OUT/e2e-multigpu-<model>-<layout>.json after every variant.

HunyuanVideo: diffusers 0.42.1 gives it no context-parallel plan (`_cp_plan`), and its joint
attention (video tokens, then text, with the prompt's key-padding mask) under Ulysses needs the text
kept whole on every rank and appended after the all-to-all (xDiT's "rear" joint strategy), which
diffusers' templated attention does not do; hunyuan_context_parallel.py does it (Ulysses
only: with a ring the parallel phase stops with an error). On the CPU (fp32, eager) its output equals
the 1-GPU model's exactly. compact rewrites its joint attention with the window plan there, but does
not prove the head split through JointUlysses' two all-to-alls: the per-head variant's joint sites
stay dense, with "plan does not fit site 'attn': heads H in the plan, H/N in the model" in
`attention_sites` (its 1-GPU numbers are per-head as usual).
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
from compact_compile.balance import rank_loads
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import video_site_blocks, window_blocks
from compact_compile.plan import Plan, SitePlan
from compact_compile.schedule import at_step
from hunyuan_context_parallel import JointUlysses, hunyuan_cp_plan
from timing import rel_diff

PER_HEAD_WINDOWS = [(1, 3, 3), (3, 3, 3), (3, 5, 5), (5, 7, 7)]
BLOCK = 128
DENSE = "inductor-dense-regional"
# tiny models of each family for the CPU: 3×8×8 = 192 video tokens, 4 heads of 16, 64-token blocks
SMOKE = {
    "WanTransformer3DModel": dict(
        window=(1, 3, 3), latent=(1, 4, 3, 16, 16), text=(1, 16, 32), block=64,
        config=dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)),
    "HunyuanVideoTransformer3DModel": dict(
        window=(1, 3, 3), latent=(1, 4, 3, 16, 16), text=(1, 16, 32), prompt_tokens=10, block=64,
        config=dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
                    rope_axes_dim=(4, 6, 6))),
}
VARIANT_KIND = {DENSE: "dense", "compact-window-regional": "window", "compact-perhead": "perhead",
                "compact-perhead-regional": "perhead"}
SELF_ATTENTION = {"WanTransformer3DModel": "attn1", "HunyuanVideoTransformer3DModel": "attn"}


def variants(plan_path, calibrated, strict, dense_steps):
    """name → torch.compile keyword arguments, in e2e.compiled's terms ("WINDOW": the model's window).
    Not strict: a per-head plan's masks for sites that stay dense are dropped with a warning and a
    report entry, not refused (under a ring every self-attention is a ring site; HunyuanVideo's
    text-only refiner attention also ends with `attn`, the synthetic plan's site)."""
    perhead = dict(plan=plan_path, strict=strict)
    if not calibrated:
        perhead["dense_steps"] = dense_steps
    return {DENSE: dict(backend="inductor"),
            "compact-window-regional": dict(backend="compact", options=dict(plan="window", window="WINDOW",
                                                                            dense_steps=dense_steps)),
            "compact-perhead" + ("" if calibrated else "-regional"): dict(backend="compact", options=perhead)}


def synthetic_per_head_plan(spec, block):
    """One per-head mask for every layer's self-attention (the site each block's attention module path
    ends with): head i the window PER_HEAD_WINDOWS[i % 4] in tiles. Uncalibrated: for timing only."""
    grid, cfg = e2e.grid_of(spec), spec["config"]
    n_text = spec["text"][1] if spec["cls"] == "HunyuanVideoTransformer3DModel" else 0   # joint, text last
    layout = TokenLayout(grid, auto_tile(grid, block), block, n_text, 0)
    windows = [video_site_blocks(layout, window_blocks(layout, w)) for w in PER_HEAD_WINDOWS]   # text: dense
    heads = cfg["num_attention_heads"]
    blocks = torch.stack([windows[i % len(windows)] for i in range(heads)])
    site = SitePlan(heads, cfg["attention_head_dim"], layout.seq_len, n_text, 0, blocks)
    return Plan(grid, layout.tile, block, {SELF_ATTENTION[spec["cls"]]: site},
                info=dict(synthetic=f"head i: window {PER_HEAD_WINDOWS}[i % {len(windows)}], not calibrated"))


def loads(plan, ranks):
    """Per rank, the summed density of the heads it holds under diffusers' contiguous split, over all
    per-head sites of `plan` (a head's attention costs about its density)."""
    total = [0.0] * ranks
    for site in plan.sites.values():
        if site.blocks.shape[0] > 1:
            cost = site.blocks.float().mean((1, 2)).tolist()
            total = [a + b for a, b in zip(total, rank_loads(cost, range(len(cost)), ranks))]
    return total


def gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def attention_sites(report):
    """Count of the report's sites by (kind, rewritten, reason): what ran sparse and what did not, why."""
    count = {}
    for s in report.sites:
        key = (s["kind"], s["rewritten"], s.get("kernel") if s["rewritten"] else s.get("reason"))
        count[key] = count.get(key, 0) + 1
    return [dict(kind=k, rewritten=r, kernel_or_reason=why, sites=n) for (k, r, why), n in count.items()]


def measure(model, spec, inputs, name, kwargs, args, sync):
    """First call s, forward ms, loop s and output of the model compiled as variant `name`."""
    x, t, text = inputs
    m = e2e.compiled(model, name, spec, args.dense_steps, {name: kwargs})
    call = functools.partial(e2e.forward, m, spec, x, t, text)
    r = {}
    with at_step(args.dense_steps):        # a sparse step: the constant timestep would be step 0
        dist.barrier()
        t0 = time.time()
        out = call()
        sync()
        r["first_call_s"] = time.time() - t0
        call()
        r["ms"] = e2e.event_ms(call, args.reps, before=dist.barrier)
    if args.steps:
        e2e.denoise(m, spec, x, text, args.steps)                # warm: the dense steps' paths
        dist.barrier()
        sync()
        t0 = time.time()
        e2e.denoise(m, spec, x, text, args.steps)
        sync()
        r["loop_s"] = time.time() - t0
    return r, out


def run_phase(phase, model, spec, inputs, plan_path, args, outs_1gpu, results, save, ring=False):
    outs, sync = {}, (torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None))
    strict = not ring and (bool(args.plan) or spec["cls"] != "HunyuanVideoTransformer3DModel")
    for name, kwargs in variants(plan_path, bool(args.plan), strict, args.dense_steps).items():
        if VARIANT_KIND[name] not in args.variants:
            continue
        torch._dynamo.reset()
        compact_compile.report(clear=True)
        with torch.no_grad():
            r, outs[name] = measure(model, spec, inputs, name, kwargs, args, sync)
        report = compact_compile.report()
        rewritten = [s for s in report.sites if s["rewritten"]]
        r = {k: gathered(v) for k, v in r.items()}
        r.update(step_ms=max(r["ms"]), model_heads=gathered(rewritten[0].get("model_heads") if rewritten else None),
                 attention_sites=attention_sites(report))
        if "loop_s" in r:
            r["step_loop_s"] = max(r["loop_s"])
        r.update(e2e.describe(name, outs))
        if name in outs_1gpu:
            r["rel_diff_vs_1gpu"] = gathered(rel_diff(outs[name], outs_1gpu[name]))
            if name != DENSE and DENSE in outs_1gpu:
                r["rel_diff_vs_1gpu_dense"] = gathered(rel_diff(outs[name], outs_1gpu[DENSE]))
        results.setdefault(phase, {})[name] = r
        save()
        if dist.get_rank() == 0:
            print(phase, name, json.dumps(r), flush=True)
        e2e.uncompile_blocks(model)
    return outs


def speedups(results):
    """Each variant's step time against its phase's dense one and against the same variant on 1 GPU."""
    for phase, rows in results.items():
        for name, r in rows.items():
            if DENSE in rows:
                r["speedup_vs_phase_dense"] = rows[DENSE]["step_ms"] / r["step_ms"]
            if phase != "1gpu" and name in results.get("1gpu", {}):
                r["speedup_vs_1gpu"] = results["1gpu"][name]["step_ms"] / r["step_ms"]
                if "loop_s" in r:
                    r["loop_speedup_vs_1gpu"] = results["1gpu"][name]["step_loop_s"] / r["step_loop_s"]


def calibrated_plan(model, spec, inputs, density, path):
    """Rank 0 calibrates `model` (one forward, dense attention recording block mass) at a density budget
    and saves the plan to `path`; every rank returns it. Calibration time in the plan's info."""
    if dist.get_rank() == 0:
        t0 = time.time()
        with torch.no_grad(), compact_compile.calibrate(model, density=density, dense_steps=0, inner="aot_eager",
                                                        options=dict(block_size=spec["block"])) as cal:
            e2e.forward(model, spec, *inputs)
        plan = cal.plan
        plan.info.update(calibrated=f"random weights, density budget {density}, one forward",
                         calibrate_s=round(time.time() - t0, 1))
        plan.save(path)
        torch._dynamo.reset()
    dist.barrier()
    return Plan.load(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan14b", choices=["wan14b", "hunyuan13b-129f", "hunyuan13b", "wan1.3b"])
    ap.add_argument("--ulysses", type=int, help="Ulysses degree (default: world size / ring)")
    ap.add_argument("--ring", type=int, default=1, help="ring degree")
    ap.add_argument("--ring-backend", default="_native_cudnn", help="diffusers attention backend for a ring")
    ap.add_argument("--phases", nargs="*", default=["1gpu", "parallel"], choices=["1gpu", "parallel"])
    ap.add_argument("--plan", help="a calibrated plan file for the per-head variant (default: a synthetic one)")
    ap.add_argument("--calibrate", type=float, metavar="DENSITY",
                    help="calibrate the per-head plan here at this density budget (instead of --plan)")
    ap.add_argument("--variants", nargs="*", choices=["dense", "window", "perhead"],
                    default=["dense", "window", "perhead"], help="which variants run (default: all three)")
    ap.add_argument("--no-balance", dest="balance", action="store_false", help="keep diffusers' head split")
    ap.add_argument("--reps", type=int, default=3, help="timed forwards per variant (after one warm)")
    ap.add_argument("--steps", type=int, default=0, help="denoising-loop steps (0: no loop)")
    ap.add_argument("--dense-steps", type=int, default=0, help="compact variants: the first N steps dense")
    ap.add_argument("--smoke", action="store_true", help="a tiny model of the family on the CPU over gloo")
    ap.add_argument("--state", metavar="DIR", help="the 1gpu phase saves its per-head plan, outputs and results "
                    "here; a later run without it (--phases parallel) takes them from here (two calls, one phase each)")
    args = ap.parse_args()
    if args.state and "1gpu" not in args.phases and (args.plan or args.calibrate is not None):
        ap.error("--state without the 1gpu phase takes the per-head plan that phase used: no --plan/--calibrate")
    if args.plan and args.calibrate is not None:
        ap.error("give --plan or --calibrate, not both")
    if args.calibrate is not None and not (0 < args.calibrate <= 1 and "perhead" in args.variants):
        ap.error("--calibrate DENSITY: a density in (0, 1], for the per-head variant (--variants … perhead)")

    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # long enough for a phase's compile on one rank while the others wait at a barrier
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    ulysses = args.ulysses or world // args.ring
    if ulysses * args.ring != world:
        ap.error(f"ulysses {ulysses} × ring {args.ring} != world size {world}")
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    spec = dict(e2e.MODELS[args.model], block=BLOCK)
    if args.smoke:
        spec = dict(SMOKE[spec["cls"]], cls=spec["cls"])
    model, x, text = e2e.build(spec, device)
    spec["extra"] = e2e.extra_inputs(spec, device)
    inputs = (x, torch.tensor([500], device=device), text)
    # the block graphs do not see the timestep: feed the step clock from the model's own call
    compact_compile.follow_steps(model)

    state = args.state and os.path.join(args.state, ("smoke-" if args.smoke else "") + args.model)
    saved = None
    same_run = dict(world=world, steps=args.steps, dense_steps=args.dense_steps, reps=args.reps,
                    variants=sorted(args.variants))     # what the two calls of one --state run must share
    if state and "1gpu" not in args.phases:   # the 1gpu phase ran in an earlier call: its plan, outputs, results
        saved = torch.load(f"{state}-1gpu-rank{rank}.pt", map_location=device, weights_only=False)
        if saved["run"] != same_run:
            ap.error(f"--state {args.state}: its 1gpu phase ran with {saved['run']}, this call has {same_run}")
        plan, args.plan = Plan.load(f"{state}-perhead.plan.safetensors"), saved["plan_source"]
    elif args.calibrate is not None:
        plan = calibrated_plan(model, spec, inputs, args.calibrate,
                               os.path.join(tempfile.gettempdir(), "e2e-multigpu-calibrated.plan.safetensors"))
        args.plan = "calibrated here"
    else:
        plan = Plan.load(args.plan) if args.plan else synthetic_per_head_plan(spec, spec["block"])
    if args.plan and not any("." in site for site in plan.sites):
        ap.error("--plan: expected a calibrated plan with per-layer sites (the variant compiles the whole model)")
    plan_path = os.path.join(tempfile.gettempdir(), f"e2e-multigpu-perhead-rank{rank}.plan.safetensors")
    plan.save(plan_path)
    layout = f"ring{args.ring}xulysses{ulysses}" if args.ring > 1 else f"ulysses{ulysses}"
    model_name = ("smoke-" if args.smoke else "") + args.model + ("-calibrated" if args.plan else "")
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", world_size=world, ulysses=ulysses,
                ring=args.ring, torch=torch.__version__, model=model_name, config=spec["config"],
                latent=spec["latent"], text=spec["text"], window=spec["window"], block_size=spec["block"],
                reps=args.reps, steps=args.steps, dense_steps=args.dense_steps,
                compile="regional" + (" (the calibrated per-head plan: whole model)" if args.plan else ""),
                per_head_plan=dict(plan.info, path=args.plan, balance=args.balance,
                                   rank_loads_contiguous=loads(plan, ulysses)))
    results = {}
    out_path = os.path.join(os.environ.get("OUT", "."), f"e2e-multigpu-{model_name}-{layout}.json")

    def save():
        if rank == 0:
            speedups(results)
            with open(out_path, "w") as f:
                json.dump(dict(meta, results=results), f, indent=1, default=str)

    outs_1gpu = {}
    if saved:
        outs_1gpu, results["1gpu"] = saved["outs"], saved["results"]
        meta["1gpu_phase"] = f"an earlier call (--state {args.state})"
    if "1gpu" in args.phases:
        outs_1gpu = run_phase("1gpu", model, spec, inputs, plan_path, args, {}, results, save)
        if state:
            os.makedirs(args.state, exist_ok=True)
            plan.save(f"{state}-perhead.plan.safetensors")
            torch.save(dict(outs=outs_1gpu, results=results["1gpu"], plan_source=args.plan, run=same_run),
                       f"{state}-1gpu-rank{rank}.pt")
    if "parallel" in args.phases:
        if args.balance and "perhead" in args.variants:
            try:    # refused as a whole (the model unchanged) where a module's heads cannot move
                plan = compact_compile.balance_heads(model, plan, ranks=ulysses)
                meta["per_head_plan"].update(rank_loads_balanced=loads(plan, ulysses),
                                             head_permutations=plan.info["head_permutations"])
                plan.save(plan_path)
            except compact_compile.PlanError as e:
                meta["per_head_plan"]["balance"] = f"refused, diffusers' split kept: {e}"
        enable_parallelism(model, spec, ulysses, args)
        with torch.no_grad():   # diffusers' split hook reads the blocks' signature on its first call, which
            e2e.forward(model, spec, *inputs)   # would break a whole-model graph compiled around it
        run_phase(layout, model, spec, inputs, plan_path, args, outs_1gpu, results, save, ring=args.ring > 1)
    # every rank past its last collective before any tears gloo down: a rank leaving first aborted its
    # peer once in CI (SIGABRT in the smoke test's gloo teardown; it passed 11 runs alone after)
    dist.barrier()
    dist.destroy_process_group()


def enable_parallelism(model, spec, ulysses, args):
    from diffusers import ContextParallelConfig
    from diffusers.models import attention_dispatch

    # diffusers 0.42.1's context-parallel hook logs Wan's 1-D timestep (not split) with
    # logger.warning_once, which only exists once transformers has added it to logging.Logger
    # (its pipelines import transformers; this script does not): the same, added here
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = functools.lru_cache(None)(logging.Logger.warning)
    hunyuan = spec["cls"] == "HunyuanVideoTransformer3DModel"
    if hunyuan and args.ring > 1:
        raise SystemExit("HunyuanVideo: ring attention over its joint text+video sequence is not implemented here "
                         "(diffusers 0.42.1 has no context-parallel plan for it); use Ulysses only")
    if args.ring > 1:
        backend = args.ring_backend
        if args.smoke:   # aten's cuDNN / flash ops have no CPU kernel: diffusers' flash template on aten's CPU op
            backend = "_native_flash"
            attention_dispatch._native_flash_attention_forward_op = cpu_flash_forward_op
        model.set_attention_backend(backend)
    # diffusers picks its device as rank % accelerator count, which a CPU-only machine has 0 of
    with mock.patch("torch.accelerator.device_count", return_value=1) if args.smoke else nullcontext():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=args.ring),
                                 cp_plan=hunyuan_cp_plan() if hunyuan else None)
    if hunyuan:
        JointUlysses.install(spec["text"][1], ulysses, dist.get_rank())     # Ulysses only: the global rank


def cpu_flash_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' forward op for its ring and Ulysses templates on aten's CPU flash attention (smoke only)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *(t.transpose(1, 2) for t in (query, key, value)), dropout_p, is_causal, scale=scale)[:2]
    out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    return (out, lse) if return_lse else out


if __name__ == "__main__":
    main()
