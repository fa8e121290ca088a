"""`compact-compile calibrate | inspect | plot`: calibrate a plan, look at it, draw it.

Every argument is checked before any model is built or any file is read in earnest: a bad one is
one line on stderr and exit code 2, never a traceback after minutes of calibration.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

EXAMPLES = """examples:
  compact-compile calibrate --out tiny.plan.safetensors               # a small random-weight Wan model
  compact-compile calibrate --model-dir wan/transformer --device cuda --latent 21,60,104 --out wan.plan.safetensors
  compact-compile calibrate --stats run.stats.safetensors --recall 0.95 --out strict.plan.safetensors
  compact-compile calibrate --stats run.stats.safetensors --density 0.1 --out tenth.plan.safetensors
  compact-compile inspect tiny.plan.safetensors                       # per-site / per-head table
  compact-compile plot tiny.plan.safetensors --out plots/             # masks and recall-vs-density PNGs
"""

CALIBRATE_EPILOG = """`calibrate` runs a denoising-like loop (decreasing timesteps; with --cfg a second, unconditional
call per step) on random latents and texts under calibration, then searches the plan. The model is
a random-weight diffusers WanTransformer3DModel built from the flags, or, with --model-dir, the
diffusers model saved in DIR (class from DIR/config.json's _class_name; it must be called like Wan:
model(latents, timestep, text)). --stats skips the run and searches saved statistics again.

""" + EXAMPLES

# the random model's shape; with --model-dir these come from its config.json instead
RANDOM_MODEL = dict(layers=2, heads=2, head_dim=16, ffn_dim=64, text_dim=32, channels=4)
WAN_CALL = ["hidden_states", "timestep", "encoder_hidden_states"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints the whole usage first (ten lines for calibrate); one line says it all
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number_type(convert, ok, what: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


_count = _number_type(int, lambda v: v >= 1, "an integer ≥ 1")
_non_negative = _number_type(int, lambda v: v >= 0, "an integer ≥ 0")
_recall = _number_type(float, lambda v: 0 < v <= 1, "a recall in (0, 1]")
_cost = _number_type(float, lambda v: v > 0, "a cost > 0 (inf: off)")   # nan fails v > 0
_density = _number_type(float, lambda v: 0 < v <= 1, "a density in (0, 1]")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers such as 0,1,3") from None


def _triple(text: str) -> tuple[int, int, int]:
    values = _int_list(text) if re.fullmatch(r"[0-9,]+", text) else ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not three positive integers t,h,w such as 1,8,8")
    return values


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="compact-compile", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("calibrate", help="record attention statistics and search a plan", epilog=CALIBRATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--out", required=True, help="plan file to write (its directory must exist)")
    c.add_argument("--stats", help="search this saved statistics file instead of running a model")
    c.add_argument("--save-stats", help="also write the recorded statistics here")
    c.add_argument("--recall", type=_recall, default=None,
                   help="τ: minimum recall per head, in (0, 1] (default 0.9; with --density: none)")
    c.add_argument("--cost", type=_cost, default=None, help="λ: maximum marginal cost, > 0 (default 0.011; inf: off)")
    c.add_argument("--density", type=_density, default=None,
                   help="instead of --cost: the fraction of blocks the plan may compute, in (0, 1], shared "
                        "among the heads by need")
    c.add_argument("--dense-steps", type=_non_negative, default=None,
                   help="dense denoising steps (default 15, or the stats')")
    c.add_argument("--dense-layers", type=_non_negative, default=0, help="first K attention sites kept dense")
    c.add_argument("--groups", type=_int_list, default=(0, 1, 3),
                   help="temporal group edges in tile frames, increasing, ≥ 0 (default 0,1,3)")
    c.add_argument("--merge", choices=("union", "mean"), default="union")
    m = c.add_argument_group("model run (without --stats)")
    m.add_argument("--model-dir", help="a diffusers model saved with save_pretrained (default: a random Wan model)")
    for flag, what in (("layers", "transformer blocks"), ("heads", "attention heads"), ("head-dim", "head dim"),
                       ("ffn-dim", "feed-forward dim"), ("text-dim", "text embedding dim"),
                       ("channels", "latent channels")):
        m.add_argument(f"--{flag}", type=_count, help=f"random model: {what} (default "
                                                      f"{RANDOM_MODEL[flag.replace('-', '_')]})")
    m.add_argument("--text-len", type=_count, default=12, help="text tokens per input (default 12)")
    m.add_argument("--latent", type=_triple, default=(8, 32, 32), help="latent frames,height,width (default 8,32,32)")
    m.add_argument("--steps", type=_count, default=20, help="denoising steps per input (default 20)")
    m.add_argument("--inputs", type=_count, default=1, help="calibration inputs (random latents and texts)")
    m.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="classifier-free guidance: a second (unconditional) call per step")
    m.add_argument("--block-size", type=int, default=64, choices=(64, 128))
    m.add_argument("--tile", type=_triple, default=None, help="tile t,h,w, product = block size (default: auto)")
    m.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, …")

    i = sub.add_parser("inspect", help="print a plan's per-site / per-head table", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("plan")
    i.add_argument("--sites", type=_count, default=None, help="show only the first N sites")

    p = sub.add_parser("plot", help="write PNGs of per-head masks and recall-vs-density curves", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan")
    p.add_argument("--out", required=True, help="directory for the PNGs (created)")
    p.add_argument("--sites", type=_non_negative, default=4, help="plot the first N sites (default 4; 0: all)")
    ap.commands = {"calibrate": c, "inspect": i, "plot": p}   # each command's own parser, for its errors
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad arguments exit with code 2 before any work (argparse); a plan or statistics
    file found unusable while reading it is one line on stderr, exit code 2."""
    from .errors import find_compact_error

    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser.commands[args.command], args)
    try:
        return {"calibrate": cmd_calibrate, "inspect": cmd_inspect, "plot": cmd_plot}[args.command](args)
    except Exception as e:   # PlanError/OptionsError (maybe wrapped by Dynamo), unreadable statistics
        error = find_compact_error(e) or (e if isinstance(e, ValueError) else None)
        if error is None:
            raise
        print(f"compact-compile {args.command}: error: {error}", file=sys.stderr)
        return 2


# ---- argument checks, before any work ----------------------------------------------------------------

def _check_args(parser: argparse.ArgumentParser, args) -> None:
    if args.command in ("inspect", "plot") and not Path(args.plan).is_file():
        parser.error(f"plan file {args.plan!r} does not exist")
    if args.command == "plot":
        _check_out_dir(parser, "--out", args.out)
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("plot needs matplotlib: pip install matplotlib")
    if args.command == "calibrate":
        _check_calibrate(parser, args)


def _check_out_dir(parser, flag: str, path: str) -> None:
    try:   # made now rather than after the work; a real attempt also catches read-only file systems
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"{flag} {path!r}: cannot create the directory ({e.strerror})")
    if not os.access(path, os.W_OK | os.X_OK):
        parser.error(f"{flag} {path!r} is not a writable directory")


def _check_out_file(parser, flag: str, path: str) -> None:
    where = Path(path)
    if where.is_dir():
        parser.error(f"{flag} {path!r} is a directory; give a file name")
    if not where.parent.is_dir():
        parser.error(f"{flag} {path!r}: directory {str(where.parent)!r} does not exist")
    existed = where.exists()
    try:   # opening for append changes nothing, and is the one check that holds for root and read-only mounts
        with open(where, "ab"):
            pass
    except OSError as e:
        parser.error(f"{flag} {path!r} cannot be written ({e.strerror})")
    if not existed:
        where.unlink()


def _check_calibrate(parser, args) -> None:
    if args.density is not None and args.cost is not None:
        parser.error("--cost and --density: give one (a density budget sets λ itself)")
    _check_out_file(parser, "--out", args.out)
    if args.groups and (min(args.groups) < 0 or any(b <= a for a, b in zip(args.groups, args.groups[1:]))):
        parser.error(f"--groups {','.join(map(str, args.groups))}: edges must be increasing and ≥ 0, e.g. 0,1,3")
    if args.stats:
        if not Path(args.stats).is_file():
            parser.error(f"--stats {args.stats!r} does not exist")
        if args.save_stats or args.model_dir:
            parser.error("--save-stats and --model-dir belong to a model run; --stats searches saved statistics")
        return
    if args.save_stats:
        _check_out_file(parser, "--save-stats", args.save_stats)
    dense_steps = 15 if args.dense_steps is None else args.dense_steps
    if dense_steps >= args.steps:
        parser.error(f"--dense-steps {dense_steps}{' (the default)' if args.dense_steps is None else ''} leaves "
                     f"none of the {args.steps} --steps to record; give --dense-steps below {args.steps}")
    if args.tile and math.prod(args.tile) != args.block_size:
        parser.error(f"--tile {','.join(map(str, args.tile))} holds {math.prod(args.tile)} tokens; "
                     f"it must hold --block-size {args.block_size}")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device such as cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    patch = _check_model_dir(parser, args) if args.model_dir else (1, 2, 2)
    for key, value in RANDOM_MODEL.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(n % p for n, p in zip(args.latent, patch)):
        parser.error(f"--latent {','.join(map(str, args.latent))} is not divisible by the patch size "
                     f"{','.join(map(str, patch))}")


def _check_model_dir(parser, args) -> tuple[int, int, int]:
    """Read DIR/config.json (no weights): the class must be a diffusers model called like Wan. Sets
    args.model_class, and the input sizes (channels, text_dim) from the config. Returns the patch size."""
    import inspect

    config_path = Path(args.model_dir) / "config.json"
    given = [f"--{k.replace('_', '-')}" for k in RANDOM_MODEL if getattr(args, k) is not None]
    if given:
        parser.error(f"{given[0]} shapes the random model; with --model-dir the model's config.json decides")
    if not config_path.is_file():
        parser.error(f"--model-dir {args.model_dir!r} holds no config.json (a directory written by save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
        name = config["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        parser.error(f"--model-dir: {str(config_path)!r} is not a diffusers config (no _class_name)")
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        parser.error(f"--model-dir: {name!r} (config.json _class_name) is not a diffusers model class")
    wan_like = list(inspect.signature(cls.forward).parameters)[1:4] == WAN_CALL
    if not wan_like or not {"in_channels", "text_dim"} <= set(config):
        parser.error(f"--model-dir: {name} is not called like Wan (latents, timestep, text); calibrate it from "
                     f"Python with compact_compile.calibrate, calling it as its pipeline does")
    args.model_class, args.channels, args.text_dim = name, int(config["in_channels"]), int(config["text_dim"])
    patch = config.get("patch_size", (1, 2, 2))
    return tuple(patch) if isinstance(patch, (list, tuple)) and len(patch) == 3 else (1, 2, 2)


# ---- calibrate ---------------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    from tqdm import tqdm

    from .calibrate import build_plan, load_stats
    from .calibrate.session import search_targets

    if args.stats:
        ranges = load_stats(args.stats)
        dense_steps = ranges[0].steps[0] if args.dense_steps is None else args.dense_steps
        with tqdm(desc="search (sites)", unit="site") as bar:
            tau, lam = search_targets(args.recall, args.cost, args.density)
            plan = build_plan([[r] for r in ranges], recall_target=tau, cost=lam, density_target=args.density,
                              groups=args.groups, dense_steps=dense_steps, dense_layers=args.dense_layers,
                              merge="mean", progress=bar)
    else:
        cal = _run_model(args)
        if args.save_stats:
            cal.save_stats(args.save_stats)
        with tqdm(desc="search (sites)", unit="site") as bar:
            plan = cal.search(progress=bar)
    plan.save(args.out)
    print(f"wrote {args.out}: {len(plan.sites)} sites, mean density {_mean_density(plan):.3f}")
    return 0


def _build_model(args):
    """The model to calibrate: from --model-dir, or a random-weight Wan shaped by the flags."""
    import torch
    import diffusers

    if args.model_dir:
        return getattr(diffusers, args.model_class).from_pretrained(args.model_dir).eval()
    torch.manual_seed(args.seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        in_channels=args.channels, out_channels=args.channels, text_dim=args.text_dim, freq_dim=32,
        ffn_dim=args.ffn_dim, num_layers=args.layers, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=max(64, *args.latent)).eval()


def _run_model(args):
    import torch
    from tqdm import tqdm

    from .calibrate import calibrate

    model = _build_model(args).to(args.device)
    dense_steps = 15 if args.dense_steps is None else args.dense_steps
    options = dict(block_size=args.block_size)
    if args.tile:
        options["tile"] = args.tile
    g = torch.Generator().manual_seed(args.seed + 1)
    timesteps = torch.linspace(999, 0, args.steps + 1)
    cal = calibrate(model, recall=args.recall, cost=args.cost, density=args.density, dense_steps=dense_steps,
                    dense_layers=args.dense_layers, groups=args.groups, merge=args.merge, inner=args.inner,
                    options=options)
    with cal, tqdm(total=args.inputs * args.steps, desc="calibration (steps)", unit="step") as bar:
        for _ in range(args.inputs):
            x = torch.randn(1, args.channels, *args.latent, generator=g).to(args.device)
            cond = torch.randn(1, args.text_len, args.text_dim, generator=g).to(args.device)
            uncond = torch.zeros_like(cond)
            for t, t_next in zip(timesteps[:-1], timesteps[1:]):
                t_in = t.round().long()[None].to(args.device)
                v = model(x, t_in, cond, return_dict=False)[0]
                if args.cfg:
                    v_u = model(x, t_in, uncond, return_dict=False)[0]
                    v = v_u + 5.0 * (v - v_u)
                x = x + (t_next - t) / 1000 * v        # a flow-matching Euler step
                bar.update(1)
    return cal


# ---- inspect ---------------------------------------------------------------------------------------

def _mean_density(plan) -> float:
    return sum(s.density for s in plan.sites.values()) / max(1, len(plan.sites))


def cmd_inspect(args) -> int:
    from .plan import Plan

    plan = Plan.load(args.plan)
    info = plan.info or {}
    cal, sched, heads = info.get("calibration", {}), info.get("schedule"), info.get("heads", {})
    print(f"plan {args.plan}")
    print(f"  grid {plan.grid}  tile {plan.tile}  block size {plan.block_size}  sites {len(plan.sites)}  "
          f"mean density {_mean_density(plan):.3f}")
    if cal:
        inputs = cal.get("inputs", {})
        print(f"  calibration: recall τ {cal.get('recall')}  cost λ {cal.get('cost')}  groups {cal.get('groups')}  "
              f"merge {cal.get('merge')}  dense layers {cal.get('dense_layers')}")
        print(f"  inputs: {inputs.get('generations')} generations, {inputs.get('calls')} calls, "
              f"steps {cal.get('steps')}  library {cal.get('library')}  torch {cal.get('torch')}")
        print(f"  model fingerprint: {cal.get('fingerprint')}")
    if sched:
        print(f"  schedule: dense for steps < {sched['dense_steps']}, masks per step range {sched['ranges']} "
              f"(step from the {sched.get('step_source', 'timestep')} input)")
    rows = [("site", "head", "density", "recall", "pattern", "windows per group (ω1,η1,ω2,η2)")]
    names = list(plan.sites)[:args.sites] if args.sites else list(plan.sites)
    for name in names:
        s, h = plan.sites[name], heads.get(name, {})
        dens = s.blocks.float().mean((-1, -2)).tolist()
        for j in range(len(dens)):
            rec = h.get("recall", [None] * (j + 1))[j]
            pat = h["pattern"][j] if "pattern" in h else ("dense" if dens[j] == 1.0 else "-")
            par = " ".join("(" + ",".join(map(str, g)) + ")" for g in h["params"][j]) if "params" in h else ""
            rows.append((name, str(j), f"{dens[j]:.3f}", "-" if rec is None else f"{rec:.4f}", pat, par))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    print("\n".join([lines[0], "-" * len(lines[0])] + lines[1:]))
    return 0


# ---- plot ------------------------------------------------------------------------------------------

def cmd_plot(args) -> int:
    from tqdm import tqdm

    from .plan import Plan
    from .plots import plot_plan

    plan = Plan.load(args.plan)
    names = list(plan.sites) if not args.sites else list(plan.sites)[:args.sites]
    written = plot_plan(plan, Path(args.out), names, progress=lambda it: tqdm(it, desc="plot (sites)", unit="site"))
    print(f"wrote {len(written)} PNGs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
