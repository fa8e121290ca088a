"""Find every flex_attention call in a Dynamo graph, decide whether it can run block-sparse, and
rewrite those that can.

How torch 2.13 represents a call `flex_attention(q, k, v, score_mod, block_mask, scale, …)` in the
graph Dynamo hands a backend:

    out = torch.ops.higher_order.flex_attention(q, k, v, score_mod_0, (S_q, S_kv, kv_num_blocks,
              kv_indices, full_kv_num_blocks, full_kv_indices, <q-side lists, dq orders>, Q_BLOCK,
              KV_BLOCK, mask_fn_0), scale, kernel_options, score_mod_other_buffers, mask_mod_other_buffers)[0]

The BlockMask is flattened into tensors computed in the graph (NABLA builds them from pooled q/k on
every call) or graph inputs (a mask built outside the compiled region), and its `mask_mod` and the
`score_mod` are GraphModule attributes (`mask_fn_0`, `score_mod_0`) taking scalar indices and, after
them, the tensors they captured (the `*_other_buffers`). A call without a mask carries torch's
"empty" mask: one partial block of 2³⁰ tokens and a mask_mod returning True.

The choice: keep all of that as it is and move it into the op. The rewritten site calls
`torch.ops.compact.model_masked_attention` with q, k, v in tile order and the model's block lists and
buffers as they arrive on each call; the site's runtime (kernels/model_mask.py) holds the two
GraphModules and evaluates them at the model's own token positions inside the plan's blocks. Nothing
is reconstructed or evaluated here, so whatever the mask computes per call (data-dependent NABLA
blocks, captured tensors that change per call) reaches the kernel unchanged; the graph only has to
prove the call is ordinary attention. (Rewriting the flex_attention call in place, with new block
lists and a mask subgraph composed by hand, would let Inductor fuse it, but could not switch step
ranges at run time, and the graph-side work would be a second implementation of the runtime's.)
Every layer carries its own copy of the model's mask_mod; copies with the same code are one
function, so one is kept (`_shared`) and the compiled FlexAttention compiles once for all layers.

Dynamo cannot trace a graph holding flex_attention again, so such a graph is never recompiled per
video size (backend.py): a symbolic shape leaves its sites dense, with that reason.

A site is rewritten only when it is provably the model's masked attention restricted to the plan's
blocks: 4-D q/k/v with the same heads (no GQA) and the same token count, the video grid located as
for SDPA sites (sites.py, plus tiled token orders, token_order.py), only the output used (no
log-sum-exp), kernel options that change nothing but speed, a constant scale, and mask block tensors
covering the sequence. Anything else keeps the original call, with its reason in the report.
"""
from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..kernels import ops  # noqa: F401  (registers the torch.ops.compact ops)
from ..spec import ModelMask, SiteSpec
from .grid import GridCandidate
from .graph_util import example_value, module_path
from .sites import CROSS, JOINT, OTHER, Site, _ineligible, _locate_video
from .token_order import TokenOrder, token_orders

FLEX_ATTENTION = getattr(torch.ops.higher_order, "flex_attention", None)

# kernel options that only tune speed (or name flex's own defaults): the result does not depend on them
_SPEED_ONLY = {"BACKEND", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "OUTPUT_LOGSUMEXP",
               "OUTPUT_MAX", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
_DEFAULTS = {"PRESCALE_QK": False}


@dataclass
class FlexInputs:
    """The graph nodes (or None) the rewritten op takes from the flex_attention call."""
    query: fx.Node
    key: fx.Node
    value: fx.Node
    kv_num_blocks: fx.Node | None = None
    kv_indices: fx.Node | None = None
    full_kv_num_blocks: fx.Node | None = None
    full_kv_indices: fx.Node | None = None
    score_buffers: tuple = ()
    mask_buffers: tuple = ()
    functions: tuple = ()          # the get_attr nodes of score_mod and mask_mod, dead after the rewrite


@dataclass
class FlexSite(Site):
    inputs: FlexInputs | None = None
    model_mask: ModelMask | None = None


def is_flex_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and FLEX_ATTENTION is not None and node.target is FLEX_ATTENTION


def find_flex_sites(gm: fx.GraphModule, grids: list[GridCandidate], grid_option=None, plan_grid=None
                    ) -> list[FlexSite]:
    """Every flex_attention call of the graph, classified; `grids` as for SDPA sites (sites.find_sites)."""
    if not any(is_flex_attention(n) for n in gm.graph.nodes):
        return []
    orders = token_orders(gm)
    # an order read off the graph holds its grid too: NABLA models merge (T, H, W) into tokens only in tiles
    grids = grids + [GridCandidate((1, 1) + o.grid, o.source) for o in orders]
    sites, used = [], {}
    for node in gm.graph.nodes:
        if is_flex_attention(node):
            site = classify_flex(gm, node, grids, orders, grid_option, plan_grid)
            used[site.name] = used.get(site.name, 0) + 1
            if used[site.name] > 1:
                site.name = f"{site.name}#{used[site.name] - 1}"
            sites.append(site)
    return sites


def classify_flex(gm: fx.GraphModule, node: fx.Node, grids: list[GridCandidate], orders: list[TokenOrder],
                  grid_option=None, plan_grid=None) -> FlexSite:
    query, key, value, score_node, mask_tuple, scale, options, score_buffers, mask_buffers = _arguments(node)
    q, k, v = (example_value(x) for x in (query, key, value))
    site = FlexSite(node, module_path(node), OTHER, tuple(getattr(q, "shape", ())), tuple(getattr(k, "shape", ())),
                    str(getattr(q, "dtype", "?")).replace("torch.", ""), str(getattr(q, "device", "")),
                    extras=dict(attention="flex_attention"))
    if any(t is None or t.dim() != 4 for t in (q, k, v)):
        site.reason = "flex_attention: q, k, v are not all 4-D [B, H, S, D]"
        return site
    S, Sk = q.shape[-2], k.shape[-2]
    if not all(isinstance(d, int) for d in site.q_shape + site.k_shape):
        site.reason = ("flex_attention with a symbolic shape: one graph serves several sizes (inputs marked dynamic, "
                       "or a second video size), and a graph holding flex_attention is not recompiled per size")
        return site
    if S != Sk:
        site.kind, site.reason = CROSS, (f"flex_attention: {S} queries over {Sk} keys (e.g. keys cached from other "
                                         f"frames): queries and keys are different token sets")
        return site
    _locate_video(site, node, S, q.shape[0], grids, grid_option, plan_grid)
    tiled_by, order_reason = _token_order(site, orders)
    site.reason = (site.reason or _ineligible(dict(dropout_p=0, is_causal=False, enable_gqa=False), q, k, v)
                   or order_reason or _outputs_reason(node) or _options_reason(options)
                   or _buffers_reason(score_buffers + mask_buffers))
    if site.reason:
        site.reason = f"flex_attention: {site.reason}"
        return site
    if not isinstance(scale, (int, float)):
        site.reason = "flex_attention: scale is computed in the graph, not a constant"
        return site
    site.scale = float(scale)
    masks, why = _block_mask(mask_tuple, q.shape[0], q.shape[1], S)
    score_mod = _subgraph(gm, score_node)
    mask_mod = _subgraph(gm, mask_tuple[-1]) if masks else None
    if not why and (score_mod is None or mask_mod is None):
        why = f"its {'score_mod' if score_mod is None else 'mask_mod'} is not a subgraph of this graph"
    if why:
        site.reason = f"flex_attention: {why}"
        return site
    site.inputs = FlexInputs(query, key, value, **masks, score_buffers=tuple(score_buffers),
                             mask_buffers=tuple(mask_buffers), functions=(score_node, mask_tuple[-1]))
    site.model_mask = ModelMask(mask_tuple[-3], mask_tuple[-2], None if _is_true(mask_mod) else _shared(mask_mod),
                                None if _is_identity(score_mod) else _shared(score_mod), tiled_by)
    return site


def _arguments(node: fx.Node) -> tuple:
    args = list(node.args) + [node.kwargs[k] for k in ("score_mod_other_buffers", "mask_mod_other_buffers")
                              if k in node.kwargs]
    return tuple(args + [()] * (9 - len(args)))[:9]


def _token_order(site: Site, orders: list[TokenOrder]) -> tuple[tuple | None, str]:
    """(the tile the model orders this site's video tokens in, None for raster; why not, or "")."""
    if site.grid is None:
        return None, ""
    tiles = {o.tile for o in orders if o.grid == site.grid}
    if len(tiles) > 1:
        return None, (f"the graph lays the {site.grid} video tokens out in more than one order "
                      f"({', '.join('raster' if t is None else f'{t} tiles' for t in tiles)}): which one reaches this "
                      f"attention is not proven")
    tile = next(iter(tiles), None)
    if tile is not None and site.kind == JOINT:
        return None, f"joint attention over video tokens in {tile} tiles: not supported"
    return tile, ""


def _outputs_reason(node: fx.Node) -> str:
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0):
            return "its log-sum-exp (return_lse / return_aux) is used: block-sparse attention would change it"
    return ""


def _options_reason(options) -> str:
    options = dict(options or {})
    for name, value in options.items():
        if name in _SPEED_ONLY:
            continue
        if name not in _DEFAULTS or value != _DEFAULTS[name]:
            return f"kernel option {name}={value!r} is not honoured by the rewrite"
    return ""


def _buffers_reason(buffers) -> str:
    for b in buffers:
        t = example_value(b)
        if not isinstance(t, torch.Tensor):
            return "a score_mod/mask_mod captures a value the graph does not show as a tensor"
        if t.requires_grad:
            return "a score_mod/mask_mod buffer requires grad (compact attention is inference-only)"
    return ""


def _block_mask(mask_tuple, batch: int, heads: int, S: int) -> tuple[dict, str]:
    """The model's block lists (graph nodes, by FlexInputs field), or why they cannot be used."""
    if not isinstance(mask_tuple, (tuple, list)) or len(mask_tuple) < 9:
        return {}, "its block mask is not the (…, Q_BLOCK, KV_BLOCK, mask_mod) tuple of torch 2.13"
    q_block, kv_block = mask_tuple[-3], mask_tuple[-2]
    if not (isinstance(q_block, int) and isinstance(kv_block, int)):
        return {}, "its block mask's block sizes are not constants"
    nodes = dict(zip(("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"), mask_tuple[2:6]))
    for name, n in nodes.items():
        t = example_value(n)
        rank = 4 if name.endswith("indices") else 3
        if not (n is None and name.startswith("full")) and not (isinstance(t, torch.Tensor) and t.dim() == rank):
            return {}, f"its block mask's {name} is not a tensor of the expected rank"
    num, idx = example_value(nodes["kv_num_blocks"]), example_value(nodes["kv_indices"])
    if num.shape[-1] < -(-S // q_block) or idx.shape[-1] < -(-S // kv_block):
        return {}, f"its block mask covers fewer than the {S} tokens of q and k"
    if num.shape[0] not in (1, batch) or num.shape[1] not in (1, heads):
        return {}, f"its block mask's batch and head dims {tuple(num.shape[:2])} do not broadcast to ({batch}, {heads})"
    return nodes, ""


def _subgraph(gm, node) -> fx.GraphModule | None:
    """The GraphModule a score_mod / mask_mod argument names (a get_attr of this graph), or None."""
    target = getattr(gm, node.target, None) if isinstance(node, fx.Node) and node.op == "get_attr" else None
    return target if isinstance(target, fx.GraphModule) else None


def _is_true(mask_mod: fx.GraphModule) -> bool:
    """torch's noop_mask: the mask_mod returns a constant True (`b.new_ones((), dtype=bool)`)."""
    (out,) = [n for n in mask_mod.graph.nodes if n.op == "output"]
    made = out.args[0]
    return (isinstance(made, fx.Node) and made.op == "call_method" and made.target == "new_ones"
            and made.kwargs.get("dtype") is torch.bool and not made.args[1:] and made.kwargs.get("size") == ())


def _is_identity(score_mod: fx.GraphModule) -> bool:
    placeholders = [n for n in score_mod.graph.nodes if n.op == "placeholder"]
    (out,) = [n for n in score_mod.graph.nodes if n.op == "output"]
    return bool(placeholders) and out.args[0] is placeholders[0]


_SHARED: "weakref.WeakValueDictionary[str, fx.GraphModule]" = weakref.WeakValueDictionary()


def _shared(fn: fx.GraphModule) -> fx.GraphModule:
    """One GraphModule per distinct code: every layer traces its own copy of a model's mask_mod, and
    the compiled FlexAttention recompiles for each object it is handed. Copies with the same code and
    no attributes of their own compute the same function, so the first one stands for all."""
    if any(n.op in ("get_attr", "call_module") for n in fn.graph.nodes):
        return fn
    return _SHARED.setdefault(fn.code, fn)


def rewrite_flex_site(gm: fx.GraphModule, site: FlexSite, spec: SiteSpec, handle: int) -> None:
    """Replace the site's flex_attention call by `compact.model_masked_attention` on q, k, v in tile
    order, and the output back in the model's order. Where the model already orders its tokens in
    tiles (`tiled_by`), the gathers go from that order, not from raster; where those tiles are the
    layout's, there is nothing to reorder."""
    layout, inputs, tiled_by = spec.layout, site.inputs, spec.model_mask.tiled_by
    fields = (list(layout.grid), list(layout.tile), layout.block_size, layout.n_text, layout.n_before)
    index = torch.ops.compact.tile_index.default
    graph, node = gm.graph, site.node
    with graph.inserting_before(node):
        if tiled_by == layout.tile:
            src = dst = None
        else:
            src = graph.call_function(index, (inputs.query,) + fields + (False,))     # tiled -> raster
            dst = graph.call_function(index, (inputs.query,) + fields + (True,))      # raster -> tiled
            if tiled_by is not None:
                model = (list(layout.grid), list(tiled_by), math.prod(tiled_by), 0, 0)
                to_model = graph.call_function(index, (inputs.query,) + model + (True,))     # raster -> model
                from_model = graph.call_function(index, (inputs.query,) + model + (False,))  # model -> raster
                src = graph.call_function(torch.index_select, (to_model, 0, src))
                dst = graph.call_function(torch.index_select, (dst, 0, from_model))
        q, k, v = ((x if src is None else graph.call_function(torch.index_select, (x, -2, src)))
                   for x in (inputs.query, inputs.key, inputs.value))
        o = graph.call_function(torch.ops.compact.model_masked_attention.default,
                                (q, k, v, handle, site.scale, inputs.kv_num_blocks, inputs.kv_indices,
                                 inputs.full_kv_num_blocks, inputs.full_kv_indices, list(inputs.score_buffers),
                                 list(inputs.mask_buffers)))
        out = o if dst is None else graph.call_function(torch.index_select, (o, -2, dst))
    users = list(node.users)          # every user is `[0]`, the attention output (_outputs_reason)
    out.meta.update(users[0].meta if users else {})
    for user in users:
        user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)
    for fn in inputs.functions:
        if isinstance(fn, fx.Node) and not fn.users:
            graph.erase_node(fn)
