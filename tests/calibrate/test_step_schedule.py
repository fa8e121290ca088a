"""The step clock and scheduled kernels (schedule.py)."""
import warnings

import pytest
import torch

from compact_compile.plan import Plan, SitePlan
from compact_compile.schedule import (CLOCK, ScheduledKernel, at_step, dense_attention, make_schedule,
                                      scheduled_kernel, site_schedule, timestep_input,
                                      with_step_clock)


def feed(values):
    return [CLOCK.observe(torch.tensor(v)) for v in values]


def test_step_advances_on_each_new_lower_timestep_and_resets_on_a_higher_one():
    # CFG as two calls per step (equal timesteps) counts one step per pair
    assert feed([999, 999, 800, 800, 600, 600]) == [0, 0, 1, 1, 2, 2]
    assert CLOCK.generation == 1
    # the next generation starts high again: step 0, and counting restarts
    assert feed([999, 999, 850]) == [0, 0, 1]
    assert CLOCK.generation == 2
    # CFG as a batch of two (equal values) and per-token timesteps [B, S] use the maximum
    assert CLOCK.observe(torch.tensor([700, 700])) == 2
    assert CLOCK.observe(torch.tensor([[0, 500, 500]])) == 3


def test_pinned_step_wins_and_nests():
    feed([999])
    with at_step(20):
        assert CLOCK.current == 20
        with at_step(3):
            assert CLOCK.current == 3
        assert CLOCK.current == 20
    assert CLOCK.current == 0


def _kernel(tag):
    def k(q, kk, v, scale=None):
        return torch.full_like(q, float(tag))
    return k


def test_scheduled_kernel_selects_dense_then_ranges():
    sk = ScheduledKernel("s", 2, [(2, 5), (5, None)], [_kernel(1), _kernel(2)])
    assert [sk.select(s) for s in (0, 1)] == [dense_attention, dense_attention]
    assert [sk.select(s)(torch.zeros(1), None, None)[0].item() for s in (2, 4, 5, 40)] == [1, 1, 2, 2]
    with pytest.warns(UserWarning, match="no timestep was seen"):
        assert sk.select(None)(torch.zeros(1), None, None)[0].item() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # warned once only
        sk.select(None)


def test_scheduled_kernel_from_a_plan():
    plan = Plan((2, 4, 4), (1, 2, 2), 4)
    blocks = torch.eye(8, dtype=torch.bool)[None]
    for name in ("a", "a@6", "b", "b@6"):
        full = name.startswith("b")
        plan.sites[name] = SitePlan(1, 8, 32, 0, False, torch.ones_like(blocks) if full else blocks)
    k0 = _kernel(7)
    built = []
    range_blocks = lambda entry: plan.sites[entry].blocks  # noqa: E731
    assert scheduled_kernel(site_schedule(plan, 0), "a", k0, range_blocks, built.append) is k0  # no schedule
    plan.info["schedule"] = make_schedule(3, [(3, 6), (6, None)])
    sk = scheduled_kernel(site_schedule(plan, 0), "a", k0, range_blocks,
                          lambda b: (built.append(b), _kernel(8))[1])
    assert sk.kernels[0] is k0 and torch.equal(built[0], blocks)
    q = torch.randn(1, 1, 32, 8)
    with at_step(1):
        torch.testing.assert_close(sk(q, q, q), dense_attention(q, q, q))
    with at_step(4):
        assert sk(q, q, q).flatten()[0].item() == 7
    with at_step(9):
        assert sk(q, q, q).flatten()[0].item() == 8
    dense_site = scheduled_kernel(site_schedule(plan, 0), "b", k0, range_blocks, lambda b: _kernel(8))
    assert dense_site.kernels == [dense_attention, dense_attention]     # all-ones maps run plain SDPA


def test_schedule_validation():
    assert make_schedule(15) == dict(dense_steps=15, ranges=[[15, None]], step_source="timestep")
    for bad in ([(14, None)], [(15, 20), (21, None)], [(15, None), (20, None)], [(15, 15)]):
        with pytest.raises(ValueError, match="must follow each other"):
            make_schedule(15, bad)


def test_timestep_placeholder_by_name_feeds_the_clock():
    class M(torch.nn.Module):
        def forward(self, x, timestep):
            return x * timestep

    gm = torch.fx.symbolic_trace(M())
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], ["l_x_", "l_kwargs_timestep_"]):
        node.name = name
    assert timestep_input(gm) == 1
    run = with_step_clock(gm, gm.forward, make_schedule(1))
    run(torch.ones(2), torch.tensor(900.0))
    run(torch.ones(2), torch.tensor(800.0))
    assert CLOCK.step == 1
    assert with_step_clock(gm, gm.forward, None) == gm.forward   # no schedule: as is


def test_dense_steps_option_gives_plans_without_a_schedule_one():
    assert site_schedule(None, 0) is None
    assert site_schedule(None, 4) == make_schedule(4)
    plan = Plan((1, 1, 1), (1, 1, 1), 1)
    assert site_schedule(plan, 2) == make_schedule(2)
    plan.info["schedule"] = make_schedule(3, [(3, 6), (6, None)])
    assert site_schedule(plan, 0) == site_schedule(plan, 3) == plan.info["schedule"]
