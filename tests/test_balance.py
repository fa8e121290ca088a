"""Head balancing for a head split: a permutation of the heads that evens out the plan's work over the
ranks (greedy longest processing time with equal head counts), within 4/3 of the best split."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_compile.balance import balanced_heads, rank_loads


def test_a_plan_with_its_dense_heads_first_is_evened_out_over_two_ranks():
    blocks = torch.zeros(8, 10, 10, dtype=torch.bool)
    for head, rows in enumerate([10, 9, 8, 7, 1, 1, 1, 1]):   # the first four heads nearly dense
        blocks[head, :rows] = True
    density = blocks.float().mean((1, 2)).tolist()
    perm = balanced_heads(density, 2)
    assert rank_loads(density, list(range(8)), 2) == pytest.approx([3.4, 0.4])    # diffusers' contiguous split
    assert rank_loads(density, perm, 2) == pytest.approx([1.9, 1.9])
    assert len({0, 1, 2, 3} & set(perm[:4])) == 2                                  # two dense heads each


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([(2, 1), (2, 2), (2, 3), (3, 1), (3, 2)]).flatmap(
    lambda rh: st.tuples(st.just(rh[0]), st.lists(st.floats(0.01, 1.0), min_size=rh[0] * rh[1],
                                                   max_size=rh[0] * rh[1]))))
def test_each_rank_gets_as_many_heads_and_the_slowest_rank_is_within_four_thirds_of_the_best(case):
    ranks, cost = case
    perm = balanced_heads(cost, ranks)
    assert sorted(perm) == list(range(len(cost)))
    best = min(max(rank_loads(cost, p, ranks)) for p in itertools.permutations(range(len(cost))))
    assert max(rank_loads(cost, perm, ranks)) <= 4 / 3 * best + 1e-9


def test_heads_that_do_not_split_evenly_are_an_error():
    with pytest.raises(ValueError, match="5 heads do not split evenly over 2 ranks"):
        balanced_heads([1.0] * 5, 2)
