"""The `compact` torch.compile backend: rewrite video attention into block-sparse attention, hand
everything to Inductor.

    torch.compile(model, backend="compact", options={"plan": "window"})

Registered through the `torch_dynamo_backends` entry point, so no import is needed.
graph → sites (passes/sites.py) → a SiteSpec each (planner.py) → the site's runtime (kernels/site.py),
registered under a handle → the SDPA node rewritten into an op carrying that handle (passes/rewrite.py).
"""
from __future__ import annotations

import copy
import functools
import logging
import warnings

import torch
import torch.fx as fx

from .errors import raises_unwrapped
from .flex_backend import rewrite_flex_sites, rewrite_frame_masked
from .kernels.compiled import MAX_SHAPES, RecompileLimit
from .kernels.ops import register_site
from .kernels.site import make_site
from .models import install_model_fixes
from .options import CompactOptions
from .passes.direct_attention import find_direct_attention
from .passes.flex_sites import find_flex_sites
from .passes.grid import carried_grids, output_tags, patch_embedding_grids
from .passes.rewrite import rewrite_site
from .passes.sites import CROSS, find_sites
from .plan import PlanError
from .planner import load_plan, plan_entry_error, site_spec
from .quantize import quantized_linears
from .report import record
from .schedule import site_schedule, steps_readable, with_step_clock
from .video_tags import with_video_tags

log = logging.getLogger("compact_compile")


# Model fixes (models/) act while Dynamo traces, so they must be in place before it traces a frame:
# now, or (models/__init__.py) as soon as the model's library is imported.
install_model_fixes()


@raises_unwrapped   # OptionsError, PlanError reach model(...) as themselves (errors.py)
def compact_backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None,
                    _per_size: bool = False):
    opts = CompactOptions.from_dict(options)
    plan = load_plan(opts)
    warmup = opts.warmup_steps
    if opts.dense_steps is None and warmup and not steps_readable(gm, example_inputs):
        log.info("compact: this graph cannot tell the denoising step (no timestep input and no follow_steps, or "
                 "per-frame/per-token timesteps): no default dense warm-up (dense_steps=N asks for it anyway)")
        warmup = 0
    schedule = site_schedule(plan, warmup)
    own_grids = patch_embedding_grids(gm)
    carried, input_tags = carried_grids(gm, example_inputs)    # grids from an earlier graph (video_tags.py)
    sites = find_sites(gm, own_grids + carried, opts.grid, plan.grid if plan else None)
    flex_sites = find_flex_sites(gm, own_grids + carried, opts.grid, plan.grid if plan else None)
    direct = find_direct_attention(gm)          # attention kernels called directly (ring attention): dense
    # symbolic: one graph for several sizes; compiled per size, unless it holds flex_attention, which Dynamo
    # cannot trace again (its sites stay dense, and say so)
    if any(s.symbolic for s in sites + flex_sites) and not flex_sites and not _per_size:
        return with_step_clock(gm, _per_video_size(gm, options, mode), schedule)
    emit = output_tags(gm, own_grids, list(input_tags.values()))
    # the graph as it is, for inputs that turn out not to carry its tags: sharing gm's tensors, not copies
    unrewritten = fx.GraphModule(gm, copy.deepcopy(gm.graph)) if carried else None
    for site in sites + direct:
        if not site.rewritten:
            if plan is not None and not plan_entry_error(plan, site.name):  # e.g. a plan for another resolution
                _plan_misfit(opts, site, PlanError(f"the plan has a mask for site {site.name!r}, which cannot "
                                                   f"be rewritten: {site.reason}"))
            continue
        if site.mask is not None and site.mask.frames is not None:
            rewrite_frame_masked(gm, site, opts, plan, schedule, _plan_misfit)
            continue
        try:
            spec = site_spec(opts, plan, schedule, site)
        except PlanError as e:
            _plan_misfit(opts, site, e)
            continue
        runtime = make_site(spec)
        if opts.observer is not None:
            runtime = opts.observer(spec, runtime)
        rewrite_site(gm, site, spec, register_site(runtime, spec))
        site.density = spec.density
        site.extras.update(tile=spec.layout.tile, block_size=spec.layout.block_size, kernel=spec.kernel,
                           kernel_reason=spec.kernel_reason, dynamic=spec.selection is not None,
                           rectify=spec.rectify or False, dense_steps=spec.ranges[0].start, fp8=spec.fp8)
        if spec.selection is not None:   # the online choice adds blocks: at least (1 - drop) of each row
            site.extras.update(min_density=max(spec.density, 1 - spec.selection.drop))
    rewrite_flex_sites(gm, flex_sites, opts, plan, schedule, _plan_misfit)
    gm.recompile()
    _warn_if_nothing_sparse(sites + flex_sites + direct)
    record([s.summary() for s in sites + flex_sites + direct])
    compiled = quantized_linears(gm, example_inputs, opts.quantize,
                                 lambda inputs: _compile_inner(gm, inputs, opts, mode))
    carried_sources = {c.source for c in carried}
    # inputs checked where a site relies on their tags, or where the outputs pass them on (a graph
    # without attention between two that have it must not re-tag another video with the first's grid)
    relies = any(s.rewritten and s.grid_source in carried_sources for s in sites + flex_sites)
    passes_on = any(t in input_tags.values() or t.source in carried_sources for t in emit.values())
    expect = input_tags if relies or passes_on else {}
    compiled = with_video_tags(compiled, expect, emit,
                               lambda inputs: _compile_inner(unrewritten, inputs, opts, mode))
    return with_step_clock(gm, compiled, schedule)


def _per_video_size(gm: fx.GraphModule, options: dict | None, mode: str | None):
    """Dynamo made an attention shape symbolic (the model met a second video size, and its automatic
    dynamic shapes recompiled one graph for all sizes): whose sites could not be tiled, and which
    would then serve the first size too. Instead, this graph compiles one static graph per size as it
    is called, each rewritten like the first: every resolution keeps its sparse attention, and
    report() lists the sites of each size compiled."""
    log.info("compact: a graph with symbolic attention shapes: compiling one static graph per video size")
    static = torch.compile(gm, backend=functools.partial(compact_backend, options=options, mode=mode, _per_size=True),
                           dynamic=False)

    def run(*args):
        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_SHAPES, fail_on_recompile_limit_hit=True):
                return static(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise RecompileLimit(f"this model was compiled for {MAX_SHAPES} video sizes in this process; rather "
                                 f"than fall back to eager (dense) attention, compact_compile stops here") from None

    return run


def _warn_if_nothing_sparse(sites) -> None:
    """One warning for a graph whose attention all stays dense although some of it may be video
    attention: self-attention (not cross-attention), and not shorter than the video (a prompt
    refiner's few tokens are not video attention). The reasons say what to change."""
    if any(s.rewritten for s in sites):
        return
    candidates = [s for s in sites if s.kind != CROSS and s.maybe_video]
    if not candidates:
        return
    reasons = [f"{s.name}: {s.reason}" for s in candidates[:3]]
    warnings.warn(f"compact: no attention in this graph runs block-sparse ({len(candidates)} sites "
                  f"stay dense); " + "; ".join(reasons) + ". compact_compile.report() lists every site.", stacklevel=2)


def _plan_misfit(opts: CompactOptions, site, error: PlanError) -> None:
    """strict: the error; otherwise the site stays dense, with a warning and the reason reported."""
    if opts.strict:
        raise error
    warnings.warn(f"compact: site {site.name} stays dense: {error}", stacklevel=3)
    site.reason = f"plan mismatch: {error}"


def _compile_inner(gm, example_inputs, opts: CompactOptions, mode: str | None):
    """The graph compiled by `opts.inner`; Inductor with `mode` (torch.compile's, else the option's)
    and the `inductor` option's config patches over it."""
    if opts.inner == "eager":
        return gm.forward
    if opts.inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    mode = mode or opts.mode
    patches = {**(torch._inductor.list_mode_options(mode) if mode else {}), **(opts.inductor or {})}
    return compile_fx(gm, example_inputs, config_patches=patches or None)
