"""Give each eligible site its SiteSpec: token layout, block maps per step range, online choice,
rectification, key mask and kernel, from the options, a built-in plan or a plan file."""
from __future__ import annotations

import dataclasses
import math

import torch

from .kernels.registry import check_fp8_device, choose_kernel, kernel_class
from .layout import TokenLayout, auto_tile
from .masks import dense_blocks, neighbour_blocks, video_site_blocks, window_blocks
from .options import CompactOptions, OptionsError
from .passes.sites import Site
from .plan import Plan, PlanError
from .schedule import range_site_name
from .spec import ModelMask, Selection, SiteSpec, StepRange


def load_plan(options: CompactOptions) -> Plan | None:
    """The options' plan as a `Plan` (None for built-in plans); options that contradict it are errors."""
    plan = options.plan
    if isinstance(plan, str) and plan in ("dense", "window", "dynamic"):
        return None
    plan = plan.check("the plan given") if isinstance(plan, Plan) else Plan.load(plan)   # a file is checked as read
    if options.block_size is not None and options.block_size != plan.block_size:
        raise OptionsError(f"option 'block_size' {options.block_size} contradicts the plan's {plan.block_size}")
    if options.tile != "auto" and tuple(options.tile) != plan.tile:
        raise OptionsError(f"option 'tile' {options.tile} contradicts the plan's {plan.tile}")
    if options.grid is not None and tuple(options.grid) != plan.grid:
        raise OptionsError(f"option 'grid' {options.grid} contradicts the plan's {plan.grid}")
    schedule = plan.info.get("schedule")
    if options.dense_steps is not None and schedule and schedule["dense_steps"] != options.dense_steps:
        raise OptionsError(f"option 'dense_steps' {options.dense_steps} contradicts the plan's schedule "
                           f"({schedule['dense_steps']} dense steps)")
    return plan


def site_spec(options: CompactOptions, plan: Plan | None, schedule: dict | None, site: Site) -> SiteSpec:
    """The site's spec; raises PlanError when the plan does not fit it. A step range whose block map
    holds every block runs the kernel's dense path (the same result, faster than listing them all)."""
    layout = site_layout(options, plan, site)
    blocks = site_blocks(options, plan, site, layout)
    if schedule:
        bounds = [tuple(r) for r in schedule["ranges"]]
        entry = site.name if plan is None else plan_entry(plan, site.name)
        maps = [blocks if i == 0 else _range_blocks(options, plan, range_site_name(entry, i, bounds), site, layout)
                for i in range(len(bounds))]
    else:
        bounds, maps = [(0, None)], [blocks]
    ranges = tuple(StepRange(a, b, None if m.all() else m) for (a, b), m in zip(bounds, maps))
    # nothing skipped at any step (plan "dense"): nothing to rectify, R = 1 and Ō = 0
    skips = any(r.blocks is not None for r in ranges) or options.dynamic
    rectify = {False: None, True: "block", "auto": "block", "rows": "rows"}[options.rectify] if skips else None
    dtype = getattr(torch, site.dtype)
    choice = (options.kernel, site.device, dtype, site.q_shape[-1], layout.block_size, site.key_mask)
    fp8 = options.fp8_attention and skips
    kernel, why = choose_kernel(*choice, fp8=fp8)    # a site FP8 cannot run: one error
    if options.fp8_attention and not fp8:   # every block at every step: the dense path in the inputs' dtype,
        check_fp8_device(site.device)       # on hardware with FP8 (the option still says where it cannot run)
        why += ("; no FP8: this site computes every block at every step, where dense attention in the inputs' "
                "dtype is faster (and exact) than FP8 over every block")
    return SiteSpec(site.name, layout, ranges,
                    selection=Selection(options.p_remain, options.drop) if options.dynamic else None,
                    rectify=rectify, key_mask=site.key_mask, kernel=kernel, kernel_reason=why,
                    merge_in_graph=rectify == "block" and not kernel_class(kernel).fuses_rectify and not fp8, fp8=fp8)


def flex_site_spec(options: CompactOptions, plan: Plan | None, schedule: dict | None, site: Site,
                   model_mask: ModelMask) -> SiteSpec:
    """The spec of a flex_attention site: its plan blocks as for SDPA, the model's mask with them, and
    FlexAttention, the one kernel that evaluates a model's mask_mod and score_mod. A model that orders
    its tokens in tiles of the block size (NABLA's 1×8×8 at 64) keeps its tiles under tile="auto":
    the plan's blocks are then its mask's blocks, and a full model block stays full."""
    tiled_by = model_mask.tiled_by
    if (plan is None and options.tile == "auto" and tiled_by is not None
            and math.prod(tiled_by) == options.block_size_for(math.prod(site.grid))):
        options = options.replace(tile=tuple(tiled_by))
    spec = site_spec(options.replace(fp8_attention=False, rectify=False, kernel="flex"), plan, schedule, site)
    why = "flex: the only kernel that evaluates the model's mask_mod and score_mod"
    if options.fp8_attention:
        why += " (in the inputs' dtype: FlexAttention has no FP8 path)"
    return dataclasses.replace(spec, model_mask=model_mask, kernel_reason=why)


def flex_site_unsupported(options: CompactOptions) -> str:
    """Why no flex_attention site runs block-sparse under these options ("" if they can): the online
    choice and rectification estimate blocks from pooled q and k, which know nothing of the model's mask."""
    if options.dynamic or options.rectify in (True, "rows"):
        return ("flex_attention with the model's own mask: online block choice (plan 'dynamic', dynamic=True) and "
                "rectification are not supported there (their pooled estimates ignore the model's mask)")
    return ""


def _range_blocks(options, plan, entry: str, site: Site, layout: TokenLayout) -> torch.Tensor:
    """Block map of a later step range: the plan's entry for it, the built-in map otherwise."""
    if plan is None:
        return site_blocks(options, plan, site, layout)
    blocks = _fitted(plan.sites[entry], site, layout, entry)
    return blocks | video_site_blocks(layout, neighbour_blocks(layout)) if options.dynamic else blocks


def site_layout(options: CompactOptions, plan: Plan | None, site: Site) -> TokenLayout:
    if plan is not None:
        return TokenLayout(plan.grid, plan.tile, plan.block_size, site.n_text, site.n_before)
    block_size = options.block_size_for(math.prod(site.grid))
    tile = auto_tile(site.grid, block_size) if options.tile == "auto" else options.tile
    return TokenLayout(site.grid, tile, block_size, site.n_text, site.n_before)


def site_blocks(options: CompactOptions, plan: Plan | None, site: Site, layout: TokenLayout) -> torch.Tensor:
    """The static blocks, bool `[heads or 1, n_blocks, n_blocks]`; with online choice they include
    the 3D neighbour blocks, which it never drops. Raises PlanError when the plan does not fit."""
    blocks = _plan_blocks(options, plan, site, layout)
    if options.dynamic:
        blocks = blocks | video_site_blocks(layout, neighbour_blocks(layout))
    return blocks


def plan_entry(plan: Plan, site: str) -> str:
    """The plan's name for the graph's site `site`: the same module path, or the one path that ends
    with the other (a model compiled inside a wrapper names its sites `transformer.blocks.3.attn1`,
    a plan calibrated on the bare model `blocks.3.attn1`, or the other way round)."""
    if site in plan.sites:
        return site
    names = [name for name in plan.sites if "@" not in name]
    inside = [name for name in names if site.endswith("." + name)]            # the model compiled in a wrapper
    outside = [name for name in names if name.endswith("." + site)]           # the plan made on a wrapper
    layered = [name for name in outside if any(p.isdigit() for p in name[: -len(site) - 1].split("."))]
    if len(inside) == 1:
        return inside[0]
    if len(outside) == 1 and not layered:
        return outside[0]
    if layered:   # the site's name drops a layer index: one graph stands for many layers
        raise PlanError(f"plan has per-layer sites (e.g. {layered[0]!r}) but this graph's site is {site!r}: "
                        f"this graph starts inside a block, so it cannot tell which layer it is. Either regional "
                        f"compilation (compile_repeated_blocks: one graph for all blocks, so one mask for all layers, "
                        f"plan='window' or 'dynamic'; compile the whole model to use a per-layer plan) or a graph "
                        f"break before the block (TORCH_LOGS=graph_breaks shows where; diffusers' context-parallel "
                        f"hooks break the graph on the first call if it is compiled: call the model once before "
                        f"compiling it)")
    raise PlanError(f"plan has no site {site!r} (it has {len(plan.sites)} sites, e.g. {list(plan.sites)[:3]}): "
                    f"is it a plan for another model?")


def plan_entry_error(plan: Plan, site: str) -> str:
    """Why `plan` has no entry for the graph's site `site` ("" if it has one)."""
    try:
        plan_entry(plan, site)
    except PlanError as e:
        return str(e)
    return ""


def _plan_blocks(options: CompactOptions, plan: Plan | None, site: Site, layout: TokenLayout) -> torch.Tensor:
    if plan is None:
        if options.plan == "dense":
            return dense_blocks(layout)[None]
        if options.plan == "dynamic":
            return video_site_blocks(layout, torch.zeros(layout.n_blocks, layout.n_blocks, dtype=torch.bool))[None]
        return video_site_blocks(layout, window_blocks(layout, options.window))[None]
    return _fitted(plan.sites[plan_entry(plan, site.name)], site, layout)


def _fitted(s, site: Site, layout: TokenLayout, entry: str = "") -> torch.Tensor:
    """The entry's block map, this rank's rows of it, if it fits the site (heads, head dim, sequence
    and the other tokens around the video), else a PlanError saying what differs."""
    heads = site.q_shape[1] if site.model_heads is None else site.n_model_heads
    if s.blocks.shape[0] == 1 and site.model_heads_unproven and s.heads % heads == 0:
        heads = s.heads     # one row serves any heads: a share of the plan's heads, which ones unproven, fits
    got = dict(heads=heads, head_dim=site.q_shape[3], seq_len=layout.seq_len, n_text=site.n_text,
               n_before=site.n_before)
    want = dict(heads=s.heads, head_dim=s.head_dim, seq_len=s.seq_len, n_text=s.n_text, n_before=s.n_before)
    diff = [f"{k} {want[k]} in the plan, {got[k]} in the model" for k in got if got[k] != want[k]]
    if got["heads"] != want["heads"] and site.model_heads_unproven:
        diff.append(site.model_heads_unproven)
    if diff:
        raise PlanError(f"plan does not fit site {site.name!r}{f' (its step-range entry {entry!r})' if entry else ''}: "
                        + "; ".join(diff))
    return _own_heads(s.blocks, site)


def _own_heads(blocks: torch.Tensor, site: Site) -> torch.Tensor:
    """A per-head map's rows for the site's heads: all of them, or under sequence parallelism this
    rank's share of the model's heads (passes/heads.py)."""
    if site.model_heads is None or blocks.shape[0] == 1:
        return blocks
    return blocks[list(site.model_heads)]
