"""`compact-compile calibrate | inspect | plot`.

    compact-compile calibrate --out tiny.plan.safetensors            # a small random-weight Wan model
    compact-compile calibrate --stats run.stats.safetensors --out p.plan.safetensors --recall 0.95
    compact-compile inspect tiny.plan.safetensors                    # per-site / per-head table
    compact-compile plot tiny.plan.safetensors --out plots/          # masks and recall-vs-density PNGs

`calibrate` builds a diffusers WanTransformer3DModel from the flags (random weights: it exercises the
whole path; a real model is calibrated from Python with `compact_compile.calibrate.calibrate`), runs a
denoising-like loop (decreasing timesteps, optional classifier-free guidance as a second call per step)
under calibration and writes the searched plan; or it searches a statistics file saved earlier.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="compact-compile", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("calibrate", help="record attention statistics and search a plan")
    c.add_argument("--out", required=True, help="plan file to write")
    c.add_argument("--stats", help="search this saved statistics file instead of running a model")
    c.add_argument("--save-stats", help="also write the recorded statistics here")
    c.add_argument("--recall", type=float, default=0.9, help="τ: minimum recall per head (default 0.9)")
    c.add_argument("--cost", type=float, default=0.011, help="λ: maximum marginal cost (default 0.011; inf: off)")
    c.add_argument("--dense-steps", type=int, default=None, help="dense denoising steps (default 15, or the stats')")
    c.add_argument("--dense-layers", type=int, default=0, help="first K attention sites kept dense")
    c.add_argument("--groups", type=_ints, default=(0, 1, 3), help="temporal group edges in tile frames")
    c.add_argument("--merge", choices=("union", "mean"), default="union")
    m = c.add_argument_group("model run (without --stats)")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=2)
    m.add_argument("--head-dim", type=int, default=16)
    m.add_argument("--ffn-dim", type=int, default=64)
    m.add_argument("--text-dim", type=int, default=32)
    m.add_argument("--text-len", type=int, default=12)
    m.add_argument("--channels", type=int, default=4, help="latent channels")
    m.add_argument("--latent", type=_ints, default=(8, 32, 32), help="latent frames,height,width (patch 1×2×2)")
    m.add_argument("--steps", type=int, default=20, help="denoising steps per input")
    m.add_argument("--inputs", type=int, default=1, help="calibration inputs (random latents and texts)")
    m.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="classifier-free guidance: a second (unconditional) call per step")
    m.add_argument("--block-size", type=int, default=64, choices=(64, 128))
    m.add_argument("--tile", type=_ints, default=None, help="tile t,h,w (default: auto)")
    m.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    m.add_argument("--seed", type=int, default=0)

    i = sub.add_parser("inspect", help="print a plan's per-site / per-head table")
    i.add_argument("plan")
    i.add_argument("--sites", type=int, default=None, help="show only the first N sites")

    p = sub.add_parser("plot", help="write PNGs of per-head masks and recall-vs-density curves")
    p.add_argument("plan")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--sites", type=int, default=4, help="plot the first N sites (default 4; 0: all)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; a plan or statistics file that cannot be used is reported on stderr (exit 2)."""
    args = _parser().parse_args(argv)
    try:
        return {"calibrate": cmd_calibrate, "inspect": cmd_inspect, "plot": cmd_plot}[args.command](args)
    except ValueError as e:   # PlanError is a ValueError; so are unreadable statistics and bad settings
        print(f"compact-compile {args.command}: error: {e}", file=sys.stderr)
        return 2


# ---- calibrate -------------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    from tqdm import tqdm

    from .calibrate import build_plan, load_stats

    if args.stats:
        ranges = load_stats(args.stats)
        dense_steps = ranges[0].steps[0] if args.dense_steps is None else args.dense_steps
        with tqdm(desc="search (sites)", unit="site") as bar:
            plan = build_plan([[r] for r in ranges], recall_target=args.recall, cost=args.cost, groups=args.groups,
                              dense_steps=dense_steps, dense_layers=args.dense_layers, merge="mean", progress=bar)
    else:
        cal = _run_model(args)
        if args.save_stats:
            cal.save_stats(args.save_stats)
        with tqdm(desc="search (sites)", unit="site") as bar:
            plan = cal.search(progress=bar)
    plan.save(args.out)
    print(f"wrote {args.out}: {len(plan.sites)} sites, mean density {_mean_density(plan):.3f}")
    return 0


def _run_model(args):
    import torch
    from diffusers import WanTransformer3DModel
    from tqdm import tqdm

    from .calibrate import calibrate

    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        in_channels=args.channels, out_channels=args.channels, text_dim=args.text_dim, freq_dim=32,
        ffn_dim=args.ffn_dim, num_layers=args.layers, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=max(64, *args.latent)).eval()
    dense_steps = 15 if args.dense_steps is None else args.dense_steps
    options = dict(block_size=args.block_size)
    if args.tile:
        options["tile"] = args.tile
    g = torch.Generator().manual_seed(args.seed + 1)
    timesteps = torch.linspace(999, 0, args.steps + 1)
    cal = calibrate(model, recall=args.recall, cost=args.cost, dense_steps=dense_steps,
                    dense_layers=args.dense_layers, groups=args.groups, merge=args.merge, inner=args.inner,
                    options=options)
    with cal, tqdm(total=args.inputs * args.steps, desc="calibration (steps)", unit="step") as bar:
        for _ in range(args.inputs):
            x = torch.randn(1, args.channels, *args.latent, generator=g)
            cond = torch.randn(1, args.text_len, args.text_dim, generator=g)
            uncond = torch.zeros_like(cond)
            for t, t_next in zip(timesteps[:-1], timesteps[1:]):
                t_in = t.round().long()[None]
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

def _file_name(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site)


def cmd_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from .plan import Plan

    plan = Plan.load(args.plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heads = (plan.info or {}).get("heads", {})
    tau = (plan.info or {}).get("calibration", {}).get("recall")
    names = list(plan.sites) if not args.sites else list(plan.sites)[:args.sites]
    written = [_overview(plt, plan, out)]
    for name in tqdm(names, desc="plot (sites)", unit="site"):
        blocks, h = plan.sites[name].blocks, heads.get(name, {})
        n = blocks.shape[0]
        cols = min(n, 6)
        fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(2.6 * cols, 3.0 * math.ceil(n / cols)),
                                 squeeze=False)
        for j, ax in enumerate(axes.flat):
            ax.axis("off")
            if j < n:
                ax.imshow(blocks[j].numpy(), cmap="Greys", interpolation="nearest")
                label = f"head {j}: {blocks[j].float().mean():.2f}"
                if "pattern" in h:
                    label += f" {h['pattern'][j]}"
                ax.set_title(label, fontsize=8)
        fig.suptitle(f"{name}: kept blocks (query block ↓, key block →)", fontsize=10)
        written.append(_save(fig, out / f"masks_{_file_name(name)}.png"))
        if "params" in h:
            written.append(_patterns(plt, plan, name, h, out))
        if "curve" in h:
            fig, ax = plt.subplots(figsize=(5, 4))
            for j, curve in enumerate(h["curve"]):
                d, r = zip(*curve)
                # recall lost (1 − recall) on a log axis: the tail that decides λ stays visible next to τ
                ax.plot(d, [max(1 - x, 1e-7) for x in r], marker=".", markersize=3, linewidth=1, label=f"head {j}")
            if tau is not None:
                ax.axhline(1 - tau, color="k", linestyle="--", linewidth=0.8, label=f"1 − τ ({tau})")
            ax.set_yscale("log")
            ax.set_xlabel("density (fraction of blocks)")
            ax.set_ylabel("recall lost (1 − recall)")
            ax.set_title(f"{name}: greedy contraction from full attention", fontsize=9)
            ax.invert_xaxis()
            ax.legend(fontsize=6, ncol=2)
            written.append(_save(fig, out / f"curves_{_file_name(name)}.png"))
    print(f"wrote {len(written)} PNGs to {out}")
    return 0


def _patterns(plt, plan, name: str, h: dict, out: Path) -> Path:
    """What each head keeps around one query tile (the grid's centre): one panel per tile frame,
    key tiles kept in white, the query tile's frame framed in red."""
    import torch

    from .calibrate.patterns import Family

    layout = plan.layout(name)
    groups = tuple((plan.info or {}).get("calibration", {}).get("groups", (0, 1, 3)))
    fam = Family(layout, groups)
    nt, nth, ntw = layout.tile_grid
    centre = ((nt // 2) * nth + nth // 2) * ntw + ntw // 2
    kept = fam.tile_mask(torch.tensor(h["params"]))[:, centre].view(-1, nt, nth, ntw)
    fig, axes = plt.subplots(len(kept), nt, figsize=(0.9 * nt + 1, 0.9 * len(kept) + 0.6), squeeze=False)
    for j, row in enumerate(axes):
        for t, ax in enumerate(row):
            ax.imshow(kept[j, t].numpy(), cmap="Greys_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if t == nt // 2:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(1.5)
            if t == 0:
                ax.set_ylabel(f"h{j} {h['pattern'][j]}", fontsize=6)
            if j == 0:
                ax.set_title(f"Δt {t - nt // 2:+d}", fontsize=6)
    fig.suptitle(f"{name}: key tiles kept for the centre query tile, per tile frame", fontsize=8)
    return _save(fig, out / f"patterns_{_file_name(name)}.png")


def _overview(plt, plan, out: Path) -> Path:
    """Density of every head of every site (sites ↓, heads →)."""
    import torch

    names = list(plan.sites)
    width = max(s.blocks.shape[0] for s in plan.sites.values())
    grid = torch.full((len(names), width), float("nan"))
    for i, name in enumerate(names):
        d = plan.sites[name].blocks.float().mean((-1, -2))
        grid[i, :len(d)] = d
    fig, ax = plt.subplots(figsize=(1 + 0.45 * width, 1 + 0.22 * len(names)))
    im = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("head")
    ax.set_title(f"density per head (mean {_mean_density(plan):.3f})", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, out / "overview.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
