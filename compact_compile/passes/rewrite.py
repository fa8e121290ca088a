"""Replace an eligible SDPA node by tiled block-sparse attention:

    src = tiled_source_index(q)                  # arange arithmetic, no tensor constant
    o   = compact.attention(q[:, :, src], k[:, :, src], v[:, :, src], handle, scale)
    out = o[:, :, tiled_target_index(o)]         # back to the model's token order

Inductor fuses the gathers into the kernels that produce q, k, v (RoPE, norms) and into the copy
that feeds the output projection, so the reorder costs about one pass over v.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import ops  # noqa: F401  (registers torch.ops.compact.attention)
from ..layout import TokenLayout
from .sites import Site, sdpa_arguments


def tiled_source_index(x: torch.Tensor, grid, tile, block_size, n_text, text_first) -> torch.Tensor:
    return TokenLayout(grid, tile, block_size, n_text, text_first).source_index(x.device)


def tiled_target_index(x: torch.Tensor, grid, tile, block_size, n_text, text_first) -> torch.Tensor:
    return TokenLayout(grid, tile, block_size, n_text, text_first).target_index(x.device)


def rewrite_site(gm: fx.GraphModule, site: Site, layout: TokenLayout, handle: int) -> None:
    a = sdpa_arguments(site.node)
    fields = (layout.grid, layout.tile, layout.block_size, layout.n_text, layout.text_first)
    graph = gm.graph
    with graph.inserting_before(site.node):
        src = graph.call_function(tiled_source_index, (a["query"],) + fields)
        q, k, v = (graph.call_function(torch.index_select, (a[n], -2, src)) for n in ("query", "key", "value"))
        o = graph.call_function(torch.ops.compact.attention.default, (q, k, v, handle, site.scale))
        dst = graph.call_function(tiled_target_index, (o,) + fields)
        out = graph.call_function(torch.index_select, (o, -2, dst))
    out.meta.update(site.node.meta)
    site.node.replace_all_uses_with(out)
    graph.erase_node(site.node)
