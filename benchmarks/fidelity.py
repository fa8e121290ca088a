"""How much quality does each sparse mode keep? Generate with dense attention and with every sparse
mode from the same noise on the trained video DiTs (examples/video_dit), and compare.

    python benchmarks/fidelity.py [--models short,long] [--checkpoint PATH ...]
                                  [--videos 8 --steps 20 --cfg 3 --dense-steps 4] [--block-size 64]
                                  [--modes NAME ...] [--points N] [--minutes M] [--no-gif] [--device cuda|cpu]

Per mode and sweep point: PSNR and SSIM (torchmetrics) of every video against the dense one, the
per-layer attention-output relative error (each site's sparse output vs dense attention on the same
q/k/v, along the sparse run's own trajectory), and the achieved sparsity counted honestly (dense
warm-up steps and dense layers count as dense) and over the sparse steps only. The rewrite's noise
floor (plan="dense": every site rewritten, attention dense in tile order) is stated beside it.
The sites are measured as users get them: the observer (fidelity_probe.py) wraps each site's runtime
and calls it the way the rewritten graph does (fused rectification, in-graph merges, FP8 tiles).
FP8 modes ("<mode> + FP8": that mode with fp8_attention=True) are paired with their bf16 counterpart
at the same plan, which is run first (recorded under its own name) unless it ran already: besides
the above, an FP8 point gives PSNR/SSIM against the counterpart's videos (`*_vs_bf16_sparse`) and
per site the relative error of the FP8 output against the site's output in the inputs' dtype on
the same q, k, v, over every step (`layer_error_vs_bf16_sparse`).
Writes, per model, $OUT/<model>/fidelity.json, fidelity_pareto.png, and a strip + GIF of dense vs
the best sparse mode (a GPU call brings back 8 files: two models with --no-gif leave room for a log).

Cost: every sweep point compiles the model afresh and samples `--videos` clips for `--steps` steps at
batch 2·videos (CFG), measuring every attention call against dense. Estimated for an H200 (not yet
measured there): compiling (Dynamo, the backend's passes, aot_eager) is 3–5 s whatever the length
(2–4 s for the 6-layer model on a 2-core CPU); a forward at 16 clips costs ~40 ms at 4096 tokens
and ~160 ms at 16,384 (sparse attention plus the probe's dense reference, ~26 TFLOP, and unfused
elementwise work), so 20 steps add ~1 s (short) or ~3 s (long): ~6 s per point for short, ~9 s
for long. Per model add the dense reference, the floor, one calibration (~10 s) and, at the first
use of each kernel variant and sequence-length bucket, Triton's JIT and autotuning (~30–60 s).
The whole MODES table (40 runs per model, 6 of them FP8) is then ~6 min for short and ~7 for long:
too much for one 9-minute call with both. Five modes at `--points 3` (16 runs per model) come to
~3 + ~3.5 min. `--points N` keeps N values of each mode's sweep (spread from its first to its last),
`--modes` a subset of modes (in the order given), and `--minutes` stops starting points that would
not finish in time (they are listed under "skipped"), sharing the time between the models; every
point's `wall_s` is recorded, so the next run's budget can be set from measurements. An FP8 point
costs its own run plus, where it did not run already, its counterpart's (two FP8 modes at
`--points 2`: 8 runs per model), and its kernels' first JIT and autotuning (FP8 and the probe's
bf16 reference on our Triton kernel, with and without the rectified epilogue).

Adding a mode is one line in MODES: name → (backend options, swept option, values).
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compact_compile  # noqa: E402
from compact_compile import CompactOptions  # noqa: E402
from benchmarks.fidelity_probe import Probe, mean  # noqa: E402
from examples.video_dit.model import MODEL_NAMES, from_name, load_model  # noqa: E402
from examples.video_dit.sample import fixed_noise, sample, save_gif, save_strip  # noqa: E402

DEFAULTS = "defaults (no options)"
CALIBRATED = "calibrated"   # stands for the plan calibrated in this run, searched at the swept recall τ
# alone (λ = ∞): the default cost limit λ = 0.011 stops this small model's search near dense at every τ;
# or, swept by "density", at that budget (build.py: one λ for all heads, found by bisection)
MODES = {
    "window (STA-like)": (dict(plan="window", rectify=False), "window", [(1, 1, 1), (1, 3, 3), (3, 3, 3), (3, 5, 5)]),
    "top-k, no rectification": (dict(plan="dynamic", rectify=False), "p_remain", [0.3, 0.5, 0.7, 0.9]),
    "dynamic + rectified": (dict(plan="dynamic", rectify=True), "p_remain", [0.3, 0.5, 0.7, 0.9]),
    "calibrated": (dict(plan=CALIBRATED, rectify=False), "recall", [0.7, 0.8, 0.9, 0.95]),
    "calibrated + rectified": (dict(plan=CALIBRATED, rectify=True), "recall", [0.7, 0.8, 0.9, 0.95]),
    "calibrated at a density budget": (dict(plan=CALIBRATED, rectify=False), "density", [0.5, 0.3, 0.2, 0.1]),
    "calibrated at a density budget + rectified": (dict(plan=CALIBRATED, rectify=True), "density",
                                                   [0.5, 0.3, 0.2, 0.1]),
    "window + rectified": (dict(plan="window", rectify=True), "window", [(1, 1, 1), (1, 3, 3), (3, 3, 3)]),
    "calibrated ∪ top-k + rectified": (dict(plan=CALIBRATED, dynamic=True, rectify=True), "recall", [0.7, 0.8]),
    "window (STA-like) + FP8": (dict(plan="window", rectify=False, fp8_attention=True), "window", [(1, 3, 3), (3, 3, 3)]),
    "dynamic + rectified + FP8": (dict(plan="dynamic", rectify=True, fp8_attention=True), "p_remain", [0.5, 0.9]),
    "calibrated + rectified + FP8": (dict(plan=CALIBRATED, rectify=True, fp8_attention=True), "recall", [0.8, 0.95]),
    "dynamic + rectified, warm-up steps": (dict(plan="dynamic", rectify=True), "dense_steps", [0, 2, 4, 10]),
    "window + rectified, warm-up steps": (dict(plan="window", rectify=True), "dense_steps", [0, 2, 4, 10]),
    # what `backend="compact"` with no options does: nothing swept, nothing of this harness's set
    DEFAULTS: (dict(block_size=None), None, [None]),   # None: the backend's own block size, not the harness's
}
FP8 = " + FP8"   # an FP8 mode is named after its bf16 counterpart: the same options, fp8_attention=True
FLOOR = {"dense plan": dict(plan="dense")}   # rewritten sites, every block: the dense kernel in tile order
BLOCK_SIZE = 64    # 4×4×4 tiles: the short model's 16×16×16 grid has 64 blocks per row, the long one's 256


def quality(videos, reference):
    """Per video: PSNR (dB, on [0, 1]) and SSIM (torchmetrics, frames as images) against `reference`."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    out = []
    for a, b in zip(videos, reference):
        a, b = (a + 1) / 2, (b + 1) / 2
        mse = (a - b).pow(2).mean().item()
        frames = lambda x: x.permute(1, 0, 2, 3)   # noqa: E731  [3, T, H, W] → [T, 3, H, W]
        out.append(dict(psnr=10 * math.log10(1 / mse) if mse > 0 else float("inf"),
                        ssim=ssim(frames(a), frames(b), data_range=1.0).item()))
    return out


def generate(model, options, noise, labels, args, dense_steps):
    """Videos from `model` compiled with the compact backend and `options` (block size: this harness's
    unless `options` set one), and its probe summary with the first `dense_steps` steps as warm-up."""
    torch._dynamo.reset()
    compact_compile.report(clear=True)
    probe = Probe()
    fast = torch.compile(model, backend="compact", dynamic=False,
                         options=dict(dict(block_size=args.block_size), **options, observer=probe, inner="aot_eager"))
    videos = sample(fast, noise, labels, steps=args.steps, cfg=args.cfg, shift=args.shift)
    return videos, probe.summary(dense_steps)


def calibrate_plan(model, config, args):
    """A Compact Attention calibration on other noise and labels than the evaluation's."""
    labels = torch.arange(args.videos, 2 * args.videos) % 10
    noise = fixed_noise(args.videos, config.frames, config.size, seed=1000, device=args.device,
                        dtype=dtype_on(args.device))
    t0 = time.time()
    with compact_compile.calibrate(model, dense_steps=args.dense_steps, inner="aot_eager",
                                   options=dict(block_size=args.block_size)) as cal:
        sample(model, noise, labels, steps=args.steps, cfg=args.cfg, shift=args.shift)
    print(f"calibrated in {time.time() - t0:.1f} s", flush=True)
    return cal


def sweep(modes, max_points):
    """(mode name, its options, swept option, value) for every point, at most `max_points` values of
    each mode's sweep, spread from its first value to its last."""
    for name, (options, swept, values) in modes.items():
        if max_points is not None and max_points < len(values):
            keep = sorted({round(i * (len(values) - 1) / max(1, max_points - 1)) for i in range(max_points)})
            values = [values[i] for i in keep]
        for value in values:
            yield name, options, swept, value


def run_model(config, checkpoint, args, out: Path, deadline: float):
    """The whole comparison for one model; writes out/fidelity.json (after every point, so a run cut
    short keeps what it measured), the Pareto plot, strip and GIF."""
    t_model = time.time()
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(checkpoint, device=args.device, dtype=dtype_on(args.device))
    labels = torch.arange(args.videos) % 10
    noise = fixed_noise(args.videos, config.frames, config.size, seed=0, device=args.device,
                        dtype=dtype_on(args.device))
    modes = {name: MODES[name] for name in (args.modes or MODES)}
    t0 = time.time()
    dense = sample(model, noise, labels, steps=args.steps, cfg=args.cfg, shift=args.shift)
    result = dict(model=config.name, grid=config.grid, tokens=config.tokens, dense_wall_s=round(time.time() - t0, 1),
                  device=torch.cuda.get_device_name() if args.device == "cuda" else "CPU", torch=torch.__version__,
                  checkpoint=str(checkpoint), videos=args.videos, steps=args.steps, cfg=args.cfg, shift=args.shift,
                  dense_steps=args.dense_steps, block_size=args.block_size, floor={}, modes={}, skipped=[])
    point_s = []    # wall time of each compiled run so far: what the next one is expected to take

    def time_left():
        return not point_s or time.time() + sum(point_s) / len(point_s) <= deadline

    for name, options in FLOOR.items():
        t0 = time.time()
        videos, _ = generate(model, options, noise, labels, args, dense_steps=0)
        point_s.append(time.time() - t0)
        result["floor"][name] = dict(summarize(quality(videos, dense)), wall_s=round(point_s[-1], 1))
        print(config.name, name, result["floor"][name], flush=True)
    calibrated = any(options.get("plan") == CALIBRATED for options, _, _ in modes.values())
    t0 = time.time()
    cal = calibrate_plan(model, config, args) if calibrated and time_left() else None
    result["calibration_wall_s"] = round(time.time() - t0, 1) if cal is not None else None
    best = None     # (PSNR, label, videos) of the strip's mode
    bf16_videos = {}    # (mode, value) → videos, for the modes some FP8 mode is compared with
    paired = {name.removesuffix(FP8) for name in modes if name.endswith(FP8)}

    def run_point(name, options, swept, value, bf16=None):
        """Generate and record one point; its videos (None if skipped). `bf16`: the videos of the FP8
        mode's bf16 counterpart at the same plan, which the point is also compared with."""
        nonlocal best
        if not time_left() or (options.get("plan") == CALIBRATED and cal is None):
            result["skipped"].append(f"{name}, {swept}={value}")
            return None
        t0 = time.time()
        opts = dict(options)
        if opts.get("plan") == CALIBRATED:     # the plan carries the calibration's schedule
            opts["plan"] = (cal.search(density=value) if swept == "density"
                            else cal.search(recall=value, cost=math.inf))
            dense_steps = args.dense_steps
        elif swept is None:                    # the options as they are, the backend's defaults for the rest
            dense_steps = CompactOptions(**opts).warmup_steps
        else:
            opts = dict({"dense_steps": args.dense_steps}, **opts, **{swept: value})
            dense_steps = opts["dense_steps"]
        videos, probe = generate(model, opts, noise, labels, args, dense_steps)
        point_s.append(time.time() - t0)
        # the swept value under its own name; a density budget's as "density_budget" (the probe's "density"
        # is the density achieved)
        setting = {} if swept is None else {"density_budget" if swept == "density" else swept: value}
        setting["dense_steps"] = dense_steps
        point = dict(setting, **probe, **summarize(quality(videos, dense)), wall_s=round(point_s[-1], 1))
        if bf16 is not None:
            point.update({f"{k}_vs_bf16_sparse": v for k, v in summarize(quality(videos, bf16)).items()})
        result["modes"].setdefault(name, []).append(point)
        print(config.name, name, json.dumps({k: v for k, v in point.items() if not isinstance(v, (dict, list))}),
              flush=True)
        if 1 - point["density"] >= args.strip_sparsity and (best is None or point["psnr"] > best[0]):
            best = (point["psnr"], name if swept is None else f"{name}, {swept}={value}", videos)
        (out / "fidelity.json").write_text(json.dumps(result, indent=1))
        return videos

    for name, options, swept, value in sweep(modes, args.points):
        if (name, value) in bf16_videos:     # run already, as an FP8 mode's counterpart
            continue
        bf16 = None
        if name.endswith(FP8):   # its bf16 counterpart first (recorded under its own name), unless run already
            bf16_name = name.removesuffix(FP8)
            if (bf16_name, value) not in bf16_videos:
                bf16_videos[bf16_name, value] = run_point(bf16_name, MODES[bf16_name][0], swept, value)
            bf16 = bf16_videos[bf16_name, value]
            if bf16 is None:
                result["skipped"].append(f"{name}, {swept}={value}")
                continue
        videos = run_point(name, options, swept, value, bf16)
        if name in paired:
            bf16_videos[name, value] = videos
    if result["skipped"]:
        print(f"{config.name}: out of time, skipped {len(result['skipped'])} points", flush=True)
    pareto_plot(result, out / "fidelity_pareto.png")
    if best is not None:
        shown = range(min(3, args.videos))
        rows = {}
        for i in shown:
            rows[f"dense #{i}"] = dense[i]
            rows[f"sparse #{i}"] = best[2][i]          # which mode: result["strip"]
        save_strip(rows, out / "fidelity_strip.png")
        if args.gif:
            save_gif({"dense": torch.cat([dense[i] for i in shown], -1),
                      "sparse": torch.cat([best[2][i] for i in shown], -1)}, out / "fidelity.gif")
        result["strip"] = best[1]
    result["wall_s"] = round(time.time() - t_model, 1)
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    print(f"{config.name}: {result['wall_s']} s, wrote {out}", flush=True)
    return result


def run(args):
    """Every model of args.models in turn, each in $OUT/<model>/, sharing args.minutes between them
    (time one model leaves unused goes to the next)."""
    out = Path(os.environ.get("OUT", "."))
    start = time.time()
    budget = math.inf if args.minutes is None else args.minutes * 60
    for i, (name, checkpoint) in enumerate(zip(args.models, args.checkpoint)):
        share = (budget - (time.time() - start)) / (len(args.models) - i)
        config = from_name(name)
        run_model(config, checkpoint, args, out / name, deadline=time.time() + share)


def dtype_on(device):
    return torch.bfloat16 if device == "cuda" else torch.float32   # bf16 matmuls crawl on CPUs


def summarize(per_video):
    return dict(psnr=mean(v["psnr"] for v in per_video), psnr_min=min(v["psnr"] for v in per_video),
                ssim=mean(v["ssim"] for v in per_video), per_video=per_video)


def pareto_plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in result["modes"].items():
        pts = sorted((1 - p["density"], p["psnr"]) for p in points)
        ax.plot(*zip(*pts), marker="o", label=name)
    for name, floor in result["floor"].items():
        ax.axhline(min(floor["psnr"], 80), ls=":", color="grey")
        ax.text(0.01, min(floor["psnr"], 80), f"{name} vs SDPA", fontsize=7, color="grey",
                transform=ax.get_yaxis_transform(), va="bottom")
    ax.set_xlabel(f"sparsity (1 − computed blocks) over all {result['steps']} steps, dense warm-up steps counted")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title(f"video DiT ({result['model']}, {result['tokens']:,} tokens) fidelity, {result['videos']} videos, "
                 f"{result['device']}", fontsize=9)
    if result["modes"]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="short", help=f"comma-separated, of {','.join(MODEL_NAMES)}")
    ap.add_argument("--checkpoint", nargs="+", type=Path, help="one per model (default: each model's own)")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--dense-steps", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=BLOCK_SIZE, choices=[64, 128])
    ap.add_argument("--modes", nargs="*", choices=list(MODES), help="default: every mode")
    ap.add_argument("--points", type=int, help="at most this many values of each mode's sweep (default: all)")
    ap.add_argument("--minutes", type=float, help="time budget for all models: points that would not finish "
                                                  "in it are skipped (default: none)")
    ap.add_argument("--no-gif", dest="gif", action="store_false", help="no fidelity.gif (one file fewer)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--strip-sparsity", type=float, default=0.6,
                    help="the strip shows the best mode at least this sparse (warm-up counted)")
    args = ap.parse_args(argv)
    args.models = args.models.split(",")
    for name in args.models:
        if name not in MODEL_NAMES:
            ap.error(f"--models: unknown model {name!r}; the models are {', '.join(MODEL_NAMES)}")
    args.checkpoint = args.checkpoint or [from_name(name).checkpoint for name in args.models]
    if len(args.checkpoint) != len(args.models):
        ap.error(f"--checkpoint: give one per model ({len(args.models)}), in the order of --models")
    missing = [str(path) for path in args.checkpoint if not Path(path).is_file()]
    if missing:     # before the first model's minutes are spent
        ap.error(f"no checkpoint at {', '.join(missing)} (train it: examples/video_dit/README.md)")
    run(args)


if __name__ == "__main__":
    main()
