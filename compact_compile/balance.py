"""Heads ordered so that each rank of a head split gets the same attention work.

Under Ulysses each of n ranks runs the attention of H/n heads (contiguous groups in diffusers), and
with a per-head plan a head costs about its density (the fraction of blocks it computes): a rank
holding the dense heads waits for none of the others, and the step waits for it. Permuting the heads
(the q, k, v projections' output columns, the output projection's input columns and the plan's rows,
all by the same permutation; the model computes the same function) moves work between ranks. This
module only computes the permutation; nothing here changes a model.
"""
from __future__ import annotations

from collections.abc import Sequence


def balanced_heads(cost: Sequence[float], ranks: int) -> list[int]:
    """A head permutation `perm` for `ranks` ranks taking contiguous groups of len(cost) / ranks heads:
    rank r gets the heads perm[r·h : (r+1)·h] (h = len(cost) / ranks). Greedy longest processing time
    with equal head counts: the costliest head first, each to the least loaded rank that has room."""
    heads = len(cost)
    if ranks < 1 or heads % ranks:
        raise ValueError(f"{heads} heads do not split evenly over {ranks} ranks")
    room = heads // ranks
    groups: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0.0] * ranks
    for head in sorted(range(heads), key=lambda i: -cost[i]):
        rank = min((r for r in range(ranks) if len(groups[r]) < room), key=lambda r: loads[r])
        groups[rank].append(head)
        loads[rank] += cost[head]
    return [head for group in groups for head in sorted(group)]


def rank_loads(cost: Sequence[float], perm: Sequence[int], ranks: int) -> list[float]:
    """The summed cost of each rank's heads under `perm` (the identity: diffusers' contiguous split)."""
    room = len(perm) // ranks
    return [sum(cost[head] for head in perm[r * room:(r + 1) * room]) for r in range(ranks)]
