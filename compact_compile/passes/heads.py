"""Which of the model's heads a site holds when an all-to-all handed it a share of them (Ulysses).

Under sequence parallelism (diffusers' context parallelism, xDiT) each rank holds a slice of the
tokens; before attention an all-to-all (`_c10d_functional.all_to_all_single`) gives every rank the
whole sequence for H/n of the heads. A per-head plan has rows for all H heads, and the rank's site
needs the rows of its own. The graph says which, and only the graph is trusted: the view ops
between the last tensor with all H heads and the all-to-all, and between the all-to-all and the
SDPA's q, k, v, are replayed on a tensor of head indices. Every rank runs the same graph, so chunk j
of the all-to-all's output is chunk `rank` of rank j's input, and rank j's head indices are this
rank's: the replay takes chunk `rank` n times. The slice is known only if each head of q, k and v
then holds one model head throughout, the same for all three.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .key_mask import _op_name as _name

_VIEWS = {"reshape", "view", "permute", "transpose", "flatten", "unflatten", "unsqueeze", "squeeze"}
_SAME_VALUES = {"contiguous", "clone", "to", "float", "half", "bfloat16", "type", "detach"}


def _is(node, op_name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name in str(node.target)


def _replayable(node) -> bool:
    return (isinstance(node, fx.Node) and node.op in ("call_method", "call_function")
            and (_name(node) in _VIEWS | _SAME_VALUES or _is(node, "wait_tensor"))
            and not any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())))


def _chain(node):
    """(the nodes from the first non-replayable ancestor up to `node`, in graph order; that ancestor)."""
    chain = []
    while _replayable(node):
        chain.append(node)
        node = node.args[0]
    return chain[::-1], node


def _replay(chain, x: torch.Tensor) -> torch.Tensor:
    for node in chain:
        name = _name(node)
        if name in _SAME_VALUES or _is(node, "wait_tensor"):
            continue                                   # values (head indices) unchanged
        x = getattr(torch.Tensor, name)(x, *node.args[1:], **node.kwargs)
    return x


def head_slice(sdpa_args: dict) -> tuple[tuple[int, ...] | None, int, str]:
    """(the model heads of the site's heads, in order; the model's head count; "") when q, k, v come
    out of an all-to-all the graph proves to be a head split; (None, 0, "") when there is no
    all-to-all; (None, 0, why) otherwise."""
    found = [_slice_of(sdpa_args[name]) for name in ("query", "key", "value")]
    if all(f == (None, 0, "") for f in found):
        return None, 0, ""
    heads = {f[:2] for f in found}
    if len(heads) != 1 or None in next(iter(heads)):
        why = next((f[2] for f in found if f[2]), "q, k and v hold different heads")
        return None, 0, f"sequence parallelism: which model heads this rank holds is not proven ({why})"
    return (*heads.pop(), "")


def _slice_of(node) -> tuple[tuple[int, ...] | None, int, str]:
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
    before, source = _chain(x)
    local = node.meta["example_value"]
    h = local.shape[1]
    shape = tuple(source.meta["example_value"].shape)
    dims = [d for d, size in enumerate(shape) if size == n * h]
    if len(dims) != 1:
        return None, 0, f"the tensor before the all-to-all, {shape}, has no one dim of {n} × {h} heads"
    # one byte per element where it can (the replay materialises tensors of the pre-all-to-all size)
    dtype = torch.int8 if n * h <= 127 else torch.int16
    ids = torch.arange(n * h, dtype=dtype).view([-1 if d == dims[0] else 1 for d in range(len(shape))])
    sent = _replay(before, ids.expand(shape))
    received = torch.cat([sent.chunk(n)[rank]] * n)
    got = _replay(after, received)
    if tuple(got.shape) != tuple(local.shape):
        return None, 0, "replaying the views does not give q's shape"
    per_head = got.transpose(0, 1).reshape(h, -1)
    if not bool((per_head == per_head[:, :1]).all()):
        return None, 0, "a head of q mixes model heads"
    return tuple(int(i) for i in per_head[:, 0]), n * h, ""
