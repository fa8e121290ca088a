"""Which of the model's heads a site holds when an all-to-all handed it a share of them (Ulysses).

Under sequence parallelism (diffusers' context parallelism, xDiT) each rank holds a slice of the
tokens; before attention an all-to-all (`_c10d_functional.all_to_all_single`) gives every rank the
whole sequence for H/n of the heads. A per-head plan has rows for all H heads, and the rank's site
needs the rows of its own. The graph says which, and only the graph is trusted: the view ops
from the first tensor that has the H heads as a dim (the model's own split of its projection into
heads) to the all-to-all, and from the all-to-all to the SDPA's q, k, v, are replayed on a tensor of
head indices. Every rank runs the same graph, so chunk j
of the all-to-all's output is chunk `rank` of rank j's input, and rank j's head indices are this
rank's: the replay takes chunk `rank` n times. The slice is known only if each head of q, k and v
then holds one model head throughout, the same for all three.

The replay tensor holds the head indices only, not the tokens: a head index is the same at every
token (and batch row, and head-dim lane), so every other dim is 1 in the replay, a few dozen
integers whatever the video size. The graph's view ops carry sizes of the full tensors, so each
shape is followed as a list of factors per dim, each factor the size it has in the graph and
whether the replay keeps it (it holds head indices) or shrinks it to 1; a view regroups the
factors in row-major order, and the replay reshapes to the product of the kept ones. A view the
factors do not follow (a dim boundary inside a factor that does not divide it), an all-to-all that
does not split head factors, or q, k, v heads that take in a token factor (a view that mixes the
sequence into the heads) leave the slice unproven rather than guessed.

Tensor parallelism (a projection's weight sharded as a DTensor, diffusers' TensorParallelConfig)
also gives each rank's attention H/n heads, with no collective before it: the heads are whichever
columns of q's projection the rank holds, which the graph shows only through the ops after the
projection (RMSNorm, RoPE: not views), so it is reported as unproven too.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .graph_util import dim_order, example_value, static_shape, target_name

_VIEWS = {"reshape", "view", "permute", "transpose", "flatten", "unflatten", "unsqueeze", "squeeze"}
_SAME_VALUES = {"contiguous", "clone", "to", "float", "half", "bfloat16", "type", "detach"}
_REORDERS = {"permute", "transpose"}
_TP_SEARCH = 64          # graph nodes searched above q for a tensor-parallel projection

Factor = tuple[int, bool]   # (size in the graph, kept in the replay: it holds head indices)


def _is(node, op_name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name in str(node.target)


def _replayable(node) -> bool:
    return (isinstance(node, fx.Node) and node.op in ("call_method", "call_function")
            and (target_name(node) in _VIEWS | _SAME_VALUES or _is(node, "wait_tensor"))
            and not any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())))


def _chain(node):
    """(the nodes from the first non-replayable ancestor up to `node`, in graph order; that ancestor)."""
    chain = []
    while _replayable(node):
        chain.append(node)
        node = node.args[0]
    return chain[::-1], node


def _small(dims: list[list[Factor]]) -> list[int]:
    """The replay's shape: per dim, the product of its kept factors."""
    return [math.prod(size for size, kept in dim if kept) for dim in dims]


def _regroup(dims: list[list[Factor]], shape) -> list[list[Factor]] | None:
    """The factors of `dims`, in row-major order, grouped into the dims of `shape` as a view groups
    elements; a factor a dim boundary cuts is split in two (outer part first). None when a boundary
    falls inside a factor it does not divide, or the element counts differ."""
    factors = [f for dim in dims for f in dim]
    out = []
    for size in shape:
        dim, need = [], size
        while need > 1 and factors:
            full, kept = factors.pop(0)
            if need % full == 0:
                dim.append((full, kept))
                need //= full
            elif full % need == 0:
                dim.append((need, kept))
                factors.insert(0, (full // need, kept))
                need = 1
            else:
                return None
        if need != 1:
            return None
        out.append(dim)
    return None if factors else out


def _replay(chain, x: torch.Tensor, dims: list[list[Factor]]):
    """(x and its factors after the chain's views; None, None if a view is not followed)."""
    for node in chain:
        name = target_name(node)
        if name in _SAME_VALUES or _is(node, "wait_tensor"):
            continue                                   # values (head indices) unchanged
        if name in _REORDERS:
            x = getattr(torch.Tensor, name)(x, *node.args[1:], **node.kwargs)
            dims = [dims[i] for i in dim_order(node, len(dims))]
            continue
        # every other view keeps the elements' row-major order: a reshape to the node's shape
        shape = static_shape(node)
        dims = None if shape is None else _regroup(dims, shape)
        if dims is None:
            return None, None
        x = x.reshape(_small(dims))
    return x, dims


def head_slice(sdpa_args: dict) -> tuple[tuple[int, ...] | None, int, str]:
    """(the model heads of the site's heads, in order; the model's head count; "") when q, k, v come
    out of an all-to-all the graph proves to be a head split; (None, 0, "") when no collective or
    sharded projection feeds them; (None, 0, why) otherwise."""
    found = [_slice_of(sdpa_args[name]) for name in ("query", "key", "value")]
    if all(f == (None, 0, "") for f in found):
        why = _tensor_parallel(sdpa_args["query"])
        return None, 0, why and f"tensor parallelism: which model heads this rank holds is not proven ({why})"
    heads = {f[:2] for f in found}
    if len(heads) != 1 or None in next(iter(heads)):
        why = next((f[2] for f in found if f[2]), "q, k and v hold different heads")
        return None, 0, f"sequence parallelism: which model heads this rank holds is not proven ({why})"
    return (*heads.pop(), "")


def replayed_heads(node) -> tuple[torch.Tensor | None, int, str]:
    """(the model head of every element of the tensor `node` (q, k or v), on the replay's shape:
    every dim but those holding head indices is 1; the model's head count; "") when an all-to-all
    feeds it through views; (None, 0, "") without an all-to-all; (None, 0, why) when the views do
    not show which heads it holds."""
    after, a2a = _chain(node)
    if not _is(a2a, "all_to_all_single"):
        return None, 0, ""
    x, out_splits, in_splits, group_name = a2a.args[:4]
    if any(splits is not None and (len(set(splits)) > 1 or not all(isinstance(v, int) for v in splits))
           for splits in (out_splits, in_splits)):
        return None, 0, f"an all-to-all with uneven splits {out_splits}, {in_splits}"
    import torch.distributed as dist

    group = dist.distributed_c10d._resolve_process_group(group_name)
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    local = static_shape(node)
    if local is None or len(local) != 4:
        return None, 0, "q, k or v has no static 4-D shape"
    h = local[1]
    # the replay starts at the first tensor that shows the model's heads as a dim: before the all-to-all's
    # views, after the model's own split of its projection into heads (diffusers: unflatten to [B, S, H, D])
    before, source = _chain(x)
    tensors = [source] + before
    start = next((i for i, t in enumerate(tensors) if n * h in (static_shape(t) or ())), None)
    if start is None:
        return None, 0, f"no tensor before the all-to-all has a dim of {n} × {h} heads"
    source, before, shape = tensors[start], before[start:], static_shape(tensors[start])
    head_dims = [d for d, size in enumerate(shape) if size == n * h]
    if len(head_dims) != 1:
        return None, 0, f"the tensor before the all-to-all, {shape}, has more than one dim of {n} × {h} heads"
    dims = [[(size, d == head_dims[0])] if size > 1 else [] for d, size in enumerate(shape)]
    sent, dims = _replay(before, torch.arange(n * h).reshape(_small(dims)), dims)
    if sent is None:
        return None, 0, "a view before the all-to-all regroups its dims in a way the replay does not follow"
    # the all-to-all sends chunk j of dim 0 to rank j: those n chunks must cut head factors only
    split = _regroup([dims[0]], [n, math.prod(size for size, _ in dims[0]) // n])
    if split is None or not all(kept for _, kept in split[0]):
        return None, 0, "the all-to-all does not split the model's heads"
    received = torch.cat([sent.chunk(n)[rank]] * n)
    got, dims = _replay(after, received, [split[0] + split[1]] + dims[1:])
    if got is None:
        return None, 0, "a view after the all-to-all regroups its dims in a way the replay does not follow"
    if not all(kept for _, kept in dims[1]):
        return None, 0, "a view merges tokens or head-dim lanes into the heads of q, k or v"
    return got, n * h, ""


def _slice_of(node) -> tuple[tuple[int, ...] | None, int, str]:
    got, n_heads, why = replayed_heads(node)
    if got is None:
        return None, 0, why
    per_head = got.transpose(0, 1).reshape(got.shape[1], -1)
    if not bool((per_head == per_head[:, :1]).all()):
        return None, 0, "a head of q mixes model heads"
    return tuple(int(i) for i in per_head[:, 0]), n_heads, ""


def _tensor_parallel(node) -> str:
    """Why q is taken to hold a tensor-parallel share of the heads ("" if not): a DTensor sharded
    over a device mesh among the nodes just above it (its projection, turned local by to_local)."""
    seen, todo = set(), [node]
    while todo and len(seen) < _TP_SEARCH:
        n = todo.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        placements = getattr(example_value(n), "placements", ())
        if any(p.is_shard() for p in placements):
            return (f"q is computed from a DTensor sharded {tuple(placements)} (graph node {n.name}): the rank holds "
                    f"some of the heads' columns, and a sharded projection's columns are not followed to the "
                    f"attention's heads (they pass through ops such as RMSNorm and RoPE, not views only); use a "
                    f"head-agnostic plan ('window', 'dynamic'), or Ulysses, where per-head plans are sliced per rank")
        todo.extend(a for a in n.all_input_nodes if a not in seen)
    return ""
