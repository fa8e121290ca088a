"""The backend's part for sites that run the model's own mask on FlexAttention: flex_attention
calls with the model's BlockMask (NABLA, FAR, …), and SDPA calls with a frame mask (SkyReels-V2).
The same path as SDPA sites: graph → site (passes/flex_sites.py, passes/sites.py) → SiteSpec with
the model's mask (planner.py) → runtime (kernels/model_mask.py), registered under a handle → the
call rewritten into `compact.model_masked_attention` (passes/flex_sites.py, passes/rewrite.py).

The observer option (calibration, the fidelity harness) sees SDPA sites only: a flex site's runtime
takes the model's mask with every call, which an SDPA-site observer does not expect. So a calibrated
plan has no entry for a flex site, and a plan file without one leaves it dense (not an error).
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from .kernels.model_mask import make_model_masked_site
from .kernels.ops import register_site
from .options import CompactOptions
from .passes.flex_sites import FlexSite, rewrite_flex_site
from .passes.rewrite import rewrite_frame_masked_site
from .passes.sites import Site
from .plan import Plan, PlanError
from .planner import flex_site_spec, flex_site_unsupported, plan_entry_error
from .spec import ModelMask


def rewrite_flex_sites(gm: fx.GraphModule, sites: list[FlexSite], opts: CompactOptions, plan: Plan | None,
                       schedule: dict | None, plan_misfit: Callable[[CompactOptions, FlexSite, PlanError], None]
                       ) -> None:
    """Rewrite every eligible site of `sites` (found by passes.flex_sites.find_flex_sites); the others
    get the reason they stay dense."""
    unsupported = flex_site_unsupported(opts)
    for site in sites:
        if not site.rewritten:
            continue
        if unsupported:
            site.reason = unsupported
            continue
        missing = _not_in_plan(plan, site, "flex_attention")
        if missing:
            site.reason = missing
            continue
        try:
            spec = flex_site_spec(opts, plan, schedule, site, site.model_mask)
        except PlanError as e:
            plan_misfit(opts, site, e)
            continue
        rewrite_flex_site(gm, site, spec, register_site(make_model_masked_site(spec)))
        _report(site, spec, spec.kernel_reason, tokens_tiled_by=spec.model_mask.tiled_by)


def rewrite_frame_masked(gm: fx.GraphModule, site: Site, opts: CompactOptions, plan: Plan | None,
                         schedule: dict | None, plan_misfit: Callable[[CompactOptions, Site, PlanError], None]) -> None:
    """An SDPA site whose attn_mask is a frame mask (SkyReels-V2's diffusion-forcing blocks): the same
    runtime as a flex site, the frame mask as the model's BlockMask of whole frames (one frame of
    H·W tokens per model block, every listed block full)."""
    if flex_site_unsupported(opts):
        site.reason = ("frame mask: online block choice (plan 'dynamic', dynamic=True) and rectification are not "
                       "supported with it (their pooled estimates ignore the mask)")
        return
    missing = _not_in_plan(plan, site, "frame mask")
    if missing:
        site.reason = missing
        return
    frame = site.grid[1] * site.grid[2]
    try:
        spec = flex_site_spec(opts, plan, schedule, site, ModelMask(frame, frame))
    except PlanError as e:
        plan_misfit(opts, site, e)
        return
    rewrite_frame_masked_site(gm, site, spec, register_site(make_model_masked_site(spec)))
    no_fp8 = " (in the inputs' dtype: FlexAttention has no FP8 path)" if opts.fp8_attention else ""
    _report(site, spec, "flex: the frame mask is evaluated per element in blocks that straddle frames" + no_fp8)


def _not_in_plan(plan: Plan | None, site: Site, what: str) -> str:
    """Why a plan file cannot drive this site ('' if it can): calibration observes plain SDPA sites
    only, so a calibrated plan has no mask for the sites that run the model's own mask; they stay
    dense, with this reason, rather than fail the compile."""
    error = plan_entry_error(plan, site.name) if plan is not None else ""
    return f"{what}: the plan has no mask for it (calibration observes SDPA sites only): {error}" if error else ""


def _report(site: Site, spec, kernel_reason: str, **extras) -> None:
    site.density = spec.density
    site.extras.update(tile=spec.layout.tile, block_size=spec.layout.block_size, kernel=spec.kernel,
                       kernel_reason=kernel_reason, dynamic=False, rectify=False, fp8=False,
                       dense_steps=spec.ranges[0].start, **extras)
