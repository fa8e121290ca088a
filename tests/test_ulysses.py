"""Sequence parallelism (Ulysses) on two gloo processes, CPU: each rank's attention site holds H/n
heads of the whole sequence after an all-to-all, and a per-head plan is sliced to the model heads
the graph proves that rank holds (passes/heads.py). The ranks' outputs together equal the one-process
compact run with the same plan; a plan whose heads do not fit is one clear error."""
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import compact_compile
from compact_compile.errors import PlanError
from compact_compile.layout import TokenLayout
from compact_compile.plan import Plan, SitePlan

GRID, TILE, BLOCK = (2, 8, 8), (1, 8, 8), 64
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


def compact(model, plan):
    return torch.compile(model, backend="compact", options=dict(plan=plan, grid=GRID, inner="eager"))


def inputs():
    torch.manual_seed(0)
    return Model().eval().state_dict(), torch.randn(1, S, DIM)


def rank_run(rank: int, port: int, plan_heads: int, interleaved: bool, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        weights, x = inputs()
        model = Model(dist.group.WORLD, interleaved).eval()
        model.load_state_dict(weights)
        compact_compile.report(clear=True)
        try:
            with torch.no_grad():
                out = compact(model, per_head_plan(plan_heads))(x.chunk(RANKS, dim=1)[rank])
        except PlanError as e:
            results[rank] = ("error", str(e))
            return
        [site] = [s for s in compact_compile.report().sites if s["rewritten"]]
        results[rank] = ("out", out, site["model_heads"])
    finally:
        dist.destroy_process_group()


def run_ranks(plan_heads: int = HEADS, interleaved: bool = False):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_run, args=(port, plan_heads, interleaved, results), nprocs=RANKS)
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


@pytest.mark.parametrize("plan_heads", [3, 8])
def test_a_plan_with_other_heads_is_one_clear_error(plan_heads):
    results = run_ranks(plan_heads)
    assert all(kind == "error" and f"heads {plan_heads} in the plan, 4 in the model" in msg for kind, msg in results)
