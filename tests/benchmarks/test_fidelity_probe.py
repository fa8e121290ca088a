"""benchmarks/fidelity.py counts sparsity honestly: dense warm-up steps count as dense, and the
sparse-step figure leaves them out."""
import pytest
import torch
from support import WAN_GRID, tiny_wan

from benchmarks.fidelity_probe import Probe
from compact_compile.layout import TokenLayout, auto_tile
from compact_compile.masks import window_blocks


def test_probe_counts_dense_steps_as_dense_and_errors_only_sparse_steps():
    model, inputs = tiny_wan()
    probe = Probe()
    fast = torch.compile(model, backend="compact", options={"plan": "window", "window": (1, 3, 3), "block_size": 64,
                                                             "dense_steps": 1, "observer": probe, "inner": "aot_eager"})
    with torch.no_grad():
        for t in (900, 800, 700):       # step 0 dense, steps 1 and 2 sparse
            fast(**dict(inputs, timestep=torch.tensor([t])))
    d = window_blocks(TokenLayout(WAN_GRID, auto_tile(WAN_GRID, 64), 64), (1, 3, 3)).float().mean().item()
    assert 0 < d < 1
    assert [c["density"] for c in probe.calls] == pytest.approx([1, 1, d, d, d, d])   # 2 sites × 3 steps
    summary = probe.summary(dense_steps=1)
    assert summary["density"] == pytest.approx((1 + 2 * d) / 3)
    assert summary["density_sparse_steps"] == pytest.approx(d)
    assert list(summary["layer_error"]) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert all(e > 1e-3 for e in summary["layer_error"].values())                   # sparse steps only
    assert all(c["error"] < 1e-5 for c in probe.calls if c["step"] == 0)             # dense: exact
