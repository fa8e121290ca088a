"""Sequence parallelism (Ulysses) on two gloo processes, CPU: each rank's attention site holds H/n
heads of the whole sequence after an all-to-all, and a per-head plan is sliced to the model heads
the graph proves that rank holds (passes/heads.py). The ranks' outputs together equal the one-process
compact run with the same plan; a plan whose heads do not fit is one clear error. The head replay
itself (its size, diffusers' own Ulysses template, views it refuses) runs in this process on a fake
process group: tracing needs no peer."""
import logging
import math
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ContextParallelConfig
from support import AS_PLANNED, WAN_GRID, diffusers_parallel_config, fake_group, tiny_wan

import compact_compile
from compact_compile.errors import PlanError
from compact_compile.layout import TokenLayout
from compact_compile.passes.heads import head_slice, replayed_heads
from compact_compile.passes.sites import is_sdpa, sdpa_arguments
from compact_compile.plan import Plan, SitePlan

GRID, TILE, BLOCK = (2, 8, 8), (1, 8, 8), 64
OFFSET = 3.0     # the rectified and dynamic tests' common token offset (inputs)
S, HEADS, HEAD_DIM, DIM, RANKS = math.prod(GRID), 4, 8, 32, 2


def heads_to_sequence(x, group, interleaved=False):
    """[B, S/n, H, D] → [B, H/n, S, D]: rank r gets heads r·H/n … of every rank's tokens (diffusers'
    Ulysses), or (`interleaved`) heads r, r + n, …"""
    n = dist.get_world_size(group)
    B, s, H, D = x.shape
    if interleaved:
        x = x.reshape(B, s, H // n, n, D).permute(3, 1, 0, 2, 4).contiguous()
    else:
        x = x.reshape(B, s, n, H // n, D).permute(2, 1, 0, 3, 4).contiguous()
    x = funcol.all_to_all_single(x, None, None, group)
    return x.reshape(n * s, B, H // n, D).permute(1, 2, 0, 3)


def sequence_to_heads(o, group, interleaved=False):
    """[B, H/n, S, D] → [B, S/n, H, D], the inverse."""
    n = dist.get_world_size(group)
    B, h, s, D = o.shape
    o = o.permute(2, 0, 1, 3).reshape(n, s // n, B, h, D).contiguous()
    o = funcol.all_to_all_single(o, None, None, group)          # [n (head group), S/n, B, h, D]
    o = o.permute(2, 1, 3, 0, 4) if interleaved else o.permute(2, 1, 0, 3, 4)
    return o.reshape(B, s // n, n * h, D)


class Attention(nn.Module):
    def __init__(self, group=None, interleaved=False):
        super().__init__()
        self.group, self.interleaved = group, interleaved
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, HEADS, HEAD_DIM)).unbind(2)
        if self.group is None:
            o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        else:
            o = F.scaled_dot_product_attention(*(heads_to_sequence(t, self.group, self.interleaved) for t in (q, k, v)))
            o = sequence_to_heads(o, self.group, self.interleaved)
        return self.out(o.flatten(2))


class Model(nn.Module):
    def __init__(self, group=None, interleaved=False):
        super().__init__()
        self.attn = Attention(group, interleaved)

    def forward(self, x):
        return self.attn(x)


def per_head_plan(heads: int = HEADS) -> Plan:
    layout = TokenLayout(GRID, TILE, BLOCK)
    g = torch.Generator().manual_seed(3)
    blocks = (torch.rand(heads, layout.n_blocks, layout.n_blocks, generator=g) < 0.5) | torch.eye(layout.n_blocks,
                                                                                                  dtype=torch.bool)
    blocks[0] = torch.eye(layout.n_blocks, dtype=torch.bool)      # heads differ: a wrong slice shows
    return Plan(GRID, TILE, BLOCK, {"attn": SitePlan(heads, HEAD_DIM, S, 0, 0, blocks)})


def compact(model, plan, **options):
    return torch.compile(model, backend="compact",
                         options={**AS_PLANNED, "plan": plan, "grid": GRID, "inner": "eager", **options})


def inputs(offset: float = 0.0, tokens: int = S):
    """Weights and x; `offset` adds one vector to every token, so blocks' pooled q and k dominate
    their spread (where rectification's GAPR test trusts its estimate: N(0, 1) tokens never pass it)."""
    torch.manual_seed(0)
    x = torch.randn(1, tokens, DIM)
    return Model().eval().state_dict(), x + offset * torch.randn(1, 1, DIM)


def the_plan(plan_heads: int):
    return "dynamic" if plan_heads == 0 else per_head_plan(plan_heads)


def rank_run(rank: int, port: int, plan_heads: int, interleaved: bool, options: dict, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        options = dict(options)
        weights, x = inputs(options.pop("offset", 0.0), math.prod(options.get("grid", GRID)))
        model = Model(dist.group.WORLD, interleaved).eval()
        model.load_state_dict(weights)
        compact_compile.report(clear=True)
        try:
            with torch.no_grad():
                out = compact(model, the_plan(plan_heads), **options)(x.chunk(RANKS, dim=1)[rank])
        except PlanError as e:
            results[rank] = ("error", str(e))
            return
        [site] = [s for s in compact_compile.report().sites if s["rewritten"]]
        results[rank] = ("out", out, site["model_heads"])
    finally:
        dist.destroy_process_group()


def run_ranks(plan_heads: int = HEADS, interleaved: bool = False, **options):
    """Each rank's result; plan_heads 0: the dynamic plan."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_run, args=(port, plan_heads, interleaved, options, results), nprocs=RANKS)
        return [results[r] for r in range(RANKS)]


@pytest.mark.parametrize("interleaved, heads", [(False, [[0, 1], [2, 3]]), (True, [[0, 2], [1, 3]])])
def test_each_rank_runs_its_own_heads_of_a_per_head_plan(interleaved, heads):
    """Whichever heads the all-to-all hands a rank (contiguous groups, or every n-th), the graph says
    so, and the rank runs those rows of the plan."""
    results = run_ranks(interleaved=interleaved)
    assert [r[2] for r in results] == heads
    out = torch.cat([r[1] for r in results], dim=1)
    weights, x = inputs()
    one = Model().eval()
    one.load_state_dict(weights)
    with torch.no_grad():
        ref = compact(one, per_head_plan())(x)
        dense = one(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ((ref - dense).norm() / dense.norm()) > 1e-2             # the plan drops blocks


DYNAMIC_GRID = (4, 16, 32)   # 32 blocks of 64 tokens: enough that the dynamic plan skips some


@pytest.mark.parametrize("plan_heads, options", [
    (HEADS, dict(rectify=True)), (0, dict(rectify=True, grid=DYNAMIC_GRID)), (0, dict(rectify=False, grid=DYNAMIC_GRID)),
], ids=["per-head-rectified", "dynamic-rectified", "dynamic"])
def test_rectified_and_dynamic_plans_under_ulysses_equal_one_process(plan_heads, options):
    """Rectification (R·O + Ō from each head's pooled q/k/v) and the dynamic plan (blocks chosen per
    head from pooled q/k) work per head, so each rank computes them for the heads it holds: the ranks'
    outputs together equal the one-process run with the same options, which differs from plain
    sparse attention (rectification) and from dense attention (the dynamic plan skips blocks)."""
    results = run_ranks(plan_heads, offset=OFFSET, **options)
    assert all(kind == "out" for kind, *_ in results), results
    out = torch.cat([r[1] for r in results], dim=1)
    weights, x = inputs(OFFSET, math.prod(options.get("grid", GRID)))
    one = Model().eval()
    one.load_state_dict(weights)
    with torch.no_grad():
        ref = compact(one, the_plan(plan_heads), **options)(x)
        torch._dynamo.reset()                                  # other options: compile again
        other = compact(one, the_plan(plan_heads), **dict(options, rectify=not options["rectify"]))(x)
        dense = one(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (ref - other).norm() / ref.norm() > 1e-3           # the option changes the result
    assert (ref - dense).norm() / dense.norm() > 1e-3         # blocks are skipped


@pytest.mark.parametrize("plan_heads", [3, 8])
def test_a_plan_with_other_heads_is_one_clear_error(plan_heads):
    results = run_ranks(plan_heads)
    assert all(kind == "error" and f"heads {plan_heads} in the plan, 4 in the model" in msg for kind, msg in results)


def traced_q(fn, *inputs):
    """The SDPA arguments of the one SDPA Dynamo traces in fn(*inputs)."""
    found = []

    def capture(gm, example_inputs):
        found.extend(sdpa_arguments(n) for n in gm.graph.nodes if is_sdpa(n))
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=capture, dynamic=False)(*inputs)
    [args] = found
    return args


def diffusers_ulysses(rank: int):
    """diffusers' own Ulysses attention (its templated path: flatten, all-to-all, reshape with the
    local sizes written into the graph) on the native backend, for inputs [B, S/n, H, D]."""
    from diffusers.models import attention_dispatch

    config = diffusers_parallel_config(rank, ulysses=RANKS)
    return lambda q, k, v: attention_dispatch._native_attention(q, k, v, _parallel_config=config)


@pytest.mark.parametrize("rank", [0, 1])
def test_the_head_replay_holds_head_indices_only_whatever_the_sequence_length(rank):
    """The replay tensor does not grow with the video: its tokens and head-dim lanes are 1 (a full
    replay of Wan-14B 720p on 2 GPUs was 190 MB), through diffusers' Ulysses reshapes that carry the
    local sequence length as constants."""
    sizes, h = [], HEADS // RANKS
    with fake_group(rank):
        attention = diffusers_ulysses(rank)
        for tokens in (64, 4096):
            q, k, v = (torch.randn(1, tokens // RANKS, HEADS, HEAD_DIM) for _ in range(3))
            args = traced_q(attention, q, k, v)
            sizes.append(replayed_heads(args["query"])[0].numel())
            assert head_slice(args) == (tuple(range(rank * h, rank * h + h)), HEADS, "")
    assert sizes[0] == sizes[1] <= RANKS * HEADS


def test_a_view_that_trades_tokens_for_heads_leaves_the_slice_unproven():
    """[B, h, S, D] with the heads swapped for a factor of the tokens (every other token): a site
    head is not one model head over the sequence, and the replay says so instead of guessing."""
    def attention(q, k, v):
        q, k, v = (heads_to_sequence(t, dist.group.WORLD) for t in (q, k, v))
        B, h, s, D = q.shape
        return F.scaled_dot_product_attention(
            *(t.reshape(B, h, s // 2, 2, D).transpose(1, 3).reshape(B, h, s, D) for t in (q, k, v)))

    with fake_group(0):
        args = traced_q(attention, *(torch.randn(1, S // RANKS, HEADS, HEAD_DIM) for _ in range(3)))
        heads, _, why = head_slice(args)
    assert heads is None and "a view merges tokens or head-dim lanes into the heads" in why


@pytest.mark.parametrize("compile", ["regional", "whole"])
def test_diffusers_wan_under_enable_parallelism_runs_its_ranks_rows_of_a_per_head_plan(monkeypatch, compile):
    """diffusers' own Ulysses (`enable_parallelism`) on its Wan: each block's self-attention runs the
    rows of the one model head rank 1 holds. Compiled regionally, the site is `attn1`; compiled whole,
    with a per-layer plan (a calibrated plan's form), it is `blocks.i.attn1` — blocks.0's too, which
    diffusers calls through its split hook (Dynamo names its modules through the hook's closure)."""
    # diffusers 0.42.1 logs Wan's 1-D timestep with logger.warning_once, which only transformers adds; a
    # silent one here, which Dynamo is told to skip (a Logger method in a graph breaks it: the blocks would
    # become graphs of their own, whose sites a per-layer plan cannot name)
    def warning_once(self, *args, **kwargs):
        pass

    monkeypatch.setattr(logging.Logger, "warning_once", warning_once, raising=False)
    monkeypatch.setattr(torch._dynamo.config, "ignore_logging_functions", {warning_once})
    model, inputs = tiny_wan()
    layout = TokenLayout(WAN_GRID, (1, 8, 8), 64)
    blocks = torch.eye(layout.n_blocks, dtype=torch.bool).repeat(2, 1, 1)
    blocks[0] = True                      # head 0 dense, head 1 the diagonal: the rows must not be swapped
    names = ["attn1"] if compile == "regional" else [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    plan = Plan(WAN_GRID, (1, 8, 8), 64, {n: SitePlan(2, 16, math.prod(WAN_GRID), 0, 0, blocks) for n in names})
    options = dict(AS_PLANNED, plan=plan, grid=WAN_GRID, inner="eager")
    with fake_group(1):
        with mock.patch("torch.accelerator.device_count", return_value=1):    # diffusers' device: rank % count
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=RANKS))
        if compile == "regional":
            model.compile_repeated_blocks(backend="compact", options=options)
        else:   # one call first: diffusers' split hook reads the block's signature on its first call, which
            with torch.no_grad():   # breaks a graph compiled around it (the blocks would be graphs of their own)
                model(**inputs)
            model = torch.compile(model, backend="compact", options=options)
        with torch.no_grad():
            model(**inputs)
    sites = [s for s in compact_compile.report().sites if s["rewritten"]]
    expected = ["attn1"] * 2 if compile == "regional" else names
    assert [(s["site"], s["model_heads"], s["q"][1]) for s in sites] == [(n, [1], 1) for n in expected]
    assert all(s["density"] == pytest.approx(1 / layout.n_blocks) for s in sites)      # head 1's row
