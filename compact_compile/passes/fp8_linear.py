"""linear(gelu(h), W, b) → quant_rows.fp8_linear(h, W, b, prologue), for weights quantized to float8
(with an eval-mode dropout between them, as diffusers' FeedForward has, looked through).

torchao's float8 linear quantizes its input row by row; where that input is a GELU's output, Inductor
fuses the two into one looped reduction that reads each row twice and computes the GELU twice
(kernels/quant_rows.py). The rewrite hands h itself to one pass that computes the GELU, the row's
scale and the e4m3 values, then runs the same `_scaled_mm` torchao would. Only the GELU forms PyTorch
computes in fp32 from a bf16 input are taken (tanh and erf); anything else is left as it is.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..kernels import quant_rows  # noqa: F401  (registers torch.ops.compact.quant_rows)
from ..kernels.quant_rows import MAX_WIDTH, fp8_linear

_LINEAR = torch._C._nn.linear
_GELU = torch._C._nn.gelu
_PROLOGUE_OF_GELU = {"tanh": "gelu_tanh", "none": "gelu"}


def through_identity_dropout(x: fx.Node) -> fx.Node:
    """x's input where x is a dropout that passes its input on unchanged (not training, or p = 0: how a
    model in eval mode calls it, and Dynamo keeps such calls in the graph)."""
    while x.op == "call_function" and x.target is F.dropout and x.args and isinstance(x.args[0], fx.Node):
        p = x.kwargs.get("p", x.args[1] if len(x.args) > 1 else 0.5)
        training = x.kwargs.get("training", x.args[2] if len(x.args) > 2 else True)
        if training and p != 0:
            break
        x = x.args[0]
    return x


def gelu_prologue(x: fx.Node) -> tuple[fx.Node, str] | None:
    """(h, prologue) where x is gelu(h) of a bf16 h at most quant_rows.MAX_WIDTH wide, else None."""
    if not (x.op == "call_function" and x.target is _GELU and x.args):
        return None
    approximate = x.kwargs.get("approximate", x.args[1] if len(x.args) > 1 else "none")
    h = x.args[0]
    value = h.meta.get("example_value") if isinstance(h, fx.Node) else None
    if (approximate not in _PROLOGUE_OF_GELU or value is None or value.dtype != torch.bfloat16
            or not value.shape or value.shape[-1] > MAX_WIDTH):
        return None
    return h, _PROLOGUE_OF_GELU[approximate]


def fuse_gelu_into_fp8_linears(gm: fx.GraphModule, weights: set[fx.Node]) -> int:
    """Rewrites every linear(gelu(h), W, b) whose W is one of `weights` (placeholders of float8 weights
    that fp8_linear takes); returns how many. A GELU used elsewhere too stays for its other users."""
    fused = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is _LINEAR and len(node.args) > 1
                and node.args[1] in weights and isinstance(node.args[0], fx.Node)):
            continue
        gelu = through_identity_dropout(node.args[0])
        found = gelu_prologue(gelu)
        if found is None:
            continue
        dropout = node.args[0] if node.args[0] is not gelu else None
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fp8_linear, (found[0], node.args[1], bias, found[1]))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for dead in (dropout, gelu):
            if dead is not None and not dead.users:
                gm.graph.erase_node(dead)
        fused += 1
    if fused:
        gm.recompile()
    return fused
