"""Is an SDPA's `attn_mask` a key-padding mask — the same for every head and every query?

Only then can block-sparse attention honour it exactly: excluding masked keys inside the kept
blocks is the same computation as the dense masked call with some key blocks dropped. The proof is
read off the graph, never off values:

- shape: a mask `[B or 1, 1, 1, N]` broadcasts over heads and queries by construction
  (HunyuanVideo's joint mask is `[B, 1, 1, N]`);
- provenance: a larger mask made by `expand`/`repeat`/`broadcast_to` (or a view, a dtype cast, a
  `contiguous`) of such a tensor, e.g. `mask.view(B, 1, 1, N).repeat(1, 1, N, 1)`.

One more form is exact: `m & m.transpose(-1, -2)` of such a broadcast `m` (HunyuanVideo 1.5's
valid_q ⊗ valid_k). A valid query's row is the key mask (its own key is valid, so the row is never
empty); a padded query's row masks every key, and SDPA returns 0 for a row with no key: the key
mask, then the padded queries' rows set to 0 (`KeyMask.zero_masked_queries`).

And a frame mask over video self-attention: a `[T, T]` bool tensor F broadcast to every token of
each frame, `F.view(T, 1, 1, T, 1, 1).repeat(1, H, W, 1, H, W).reshape(N, N)` (SkyReels-V2's
diffusion-forcing causal blocks): query token of frame t attends key token of frame t' iff F[t, t']
(`KeyMask.frames`).

Its values must be boolean (True = attend), or additive with only 0 and −inf: a float mask counts
when it comes from `where(b, 0, -inf)` or `masked_fill(zeros, b, -inf)` of a boolean key mask, through
float casts only, since any other additive value (e.g. −10000, or the 1 of a round trip through bool)
re-weights keys instead of excluding them.

The proof reads ops as pure functions, so a tensor it passes through must not be changed in place
(`mask[i] = …`, `mask.add_(…)`, also through a view of it): such a mask is kept dense. The one
exception is the key-shaped source itself, which any edit leaves a key mask (the op reads the mask
SDPA gets, at run time).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_util import example_value, target_name

_BROADCASTS = {  # ops whose output holds the same values per (batch, key) as their first input
    "expand", "expand_as", "repeat", "broadcast_to", "contiguous", "clone", "to", "bool", "view", "reshape",
    "unsqueeze",
}
_VALUE_PRESERVING = _BROADCASTS | {  # ops whose output values are some of their first input's values
    "getitem", "permute", "transpose", "squeeze", "flatten", "unflatten", "type", "float", "half", "bfloat16",
}


def _is_key_shaped(t, n_keys: int) -> bool:
    return t is not None and t.dim() <= 4 and t.shape[-1] == n_keys and all(s == 1 for s in tuple(t.shape)[-3:-1])


def _broadcast_source(node, n_keys: int, depth: int = 8):
    """The key-shaped tensor node this mask was broadcast from, or None (also where a tensor on the
    way, other than that source, is changed in place)."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return None
        if _is_key_shaped(example_value(node), n_keys):
            return node
        if (node.op not in ("call_method", "call_function") or target_name(node) not in _BROADCASTS
                or _changed_in_place(node)):
            return None
        if target_name(node) in ("view", "reshape") and not _keeps_batch_and_keys(node, n_keys):
            return None
        node = node.args[0]
    return None


def _keeps_batch_and_keys(view: fx.Node, n_keys: int) -> bool:
    """A view whose input and output share their first (batch) and last (key) dims: in row-major order
    it then only regroups the dims between, so values that depend on (batch, key) alone still do
    (`[X, 1, 1, N]` viewed as `[1, 1, X, N]` would move X onto the queries)."""
    source, out = example_value(view.args[0]), example_value(view)
    return (source is not None and out is not None and source.dim() >= 2 and out.dim() >= 2
            and source.shape[0] == out.shape[0] and source.shape[-1] == out.shape[-1] == n_keys
            and source.numel() == out.numel())


_VIEWS = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "transpose", "permute", "getitem",
          "flatten", "unflatten", "select", "narrow", "as_strided", "contiguous", "detach", "view_as", "broadcast_to"}


_IN_PLACE_OPERATORS = {operator.setitem, operator.iand, operator.ior, operator.ixor, operator.iadd, operator.isub,
                       operator.imul, operator.itruediv}


def _changed_in_place(node: fx.Node, depth: int = 4) -> bool:
    """Whether the graph changes `node`'s tensor in place (`x[i] = …`, `x &= …`, `x.add_(…)`,
    `torch.relu_(x)`), directly or through a view of it."""
    for user in node.users:
        name = target_name(user)
        if user.args and user.args[0] is node:
            in_place = (user.target in _IN_PLACE_OPERATORS if getattr(user.target, "__module__", "") == "_operator"
                        else name.endswith("_") and not name.startswith("_"))
            if in_place:
                return True
            if depth and name in _VIEWS and _changed_in_place(user, depth - 1):
                return True
    return False


def _is_minus_inf(x) -> bool:
    return isinstance(x, (int, float)) and x == -math.inf


def _additive_from_bool(node: fx.Node) -> bool:
    """True for `where(b, 0, -inf)` and `zeros.masked_fill(b, -inf)`-shaped producers."""
    name = target_name(node)
    if name == "where" and len(node.args) == 3:
        cond, a, b = node.args
        return (example_value(cond) is not None and example_value(cond).dtype == torch.bool
                and isinstance(a, (int, float)) and a == 0 and _is_minus_inf(b))
    if name in ("masked_fill", "masked_fill_") and len(node.args) == 3:
        base, cond, fill = node.args
        producer = base if isinstance(base, fx.Node) else None
        zeros = producer is not None and target_name(producer) in ("zeros", "zeros_like", "new_zeros")
        return (zeros and _is_minus_inf(fill) and example_value(cond) is not None
                and example_value(cond).dtype == torch.bool)
    return False


@dataclass(frozen=True)
class KeyMask:
    """What an attn_mask was proven to be: `node` broadcasts the key mask (its [..., 0, 0, :] is the
    per-key validity); with `zero_masked_queries` the rows of masked queries (the same validity, over
    queries) are 0. `reason`: why the mask is not one of these (the site stays dense)."""
    reason: str = ""
    node: fx.Node | None = None
    zero_masked_queries: bool = False
    frames: fx.Node | None = None    # a frame mask: the [T, T] bool tensor it broadcasts


_ANDS = (operator.and_, torch.logical_and, torch.bitwise_and)


def _query_and_key(mask_node, n_keys: int):
    """For `m & m.transpose(-1, -2)` (either order, through bool casts) of a key-mask broadcast `m`:
    the node of `m`; else None."""
    node = mask_node
    while isinstance(node, fx.Node) and node.op == "call_method" and target_name(node) in ("bool", "contiguous"):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ANDS and len(node.args) == 2):
        return None
    for m, t in (node.args, node.args[::-1]):
        if (isinstance(t, fx.Node) and target_name(t) == "transpose" and len(t.args) == 3
                and sorted(d % 4 for d in t.args[1:]) == [2, 3] and example_value(t.args[0]) is not None
                and example_value(t.args[0]).dim() == 4 and _broadcast_source(m, n_keys) is not None
                and _broadcast_source(t.args[0], n_keys) is _broadcast_source(m, n_keys)):
            return m
    return None


def _frame_mask(mask_node, grid) -> fx.Node | None:
    """The [T, T] node F of `F.view(T, 1, 1, T, 1, 1).repeat(1, H, W, 1, H, W).reshape(N, N)` (with
    leading unit dims added by unsqueeze/view), for the video grid (T, H, W); else None."""
    if grid is None:
        return None
    T, H, W = grid
    node = mask_node
    while (isinstance(node, fx.Node) and target_name(node) in ("unsqueeze", "view", "reshape", "bool")
           and example_value(node.args[0]) is not None and example_value(node.args[0]).dim() != 6):
        node = node.args[0]                          # leading unit dims, casts
    if not (isinstance(node, fx.Node) and target_name(node) in ("reshape", "view") and example_value(node) is not None
            and tuple(example_value(node).shape) == (T * H * W,) * 2):
        return None
    repeated = node.args[0]
    if not (isinstance(repeated, fx.Node) and target_name(repeated) == "repeat"
            and tuple(example_value(repeated).shape) == (T, H, W) * 2 and tuple(repeated.args[1:]) == (1, H, W) * 2):
        return None
    viewed = repeated.args[0]
    if not (isinstance(viewed, fx.Node) and target_name(viewed) in ("view", "reshape")
            and tuple(example_value(viewed).shape) == (T, 1, 1) * 2):
        return None
    frames = viewed.args[0]
    value = example_value(frames)
    if any(_changed_in_place(n) for n in (node, repeated, viewed, frames)):
        return None      # F too: the block lists are built from F, which must be what the repeat copied
    return frames if value is not None and tuple(value.shape) == (T, T) and value.dtype == torch.bool else None


def classify_mask(mask_node, n_keys: int, grid=None) -> KeyMask:
    """A key-padding mask (bool, or additive 0/−inf), valid_q ⊗ valid_k of one, or (self-attention
    over the video `grid` alone) a frame mask; else why not."""
    mask = example_value(mask_node)
    if mask is None:
        return KeyMask("attn_mask is not a tensor the graph can inspect (kept dense)")
    if isinstance(mask_node, fx.Node) and _changed_in_place(mask_node) and not _is_key_shaped(mask, n_keys):
        return KeyMask("attn_mask is changed in place after it is made (the graph's proof reads it as made): kept dense")
    if mask.dtype == torch.bool:
        both = _query_and_key(mask_node, n_keys)
        if both is not None:
            return KeyMask(node=both, zero_masked_queries=True)
        frames = _frame_mask(mask_node, grid)
        if frames is not None:
            return KeyMask(frames=frames)
    source = _broadcast_source(mask_node, n_keys)
    if source is None:
        return KeyMask(f"attn_mask {tuple(mask.shape)} is not provably a key-padding mask (the same for every head "
                       f"and query): kept dense")
    reason = _values_reason(mask_node, mask)
    return KeyMask(reason, None if reason else mask_node)


def _values_reason(mask_node, mask) -> str:
    if mask.dtype == torch.bool:
        return ""
    if not mask.is_floating_point():
        return f"attn_mask of dtype {mask.dtype} (bool or float expected): kept dense"
    node = mask_node
    for _ in range(8):   # through float casts, views and indexing to the op that made the additive values
        value = example_value(node)
        if value is None or not value.is_floating_point() or _changed_in_place(node):
            break        # a round trip through bool (0/−inf → 0/1) or an in-place edit changes the values
        if _additive_from_bool(node):
            return ""
        if (node.op not in ("call_method", "call_function") or target_name(node) not in _VALUE_PRESERVING
                or not node.args or not isinstance(node.args[0], fx.Node)):
            break
        node = node.args[0]
    return ("additive attn_mask whose values the graph does not prove to be 0 or −inf (other values re-weight "
            "keys instead of excluding them): kept dense")
