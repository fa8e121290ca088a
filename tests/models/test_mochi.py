"""Mochi joint attention without the `torch.nonzero` graph break (compact_compile.models.mochi)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

diffusers = pytest.importorskip("diffusers")
from diffusers import MochiTransformer3DModel  # noqa: E402
from diffusers.models.attention_processor import MochiAttention, MochiAttnProcessor2_0  # noqa: E402

from compact_compile.models import install_model_fixes, mochi  # noqa: E402

HEADS, HEAD_DIM, TEXT_DIM, LAYERS = 2, 8, 16, 2
LATENT = (4, 3, 8, 8)  # C, T, H, W -> 3 * 4 * 4 = 48 video tokens after 2x2 patches
S_VIDEO = 48
S_TEXT = 8


def diffusers_call():
    """diffusers' own `MochiAttnProcessor2_0.__call__`, whether or not the fix is installed."""
    f = MochiAttnProcessor2_0.__dict__["__call__"]
    return f.__wrapped__ if getattr(f, mochi._MARKER, False) else f


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.fixture
def installed():
    assert install_model_fixes()["mochi"] is True
    assert getattr(MochiAttnProcessor2_0.__call__, mochi._MARKER, False)


@pytest.fixture
def uninstalled(monkeypatch):
    """diffusers exactly as shipped, for the length of one test."""
    monkeypatch.setattr(MochiAttnProcessor2_0, "__call__", diffusers_call())


# ----------------------------------------------------------------------------------------------
# the function itself, against diffusers' processor


def _attention(context_pre_only: bool, gen: torch.Generator) -> MochiAttention:
    attn = MochiAttention(query_dim=HEADS * HEAD_DIM, added_kv_proj_dim=12, processor=MochiAttnProcessor2_0(),
                          heads=HEADS, dim_head=HEAD_DIM, bias=True, context_pre_only=context_pre_only)
    with torch.no_grad():
        for p in attn.parameters():  # RMSNorm weights start at 1: randomise them too
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return attn.double().eval()


masks = st.integers(1, 2).flatmap(lambda b: st.integers(1, 8).flatmap(
    lambda s: st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=b, max_size=b)))


@settings(max_examples=12, deadline=None)
@given(mask=masks, s_video=st.sampled_from([1, 5, 12]), rope=st.booleans(), long_mask=st.booleans(),
       context_pre_only=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(mask=[[True, False, True, False, False, True]], s_video=5, rope=True, long_mask=False,
         context_pre_only=False, seed=1)  # non-prefix
@example(mask=[[True] * 7], s_video=12, rope=True, long_mask=True, context_pre_only=False, seed=2)  # all valid
@example(mask=[[False] * 4], s_video=5, rope=False, long_mask=False, context_pre_only=True, seed=3)  # all masked
@example(mask=[[True, True, False, False, False], [False, True, True, True, False]], s_video=12, rope=True,
         long_mask=True, context_pre_only=False, seed=4)  # batch 2, different valid lengths
@example(mask=[[True, True, True], [False, False, False]], s_video=1, rope=True, long_mask=False,
         context_pre_only=False, seed=5)  # batch 2, one sample fully masked
def test_masked_equals_diffusers_processor(mask, s_video, rope, long_mask, context_pre_only, seed):
    gen = torch.Generator().manual_seed(seed)
    attn = _attention(context_pre_only, gen)
    B, s_text = len(mask), len(mask[0])
    x = torch.randn(B, s_video, HEADS * HEAD_DIM, generator=gen, dtype=torch.float64)
    enc = torch.randn(B, s_text, 12, generator=gen, dtype=torch.float64)
    attention_mask = torch.tensor(mask, dtype=torch.int64 if long_mask else torch.bool)
    rotary = None
    if rope:
        angles = torch.randn(s_video, HEADS, HEAD_DIM // 2, generator=gen) * 3
        rotary = (angles.cos(), angles.sin())

    with torch.no_grad():
        want = diffusers_call()(MochiAttnProcessor2_0(), attn, x, enc, attention_mask, rotary)
        got = mochi.joint_attention_masked(attn, x, enc, attention_mask, rotary)

    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) <= 1e-10


# ----------------------------------------------------------------------------------------------
# the tiny Mochi transformer under Dynamo


@pytest.fixture(scope="module")
def tiny_mochi():
    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                    num_layers=LAYERS, pooled_projection_dim=16, in_channels=LATENT[0],
                                    text_embed_dim=TEXT_DIM, time_embed_dim=4, max_sequence_length=S_TEXT)
    with torch.no_grad():  # zero frequencies make RoPE the identity: give it something to do
        model.pos_frequencies.normal_()
    model = model.double().eval()
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, *LATENT, generator=gen, dtype=torch.float64),
        encoder_hidden_states=torch.randn(2, S_TEXT, TEXT_DIM, generator=gen, dtype=torch.float64),
        timestep=torch.tensor([10, 500]),
        # sample 0: valid tokens not a prefix; sample 1: a different number of valid tokens
        encoder_attention_mask=torch.tensor([[1, 1, 0, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0]]),
        return_dict=False,
    )
    return model, inputs


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_no_graph_break_with_fix(installed, tiny_mochi):
    model, inputs = tiny_mochi
    with torch.no_grad():
        explain = torch._dynamo.explain(model)(**inputs)
    assert explain.graph_break_count == 0, [r.reason for r in explain.break_reasons]
    assert explain.graph_count == 1


def test_diffusers_breaks_on_nonzero_without_fix(uninstalled, tiny_mochi):
    # Shows the test above can fail: diffusers as shipped breaks the graph in every attention call.
    model, inputs = tiny_mochi
    with torch.no_grad():
        explain = torch._dynamo.explain(model)(**inputs)
    assert explain.graph_break_count > 0
    assert any("nonzero" in r.reason for r in explain.break_reasons)


def test_joint_sdpa_reaches_backend_with_key_padding_mask(installed, tiny_mochi):
    model, inputs = tiny_mochi
    calls, graphs = [], []

    def inspect(gm, example_inputs):
        graphs.append(gm)
        for node in gm.graph.nodes:
            assert "nonzero" not in str(node.target)
            if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                if "query" not in node.kwargs:  # diffusers' text pooler: positional, one query
                    continue
                mask = node.kwargs.get("attn_mask")
                calls.append((tuple(node.kwargs["query"].meta["example_value"].shape),
                              None if mask is None else tuple(mask.meta["example_value"].shape),
                              None if mask is None else mask.meta["example_value"].dtype))
        return gm.forward

    # Default fullgraph=False, as users run it. (With fullgraph=True, diffusers' own code compiles
    # too, but as per-sample SDPAs of unbacked length u0 + S_video: nothing a pass can plan for.)
    _run(torch.compile(model, backend=inspect), inputs)
    assert len(graphs) == 1
    S = S_VIDEO + S_TEXT
    assert calls == [((2, HEADS, S, HEAD_DIM), (2, 1, 1, S), torch.bool)] * LAYERS, calls


def test_fix_installs_when_diffusers_loads_after_the_backend_and_a_dynamo_reset():
    """The backend loaded first, then torch._dynamo.reset() (which clears compile-start callbacks),
    then diffusers: the fix installs as diffusers' processor module loads, and Mochi's joint
    attention reaches the backend."""
    code = """if True:
        import sys, torch, compact_compile, compact_compile.backend
        assert not any(m.startswith("diffusers.models") for m in sys.modules)
        torch._dynamo.reset()
        sys.path.insert(0, "tests")
        from support import tiny_mochi
        model, inputs = tiny_mochi()
        with torch.no_grad():
            torch.compile(model, backend="compact", options=dict(plan="window", block_size=64, inner="eager"))(**inputs)
        joint = [s for s in compact_compile.report().sites if s["kind"] == "joint text+video"]
        assert joint and all(s["rewritten"] and s["key_mask"] for s in joint), compact_compile.report().sites
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_compiled_equals_unpatched_eager(tiny_mochi, monkeypatch):
    model, inputs = tiny_mochi
    monkeypatch.setattr(MochiAttnProcessor2_0, "__call__", diffusers_call())
    want = _run(model, inputs)
    monkeypatch.undo()
    install_model_fixes()
    got = _run(torch.compile(model, backend="eager"), inputs)
    assert rel_err(got, want) <= 1e-10


def test_eager_after_install_runs_diffusers_code(installed, tiny_mochi, monkeypatch):
    model, inputs = tiny_mochi
    with monkeypatch.context() as m:
        m.setattr(MochiAttnProcessor2_0, "__call__", diffusers_call())
        want = _run(model, inputs)

    seen = []
    real_nonzero = torch.nonzero

    def spy(*args, **kwargs):
        seen.append(1)
        return real_nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", spy)  # only diffusers' processor calls it
    got = _run(model, inputs)
    assert len(seen) == LAYERS * inputs["hidden_states"].shape[0]
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# installation rules


def test_install_is_idempotent(installed):
    patched = MochiAttnProcessor2_0.__call__
    assert install_model_fixes() == {"mochi": True}
    assert MochiAttnProcessor2_0.__call__ is patched
    assert patched.__wrapped__ is diffusers_call()


def test_install_leaves_a_foreign_patch_alone(monkeypatch):
    def someone_elses(self, *args, **kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(MochiAttnProcessor2_0, "__call__", someone_elses)
    assert install_model_fixes() == {"mochi": False}
    assert MochiAttnProcessor2_0.__call__ is someone_elses


def test_install_does_not_import_diffusers():
    code = ("import sys; from compact_compile.models import install_model_fixes; "
            "assert install_model_fixes() == {'mochi': False}; "
            "assert not any(m == 'diffusers' or m.startswith('diffusers.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
