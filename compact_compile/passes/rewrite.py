"""Replace an eligible SDPA node by tiled block-sparse attention:

    src = compact.tile_index(q, layout…)          # tiled position -> model position
    dst = compact.tile_index(q, layout…, inverse=True)   # model position -> tiled position
    o   = compact.attention(q[:, :, src], k[:, :, src], v[:, :, src], handle, scale, [])
    out = o[:, :, dst]                                     # back to the model's order

Where the site's kernel rectifies or chooses blocks online, `compact.tile_pool` replaces the three
gathers: it reorders q, k, v and computes their block statistics (q̄, δq, k̄, δk, v̄) in one pass,
handed to `compact.attention`. A kernel without an epilogue for R·O + Ō (FlexAttention) returns O, R, Ō instead
(`compact.attention_parts`), and the graph merges them on the way back to model order:

    out = R[dst // B] · O[dst] + Ō[dst // B]        (B the block size; one pass, fused by Inductor)

Where the spec is fp8, `compact.tile_quant` reorders q, k, v into e4m3 tiles with their scales (and
pools them where the spec is pooled) in one pass, after the graph has reduced k to its mean and v to
its channel amax over the tokens (kernels/fp8.py: smoothing needs the mean before the first tile is
written; the reductions read k and v in the model's order, where Inductor can fuse them into their
producers); `compact.attention_fp8` takes the tiles:

    k_mean, v_amax = smoothing_stats(k, v, key_valid_in_model_order)
    q8, k8, v8ᵀ, σq, σk, σv, *pools = compact.tile_quant(q, k, v, k_mean, v_amax, layout…, key_valid, pooled, handle)
    o   = compact.attention_fp8(q8, k8, v8ᵀ, [σq, σk, σv, k_mean], [q, k, v], handle, scale, pools, key_valid, dtype)

(q, k, v themselves reach the op too: a dense warm-up step runs the kernel's dense attention on them,
in their dtype, not FP8 over every block, and `tile_quant` skips its pass there.)

A key-padding mask (`attn_mask` [B, 1, 1, S], or a broadcast of it) reaches the op as `key_valid`,
bool [B, S] in tile order; for valid_q ⊗ valid_k the output's rows of padded queries are then set to
0, as SDPA leaves a row that masks every key.

The index is computed once per layout and device. Inductor fuses a gather into a pointwise producer
of q, k, v where it can; after a reduction (RMSNorm, then RoPE) it is a pass of its own, one read
and one write of the tensor.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import ops  # noqa: F401  (registers the torch.ops.compact ops)
from ..kernels.fp8 import smoothing_stats
from ..kernels.registry import kv_block_lists
from ..spec import SiteSpec
from .graph_util import getitems, replace_node
from .sites import Site, sdpa_arguments


def merge_in_model_order(o, r, o_bar, dst, block_size: int):
    """R·O + Ō back in the model's token order, written as gathers and arithmetic that Inductor
    compiles into one pass: model token i is tiled row dst[i] of block dst[i] // block_size."""
    block = torch.div(dst, block_size, rounding_mode="floor")
    merged = r.index_select(-1, block)[..., None] * o.index_select(-2, dst).to(r.dtype) + o_bar.index_select(-2, block)
    return merged.to(o.dtype)


def _key_row(mask):
    """`[B or 1, S]`: the one row of a key-padding mask `[.., 1, 1, S]` (or a broadcast of it)."""
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))[:, 0, 0, :]


def key_valid_in_model_order(mask, batch: int):
    """bool `[B, S]` from a key-padding mask that the site's classification proved to be the same for
    every head and query (passes/masks.py): bool (True = attend) or additive 0/−inf."""
    keys = _key_row(mask)
    return (keys if keys.dtype == torch.bool else keys > float("-inf")).expand(batch, -1)


def key_valid_in_tile_order(mask, src, batch: int):
    return key_valid_in_model_order(mask, batch).index_select(-1, src)


def zero_masked_queries(out, mask):
    """`out` [B, H, S, D] with the rows of queries the key mask excludes set to 0 (model order)."""
    keys = _key_row(mask)
    return out * keys[:, None, :, None].to(out.dtype)


def frame_block_lists(frames):
    """A frame mask F `[T, T]` as the lists of a BlockMask whose blocks are whole frames, each listed
    one full (kernels/model_mask.py): no partial blocks, and per query frame the key frames where F
    holds, ascending. int32 `[1, 1, T, T]` each: (num, indices, full num, full indices)."""
    full_num, full_indices = kv_block_lists(frames.reshape(frames.shape[-2:]))
    return (torch.zeros_like(full_num)[None, None], torch.zeros_like(full_indices)[None, None],
            full_num[None, None], full_indices[None, None])


def rewrite_frame_masked_site(gm: fx.GraphModule, site: Site, spec: SiteSpec, handle: int) -> None:
    """Replace an SDPA whose attn_mask is a frame mask (key_mask.py) by the model-mask op on q, k, v
    in tile order: the plan's blocks, intersected with the frame pairs the mask allows."""
    layout = spec.layout
    a = sdpa_arguments(site.node)
    fields = (list(layout.grid), list(layout.tile), layout.block_size, layout.n_text, layout.n_before)
    index = torch.ops.compact.tile_index.default
    scale = site.scale if site.scale is not None else site.q_shape[-1] ** -0.5
    graph = gm.graph
    with graph.inserting_before(site.node):
        src = graph.call_function(index, (a["query"],) + fields + (False,))
        dst = graph.call_function(index, (a["query"],) + fields + (True,))
        q, k, v = (graph.call_function(torch.index_select, (a[n], -2, src)) for n in ("query", "key", "value"))
        lists = graph.call_function(frame_block_lists, (site.mask.frames,))
        num, indices, full_num, full_indices = getitems(lists, 4)
        o = graph.call_function(torch.ops.compact.model_masked_attention.default,
                                (q, k, v, handle, scale, num, indices, full_num, full_indices, [], []))
        out = graph.call_function(torch.index_select, (o, -2, dst))
    replace_node(site.node, out)


def rewrite_site(gm: fx.GraphModule, site: Site, spec: SiteSpec, handle: int) -> None:
    """Replace the site's SDPA node by the spec's op. spec.pooled: the op takes rectification's block
    statistics, so q, k, v are reordered by `compact.tile_pool`, which computes them in the same
    pass. spec.merge_in_graph: the op returns O, R, Ō (`compact.attention_parts`) and the graph
    merges R·O + Ō in the same pass that returns the output to model order. spec.fp8: q, k, v are
    reordered into e4m3 tiles by `compact.tile_quant` for `compact.attention_fp8`. spec.key_mask: the
    SDPA's attn_mask becomes a per-batch key mask in tile order."""
    layout = spec.layout
    a = sdpa_arguments(site.node)
    fields = (list(layout.grid), list(layout.tile), layout.block_size, layout.n_text, layout.n_before)
    index = torch.ops.compact.tile_index.default
    graph = gm.graph
    with graph.inserting_before(site.node):
        dst = graph.call_function(index, (a["query"],) + fields + (True,))
        key_valid = None
        if spec.key_mask or not (spec.pooled or spec.fp8):
            src = graph.call_function(index, (a["query"],) + fields + (False,))
        if spec.key_mask:
            key_valid = graph.call_function(key_valid_in_tile_order, (site.mask.node, src, site.q_shape[0]))
        if spec.fp8:
            o = _fp8_attention(graph, a, fields, key_valid, spec.pooled, handle, site)
            out = graph.call_function(torch.index_select, (o, -2, dst))
        else:
            if spec.pooled:
                out = graph.call_function(torch.ops.compact.tile_pool.default,
                                          (a["query"], a["key"], a["value"]) + fields + (key_valid,))
                q, k, v, *pools = getitems(out, 8)
            else:
                q, k, v = (graph.call_function(torch.index_select, (a[n], -2, src)) for n in ("query", "key", "value"))
                pools = []
            call = (q, k, v, handle, site.scale, pools, key_valid)
            if spec.merge_in_graph:
                parts = graph.call_function(torch.ops.compact.attention_parts.default, call)
                o, r, o_bar = getitems(parts, 3)
                out = graph.call_function(merge_in_model_order, (o, r, o_bar, dst, layout.block_size))
            else:
                o = graph.call_function(torch.ops.compact.attention.default, call)
                out = graph.call_function(torch.index_select, (o, -2, dst))
        if spec.key_mask and site.mask.zero_masked_queries:
            out = graph.call_function(zero_masked_queries, (out, site.mask.node))
    replace_node(site.node, out)


def _fp8_attention(graph: fx.Graph, a: dict, fields: tuple, key_valid, pooled: bool, handle: int, site: Site):
    """The nodes of an fp8 site, inserted where the graph's insertion point is: k's mean and v's
    channel amax, the quantizing reorder, the FP8 op; returns the op's node (output in tile order)."""
    keys = None if key_valid is None else graph.call_function(key_valid_in_model_order,
                                                              (site.mask.node, site.q_shape[0]))
    stats = graph.call_function(smoothing_stats, (a["key"], a["value"], keys))
    k_mean, v_amax = getitems(stats, 2)
    out = graph.call_function(torch.ops.compact.tile_quant.default,
                              (a["query"], a["key"], a["value"], k_mean, v_amax) + fields + (key_valid, pooled, handle))
    q, k, v_t, q_scale, k_scale, v_scale, *pools = getitems(out, 11 if pooled else 6)
    unquantized = [a["query"], a["key"], a["value"]]     # the dense (warm-up) steps run on these
    return graph.call_function(torch.ops.compact.attention_fp8.default,
                               (q, k, v_t, [q_scale, k_scale, v_scale, k_mean], unquantized, handle, site.scale, pools,
                                key_valid, getattr(torch, site.dtype)))
