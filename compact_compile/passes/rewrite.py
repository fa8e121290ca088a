"""Replace an eligible SDPA node by tiled block-sparse attention:

    src = compact.tile_index(q, layout…)          # tiled position -> model position
    o   = compact.attention(q[:, :, src], k[:, :, src], v[:, :, src], handle, scale)
    out = o[:, :, compact.tile_index(o, layout…, inverse=True)]   # back to the model's order

The index is computed once per layout and device. Inductor fuses the gathers into the kernels that
produce q, k, v (RoPE, norms) and into the copy that feeds the output projection, so the reorder
costs about one pass over v.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import ops  # noqa: F401  (registers the torch.ops.compact ops)
from ..layout import TokenLayout
from .sites import Site, sdpa_arguments


def rewrite_site(gm: fx.GraphModule, site: Site, layout: TokenLayout, handle: int) -> None:
    a = sdpa_arguments(site.node)
    fields = (list(layout.grid), list(layout.tile), layout.block_size, layout.n_text, layout.text_first)
    index = torch.ops.compact.tile_index.default
    graph = gm.graph
    with graph.inserting_before(site.node):
        src = graph.call_function(index, (a["query"],) + fields + (False,))
        q, k, v = (graph.call_function(torch.index_select, (a[n], -2, src)) for n in ("query", "key", "value"))
        o = graph.call_function(torch.ops.compact.attention.default, (q, k, v, handle, site.scale))
        dst = graph.call_function(index, (o,) + fields + (True,))
        out = graph.call_function(torch.index_select, (o, -2, dst))
    out.meta.update(site.node.meta)
    site.node.replace_all_uses_with(out)
    graph.erase_node(site.node)
