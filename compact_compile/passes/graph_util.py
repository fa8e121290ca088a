"""Small helpers over torch.fx nodes that several passes share: reading a node (its example value,
static shape, target name, arguments, module path, the dim order a permute or transpose gives) and
two graph edits the rewrites repeat.

The passes read shapes and dtypes only from the fake tensors Dynamo records under
`node.meta["example_value"]`, never from real values.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx


def example_value(x):
    """The value Dynamo recorded for `x` (a fake tensor, a SymInt, …); None if `x` is not a node or has none."""
    return x.meta.get("example_value") if isinstance(x, fx.Node) else None


def static_shape(node) -> tuple[int, ...] | None:
    """The shape of the tensor `node` holds; None if it holds no tensor or a dim is symbolic."""
    value = example_value(node)
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
    return shape if shape is not None and all(isinstance(d, int) for d in shape) else None


# Two names on purpose: target_name also names placeholders, get_attrs and call_modules (their targets
# are strings), call_name answers "" for them. Where key_mask.py matches op names without checking
# node.op it uses target_name; switching it to call_name would change what it matches.
def target_name(node: fx.Node) -> str:
    """The name of `node`'s target ("view", "where", …), whatever the node's op."""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def call_name(node: fx.Node) -> str:
    """The name of the function or method a call node calls; "" for a node of any other op."""
    if node.op not in ("call_function", "call_method"):
        return ""
    return target_name(node)


def argument(node: fx.Node, position: int, name: str, default=None):
    """The argument a call passes as keyword `name` or at `position`; `default` if neither."""
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)


# Two ways to read a permute's or transpose's dim order, kept apart because they fail differently:
# heads.py only replays ops it has checked have no node arguments, and wants every way of writing the
# op followed; token_order.py replays ops it has not checked, and needs None for a non-constant one.
def dim_order(node: fx.Node, ndim: int) -> list[int]:
    """For a permute or transpose of an `ndim`-dim tensor: the input dim each output dim comes from."""
    # the op itself reads its arguments, however they are written: on a meta tensor whose dims all
    # differ in size, the output's sizes name the input dims
    probe = torch.empty(tuple(range(1, ndim + 1)), device="meta")
    return [s - 1 for s in getattr(torch.Tensor, target_name(node))(probe, *node.args[1:], **node.kwargs).shape]


def constant_permutation(node: fx.Node, rank: int) -> list[int] | None:
    """As dim_order, read off constant int arguments only: None if the arguments are not such constants."""
    args = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k in ("dims", "dim0", "dim1")]
    if call_name(node) == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        return [d % rank for d in dims]
    if len(args) != 2 or not all(isinstance(d, int) for d in args):
        return None
    perm = list(range(rank))
    a, b = args[0] % rank, args[1] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def module_path(node: fx.Node) -> str:
    """The dotted path of the module whose forward made `node` ("blocks.0.attn1"); the node's name if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)       # ['blocks'] -> .blocks
    # a module with diffusers hooks (context parallelism's) is called through its hook registry: its
    # `forward` is a partial of a closure whose function reference's `forward.__self__` is the module
    # itself ("blocks.0.forward.func.__closure__[0].cell_contents.forward.__self__.attn1"; older
    # diffusers: "…function_reference.forward.__self__…"): the path from `forward` to `__self__` is
    # the module again
    path = path.replace("function_reference.forward.__self__", "")
    path = re.sub(r"\.forward\.(?:[^.]+\.)*?__self__(?=\.|$)", "", path)
    parts = [p for p in path.split(".") if p not in ("L", "self", "__dict__", "_modules", "")]
    return ".".join(parts) or node.name


def getitems(node: fx.Node, n: int) -> list[fx.Node]:
    """New nodes `node[0]`, …, `node[n - 1]` at the graph's insertion point: a multi-output op's outputs."""
    return [node.graph.call_function(operator.getitem, (node, i)) for i in range(n)]


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Point every user of `old` at `new` and erase `old`."""
    # `new` takes over old's meta: whatever reads the output's example value later still finds it
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)
