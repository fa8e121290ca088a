"""Attention kernels called directly stay dense and are reported: diffusers' ring attention (its
templated ring path calls aten's cuDNN or flash attention op per key chunk, with the log-sum-exp, and
merges the chunks) and its Ulysses path on those backends. Each rank is traced in this process on a
fake process group. The CPU has no kernel for aten's cuDNN and flash ops, so those graphs are
compiled (the backend runs at the first call) and the call then fails in the op; aten's CPU flash
op stands in where the ring must run."""
import pytest
import torch
import torch.nn as nn
from diffusers.models import attention_dispatch
from support import diffusers_parallel_config, fake_group, raises_from_backend

import compact_compile
from compact_compile.passes.direct_attention import RING, RING_REASON
from compact_compile.plan import Plan, PlanError, SitePlan

RANKS = 2


def cpu_flash_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' forward op for its ring and Ulysses templates, on aten's CPU flash attention."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *(t.transpose(1, 2) for t in (query, key, value)), dropout_p, is_causal, scale=scale)[:2]
    out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    return (out, lse) if return_lse else out


FORWARD_OPS = {   # name: (a forward op of diffusers' templates, the aten op it calls, whether that runs on the CPU)
    "cudnn": (attention_dispatch._cudnn_attention_forward_op, "aten._scaled_dot_product_cudnn_attention", False),
    "flash": (attention_dispatch._native_flash_attention_forward_op, "aten._scaled_dot_product_flash_attention",
              False),
    "cpu": (cpu_flash_forward_op, "aten._scaled_dot_product_flash_attention_for_cpu", True),
}


class ContextParallelAttention(nn.Module):
    """diffusers' templated context-parallel attention as a model's attention module calls it."""

    def __init__(self, config, forward_op):
        super().__init__()
        self.config, self.forward_op = config, forward_op

    def forward(self, q, k, v):
        return attention_dispatch._templated_context_parallel_attention(
            q, k, v, forward_op=self.forward_op, backward_op=None, _parallel_config=self.config)


class Model(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def compiled_report(model, runs: bool, options=None):
    """The report of one compiled call of `model` (that fails in the op where the CPU cannot run it)."""
    q, k, v = (torch.randn(1, 32, 4, 8) for _ in range(3))
    fast = torch.compile(model, backend="compact", options=dict(options or {}, inner="eager", grid=(1, 8, 8)))
    with torch.no_grad(), pytest.warns(UserWarning, match="no attention in this graph runs block-sparse"):
        if runs:   # left dense: the compiled call computes what the model does
            torch.testing.assert_close(fast(q, k, v), model(q, k, v), rtol=0, atol=0)
        else:
            with pytest.raises(NotImplementedError):
                fast(q, k, v)
    return compact_compile.report()


@pytest.mark.parametrize("rank", range(RANKS))
@pytest.mark.parametrize("forward_op", FORWARD_OPS)
def test_ring_attention_is_one_dense_site_with_its_reason(forward_op, rank):
    fn, op, runs = FORWARD_OPS[forward_op]
    with fake_group(rank):
        report = compiled_report(Model(ContextParallelAttention(diffusers_parallel_config(rank, ring=RANKS), fn)), runs)
    [site] = report.sites
    assert (site["site"], site["kind"], site["rewritten"], site["op"], site["chunks"]) == ("attn", RING, False, op, 2)
    assert site["reason"].startswith(RING_REASON) and site["q"] == [1, 4, 32, 8]
    assert RING_REASON in str(report)


@pytest.mark.parametrize("forward_op", FORWARD_OPS)
def test_an_attention_op_called_after_the_all_to_all_is_a_dense_site_with_its_reason(forward_op):
    """diffusers' Ulysses on its _native_cudnn or _native_flash backend: one direct call, no ring."""
    fn, op, runs = FORWARD_OPS[forward_op]
    with fake_group(0):
        report = compiled_report(Model(ContextParallelAttention(diffusers_parallel_config(0, ulysses=RANKS), fn)),
                                 runs)
    [site] = report.sites
    assert (site["site"], site["rewritten"], site["op"]) == ("attn", False, op)
    assert site["reason"].startswith(f"{op} called directly, not scaled_dot_product_attention")
    assert site["q"] == [1, 2, 64, 8]                  # the whole sequence, half the heads


def test_a_plan_with_a_mask_for_a_ring_site_is_an_error_naming_the_ring():
    """As for any site that cannot be rewritten: the plan's mask for it would be silently unused."""
    plan = Plan((1, 8, 8), (1, 8, 8), 64, {"attn": SitePlan(4, 8, 64, 0, 0, torch.ones(1, 1, 1, dtype=torch.bool))})
    with fake_group(0), raises_from_backend(PlanError, "the plan has a mask for site 'attn'.*ring attention"):
        model = Model(ContextParallelAttention(diffusers_parallel_config(0, ring=RANKS), cpu_flash_forward_op))
        fast = torch.compile(model, backend="compact", options=dict(plan=plan, inner="eager"))
        with torch.no_grad():
            fast(*(torch.randn(1, 32, 4, 8) for _ in range(3)))
