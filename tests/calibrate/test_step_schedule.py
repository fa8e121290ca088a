"""The step clock (schedule.py) and how a site follows a plan's step schedule (spec.py, planner.py,
kernels/site.py)."""
import warnings

import pytest
import torch
from support import kernel_attend

from compact_compile.kernels.registry import sdpa_dense
from compact_compile.kernels.site import make_site
from compact_compile.layout import TokenLayout
from compact_compile.options import CompactOptions
from compact_compile.passes.sites import VIDEO, Site
from compact_compile.plan import Plan, SitePlan
from compact_compile.planner import site_spec
from compact_compile.schedule import CLOCK, at_step, make_schedule, site_schedule, timestep_input, with_step_clock
from compact_compile.spec import SiteSpec, StepRange


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


def test_range_index_dense_then_ranges():
    b = torch.eye(4, dtype=torch.bool)[None]
    spec = SiteSpec("s", TokenLayout((1, 4, 4), (1, 2, 2), 4), (StepRange(2, 5, b), StepRange(5, None, b)))
    assert [spec.range_index(s) for s in (0, 1, 2, 4, 5, 40)] == [None, None, 0, 0, 1, 1]
    assert spec.range_index(None) == 0                  # step unknown: the first range
    dense_late = SiteSpec("s", spec.layout, (StepRange(2, 5, b), StepRange(5, None, None)))
    assert dense_late.range_index(7) is None             # a range without blocks is dense


def _site(name, plan):
    layout = TokenLayout(plan.grid, plan.tile, plan.block_size)
    return Site(node=None, name=name, kind=VIDEO, q_shape=(1, 1, layout.seq_len, 8), k_shape=(1, 1, layout.seq_len, 8),
                dtype="float32", device="cpu", grid=plan.grid)


def test_site_follows_a_plans_schedule():
    plan = Plan((2, 4, 4), (1, 2, 2), 4)
    early, late = torch.eye(8, dtype=torch.bool)[None], torch.eye(8, dtype=torch.bool).roll(1, -1)[None] | torch.eye(8, dtype=torch.bool)
    for name, blocks in (("a", early), ("a@6", late), ("b", torch.ones_like(early)), ("b@6", torch.ones_like(early))):
        plan.sites[name] = SitePlan(1, 8, 32, 0, 0, blocks)
    opts = CompactOptions(plan=plan, kernel="flex", rectify=False)
    unscheduled = site_spec(opts, plan, site_schedule(plan, 0), _site("a", plan))
    assert [(r.start, r.end) for r in unscheduled.ranges] == [(0, None)] and not unscheduled.scheduled
    plan.info["schedule"] = make_schedule(3, [(3, 6), (6, None)])
    spec = site_spec(opts, plan, site_schedule(plan, 0), _site("a", plan))
    assert [(r.start, r.end) for r in spec.ranges] == [(3, 6), (6, None)]
    assert torch.equal(spec.ranges[0].blocks, early) and torch.equal(spec.ranges[1].blocks, late)
    site = make_site(spec)
    q, k, v = (torch.randn(1, 1, 32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with at_step(1):
        torch.testing.assert_close(site(q, k, v), sdpa_dense(q, k, v, None))
    with at_step(4):
        torch.testing.assert_close(site(q, k, v), kernel_attend("flex", early, q, k, v, block_size=4))
    with at_step(9):
        torch.testing.assert_close(site(q, k, v), kernel_attend("flex", late, q, k, v, block_size=4))
    with pytest.warns(UserWarning, match="no timestep was seen"):     # unknown step: the first range
        torch.testing.assert_close(site(q, k, v), kernel_attend("flex", early, q, k, v, block_size=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # warned once only
        site(q, k, v)
    dense_site = site_spec(opts, plan, site_schedule(plan, 0), _site("b", plan))
    assert [r.blocks for r in dense_site.ranges] == [None, None]     # all-ones maps run the dense path


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


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("timestep", torch.ones(1))       # a buffer of that name is not the input

    def forward(self, x, timestep, prev_timestep):
        # read in this order, so their placeholders come first: the buffer, then prev_timestep
        return self.timestep * prev_timestep * self.proj(x) * timestep


class _KeywordWrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Inner()

    def forward(self, **kw):
        return self.model(**kw)


class _NamedKeywordWrapper(_KeywordWrapper):
    def forward(self, x, **model_kwargs):
        return self.model(x, **model_kwargs)


@pytest.mark.parametrize("wrapper", [_KeywordWrapper, _NamedKeywordWrapper])
def test_a_wrapper_passing_keywords_on_still_shows_its_timestep(wrapper):
    """A model wrapped in a forward(**kw) (or forward(x, **model_kwargs)) hands Dynamo its timestep as
    `l_kw_timestep_` (`l_model_kwargs_timestep_`): still the timestep input, unlike the module's
    own buffer named timestep (whose placeholder comes first) and another argument passed on
    (`l_kw_prev_timestep_`, also ending in _timestep_, placed first here)."""
    found = []

    def capture(gm, example_inputs):
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        found.append((names, timestep_input(gm)))
        return gm.forward

    x, t, prev = torch.ones(2, 4), torch.tensor([3.0]), torch.tensor([4.0])
    model = torch.compile(wrapper(), backend=capture)
    if wrapper is _KeywordWrapper:
        model(prev_timestep=prev, x=x, timestep=t)
    else:
        model(x, prev_timestep=prev, timestep=t)
    [(names, index)] = found
    prefix = "l_kw_" if wrapper is _KeywordWrapper else "l_model_kwargs_"
    assert index is not None and names[index] == prefix + "timestep_", names


def test_dense_steps_option_gives_plans_without_a_schedule_one():
    assert site_schedule(None, 0) is None
    assert site_schedule(None, 4) == make_schedule(4)
    plan = Plan((1, 1, 1), (1, 1, 1), 1)
    assert site_schedule(plan, 2) == make_schedule(2)
    plan.info["schedule"] = make_schedule(3, [(3, 6), (6, None)])
    assert site_schedule(plan, 0) == site_schedule(plan, 3) == plan.info["schedule"]
