"""Tensor parallelism: the projections' weights sharded as DTensors (torch's ColwiseParallel /
RowwiseParallel, what diffusers' TensorParallelConfig applies from a model's `_tp_plan`), each rank's
attention running over its H/n heads with no collective inside it. A head-agnostic plan runs there
as on one GPU; a per-head plan is one PlanError saying why the rank's heads are not proven (they
reach attention through a per-head RMSNorm, not through views alone). diffusers 0.42.1 has a
`_tp_plan` for image models only (Flux, Flux2, QwenImage); its Wan refuses tensor parallelism, as the
last test shows. Rank 0 of 2, traced in this process on a fake process group."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from support import AS_PLANNED, fake_group, masked_sdpa, model_order_mask, raises_from_backend

import compact_compile
from compact_compile.layout import TokenLayout
from compact_compile.masks import window_blocks
from compact_compile.plan import Plan, PlanError, SitePlan

GRID, TILE, BLOCK, HEADS, HEAD_DIM, RANKS = (2, 8, 8), (1, 8, 8), 64, 4, 8, 2
DIM, S = HEADS * HEAD_DIM, 128


class Attention(nn.Module):
    """Flux's processor, reduced: q, k, v split into heads of HEAD_DIM whatever the local width (so the
    code is unaware of tensor parallelism), a per-head RMSNorm on q and k."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(HEAD_DIM), nn.RMSNorm(HEAD_DIM)

    def forward(self, x):
        q, k, v = (proj(x).unflatten(-1, (-1, HEAD_DIM)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return self.to_out(o.transpose(1, 2).flatten(2))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return self.attn(x)


def tensor_parallel(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = dict(to_q=ColwiseParallel(), to_k=ColwiseParallel(), to_v=ColwiseParallel(), to_out=RowwiseParallel())
    parallelize_module(model.attn, init_device_mesh("cpu", (RANKS,), mesh_dim_names=("tp",)), styles)
    return model


def per_head_plan() -> Plan:
    n = TokenLayout(GRID, TILE, BLOCK).n_blocks
    blocks = torch.ones(HEADS, n, n, dtype=torch.bool)
    return Plan(GRID, TILE, BLOCK, {"attn": SitePlan(HEADS, HEAD_DIM, S, 0, 0, blocks)})


def call(plan, model=None, x=None):
    model = model or tensor_parallel(Model().eval())
    fast = torch.compile(model, backend="compact",
                         options=dict(AS_PLANNED, plan=plan, window=(1, 1, 1), tile=TILE, grid=GRID, inner="eager"))
    with torch.no_grad():
        return fast(torch.randn(1, S, DIM) if x is None else x)


def test_a_head_agnostic_plan_runs_on_each_ranks_heads():
    """The rank's output equals the same sharded model with its SDPA masked by the window (one tile of
    two in time: half the blocks), and differs from it unmasked."""
    torch.manual_seed(0)
    x = torch.randn(1, S, DIM)
    with fake_group(0):
        model = tensor_parallel(Model().eval())
        out = call("window", model, x)
        layout = TokenLayout(GRID, TILE, BLOCK)
        with torch.no_grad():
            with masked_sdpa({S: [model_order_mask(layout, window_blocks(layout, (1, 1, 1))[None])]}):
                ref = model(x)
            dense = model(x)
    [site] = compact_compile.report().sites
    assert site["rewritten"] and site["q"] == [1, HEADS // RANKS, S, HEAD_DIM] and site["density"] == 0.5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - dense).abs().max() > 1e-3


def test_a_per_head_plan_is_one_error_saying_why_the_ranks_heads_are_unproven():
    with fake_group(0), raises_from_backend(PlanError) as info:
        call(per_head_plan())
    message = str(info.root)
    assert f"heads {HEADS} in the plan, {HEADS // RANKS} in the model" in message
    assert "tensor parallelism: which model heads this rank holds is not proven" in message
    assert "Shard" in message and "head-agnostic plan" in message


def test_diffusers_wan_has_no_tensor_parallel_plan():
    from diffusers import TensorParallelConfig, WanTransformer3DModel

    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1)
    with pytest.raises(ValueError, match="`_tp_plan` must be set"):
        wan.enable_parallelism(config=TensorParallelConfig(tp_degree=RANKS))


def test_a_head_agnostic_plan_file_runs_on_each_ranks_heads():
    """A plan file whose site has one row (made for all HEADS heads) fits the rank's HEADS / RANKS:
    one row serves any heads, so which ones the rank holds need not be proven."""
    layout = TokenLayout(GRID, TILE, BLOCK)
    one_row = Plan(GRID, TILE, BLOCK, {"attn": SitePlan(HEADS, HEAD_DIM, S, 0, 0,
                                                        window_blocks(layout, (1, 1, 1))[None])})
    torch.manual_seed(0)
    x = torch.randn(1, S, DIM)
    with fake_group(0):
        model = tensor_parallel(Model().eval())
        out = call(one_row, model, x)
        [site] = compact_compile.report(clear=True).sites
        torch._dynamo.reset()
        window = call("window", model, x)
    assert site["rewritten"] and site["q"] == [1, HEADS // RANKS, S, HEAD_DIM] and site["density"] == 0.5
    torch.testing.assert_close(out, window, rtol=0, atol=0)
