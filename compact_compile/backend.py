"""The `compact` torch.compile backend: rewrite video attention into block-sparse attention, hand
everything to Inductor.

    torch.compile(model, backend="compact", options={"plan": "window"})

Registered through the `torch_dynamo_backends` entry point, so no import is needed.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from .kernels.flex import FlexBlockSparse
from .kernels.ops import register_site
from .kernels.rectified import RectifiedSparse
from .kernels.triton_sparse import TritonBlockSparse, triton_unsupported
from .masks import density
from .options import CompactOptions
from .passes.grid import patch_embedding_grids
from .passes.rewrite import rewrite_site
from .passes.sites import OTHER, find_sites
from .plan import PlanError
from .planner import load_plan, site_blocks, site_layout
from .quantize import quantized_linears
from .report import record
from .schedule import scheduled_kernel, site_schedule, with_step_clock


def compact_backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
    opts = CompactOptions.from_dict(options)
    plan = load_plan(opts)
    schedule = site_schedule(plan, opts.dense_steps)
    sites = find_sites(gm, patch_embedding_grids(gm), opts.grid, plan.grid if plan else None)
    for site in sites:
        if not site.rewritten:
            if plan is not None and site.name in plan.sites:  # e.g. a plan for another resolution
                _plan_misfit(opts, site, PlanError(f"the plan has a mask for site {site.name!r}, which cannot "
                                                   f"be rewritten: {site.reason}"))
            continue
        layout = site_layout(opts, plan, site)
        try:
            blocks = site_blocks(opts, plan, site, layout)
        except PlanError as e:
            _plan_misfit(opts, site, e)
            continue
        kind = _kernel_kind(opts, site)
        kernel = _site_kernel(opts, layout, blocks, kind)
        kernel = scheduled_kernel(schedule, site.name, kernel,
                                  lambda entry, blocks=blocks, name=site.name: (
                                      blocks if entry == name else plan.sites[entry].blocks),
                                  lambda b, layout=layout, kind=kind: _site_kernel(opts, layout, b, kind))
        if opts.observer is not None:
            kernel = opts.observer(site.name, layout, kernel)
        handle = register_site(kernel)
        rewrite_site(gm, site, layout, handle, pooled=getattr(kernel, "pooled_inputs", False),
                     merge_outside=getattr(kernel, "merges_outside", False))
        site.density = density(blocks)
        site.extras.update(tile=layout.tile, block_size=layout.block_size, kernel=kind,
                           dynamic=opts.dynamic, rectify=opts.rectify)
        if opts.dynamic:  # the online choice adds blocks: at least (1 - drop) of each row
            site.extras.update(min_density=max(density(blocks), 1 - opts.drop))
    gm.recompile()
    record([s.summary() for s in sites] + _foreign_attention(gm))
    compiled = quantized_linears(gm, example_inputs, opts.quantize,
                                 lambda inputs: _compile_inner(gm, inputs, opts.inner, mode or opts.mode))
    return with_step_clock(gm, compiled, schedule)


def _plan_misfit(opts: CompactOptions, site, error: PlanError) -> None:
    """strict: the error; otherwise the site stays dense, with a warning and the reason reported."""
    if opts.strict:
        raise error
    warnings.warn(f"compact: site {site.name} stays dense: {error}", stacklevel=3)
    site.reason = f"plan mismatch: {error}"


def _kernel_kind(opts: CompactOptions, site) -> str:
    """"triton" where our kernel applies (CUDA sm80+, head dim 16–128), else "flex"; an explicit
    kernel="triton" that cannot apply says why in the report."""
    if opts.kernel == "flex":
        return "flex"
    why = triton_unsupported(site.device, getattr(torch, site.dtype, None), site.q_shape[-1],
                             explicit=opts.kernel == "triton")
    if why and opts.kernel == "triton":
        site.extras.update(kernel_note=f"Triton kernel not used ({why}): FlexAttention instead")
    return "flex" if why else "triton"


def _site_kernel(opts: CompactOptions, layout, blocks, kind: str):
    if not (opts.dynamic or opts.rectify):
        cls = TritonBlockSparse if kind == "triton" else FlexBlockSparse
        return cls(blocks, layout.seq_len, layout.block_size)
    return RectifiedSparse(layout, blocks, dynamic=opts.dynamic, rectify=bool(opts.rectify),
                           rows=opts.rectify == "rows", p_remain=opts.p_remain, drop=opts.drop, kernel=kind)


def _foreign_attention(gm: fx.GraphModule) -> list[dict]:
    """Attention the backend cannot see as SDPA (e.g. diffusers' flex attention backend)."""
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    return [dict(site=n.name, kind=OTHER, q=[], k=[], dtype="", rewritten=False, grid=None, grid_source="",
                 n_text=0, text_first=None, density=None,
                 reason="flex_attention call, not SDPA: set the diffusers attention backend to 'native'")
            for n in gm.graph.nodes if n.op == "call_function" and flex is not None and n.target is flex]


def _compile_inner(gm, example_inputs, inner: str, mode: str | None):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    patches = torch._inductor.list_mode_options(mode) if mode else None
    return compile_fx(gm, example_inputs, config_patches=patches)
