"""Pictures of a plan: `compact-compile plot PLAN --out DIR`, or `plot_plan(plan, Path(DIR))`.

overview.png            density of every head of every site
masks_<site>.png        per head, the kept (query block, key block) pairs
patterns_<site>.png     per head, the key tiles kept around the grid's centre query tile, per tile frame
curves_<site>.png       per head, the calibration's greedy path: recall lost against density
"""
from __future__ import annotations

import math
import re
from pathlib import Path


def _file_name(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site)


def plot_plan(plan, out: Path, names=None, progress=lambda it: it) -> list[Path]:
    """PNGs of `plan` in `out` (created): the density of every head, then per site in `names`
    (default all) its block maps, what each head keeps around a query tile, and the greedy path of
    its calibration (recall lost against density). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    heads = (plan.info or {}).get("heads", {})
    tau = (plan.info or {}).get("calibration", {}).get("recall")
    written = [_overview(plt, plan, out)]
    for name in progress(list(plan.sites) if names is None else names):
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
    return written


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
    ax.set_title(f"density per head (mean {grid.nanmean().item():.3f})", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, out / "overview.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
