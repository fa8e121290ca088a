"""Attention the backend sees and leaves dense: fused attention kernels called directly.

diffusers' ring attention (its templated ring path, `TemplatedRingAttention`) does not call
`scaled_dot_product_attention`: for each chunk of keys it calls the kernel's own op,
`torch.ops.aten._scaled_dot_product_cudnn_attention` or `…_flash_attention` (its `_native_cudnn` and
`_native_flash` backends), or flash-attn's, for the output and its log-sum-exp, and merges the
chunks' outputs through their log-sum-exps. The key chunks arrive from an all-gather of every
rank's keys. Its Ulysses path on those backends calls the same ops once, after the all-to-all.

Neither is rewritten: block-sparse attention over a ring would need the plan's blocks cut per key
chunk and a merge that stays right for a chunk with no block. They are found here so that the
report lists them, with why, next to the SDPA sites: no attention is left dense without a word.
A module whose calls take some of their keys from an all-gather is one ring-attention site (its
chunk calls counted); any other call is a site of its own.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from .graph_util import argument, example_value, module_path
from .sites import OTHER, Site

RING = "ring attention"
RING_REASON = "ring attention (diffusers' templated ring path): per-chunk LSE merge not rewritten"
_GATHER_DEPTH = 16   # ops between an all-gather and the key a ring chunk call takes (slices, reshapes)


def find_direct_attention(gm: fx.GraphModule) -> list[Site]:
    """A dense site, with its reason, per ring attention and per other direct call of an attention op."""
    by_module: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if _attention_op(node):
            by_module.setdefault(module_path(node), []).append(node)
    sites = []
    for name, calls in by_module.items():
        if any(_gathered(argument(node, 1, "key")) for node in calls):
            op = _attention_op(calls[0])
            sites.append(_site(calls[0], name, RING, f"{RING_REASON} ({op} on each of {len(calls)} key chunks)",
                               op=op, chunks=len(calls)))
            continue
        for i, node in enumerate(calls):
            op = _attention_op(node)
            sites.append(_site(node, name if i == 0 else f"{name}#{i}", OTHER,
                               f"{op} called directly, not scaled_dot_product_attention: not rewritten (under "
                               f"diffusers' Ulysses, the 'native' attention backend calls "
                               f"scaled_dot_product_attention, which is)", op=op))
    return sites


def _attention_op(node: fx.Node) -> str:
    """'aten._scaled_dot_product_cudnn_attention' for a call of an attention operator other than ours
    ('' for anything else; scaled_dot_product_attention itself and flex_attention are not operators
    in a Dynamo graph)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return ""
    packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
    namespace, name = packet._qualified_op_name.split("::")
    return f"{namespace}.{name}" if namespace != "compact" and re.search("attention|attn", name) else ""


def _gathered(node) -> bool:
    """`node` is an all-gather's result, or a slice, chunk or view of one."""
    for _ in range(_GATHER_DEPTH):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
            return False
        if "all_gather" in str(node.target):
            return True
        node = node.args[0]
    return False


def _site(node: fx.Node, name: str, kind: str, reason: str, **extras) -> Site:
    q, k = (example_value(argument(node, i, n)) for i, n in ((0, "query"), (1, "key")))
    return Site(node, name, kind, tuple(getattr(q, "shape", ())), tuple(getattr(k, "shape", ())),
                str(getattr(q, "dtype", "?")).replace("torch.", ""), str(getattr(q, "device", "")),
                reason=reason, extras=extras)
