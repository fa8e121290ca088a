"""Block attention mass (stats.py, triton_mass.py) against the float64 definition from the full softmax."""
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_compile.calibrate import triton_mass
from compact_compile.calibrate.stats import (CalibrationStats, SiteStats, block_mass, block_mass_reference,
                                             dense_attention_with_mass, load_stats, save_stats)
from compact_compile.layout import TokenLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def qk_problems(draw, head_dims=st.integers(1, 24), block_sizes=st.sampled_from([4, 8, 16])):
    """q, k over a layout's tiled sequence: partial tiles, an optional text prefix/suffix, and a
    last block that is usually partial."""
    grid = draw(st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)))
    bs = draw(block_sizes)
    tile = draw(st.sampled_from([t for t in [(1, 2, 2), (1, 1, 4), (2, 2, 2), (1, 4, 4), (1, 2, 8)]
                                 if math.prod(t) == bs] or [(1, 1, bs)]))
    n_text = draw(st.integers(0, 9))
    layout = TokenLayout(grid, tile, bs, n_text, draw(st.integers(0, n_text)))
    B, H, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(head_dims)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    spread = draw(st.sampled_from([0.5, 2.0, 6.0]))   # from near-uniform to sharply peaked attention
    q = torch.randn(B, H, layout.seq_len, D, generator=gen) * spread
    k = torch.randn(B, H, layout.seq_len, D, generator=gen)
    scale = draw(st.sampled_from([None, 0.1, 1.0]))
    return layout, q, k, scale


@settings(max_examples=60, deadline=None)
@given(qk_problems(), st.integers(1, 4))
def test_chunked_float64_equals_full_softmax_reference(problem, chunk_blocks):
    layout, q, k, scale = problem
    bs = layout.block_size
    got = block_mass(q, k, bs, scale, chunk_rows=chunk_blocks * bs)
    ref = block_mass_reference(q, k, bs, scale)
    assert got.dtype == torch.float64 and got.shape == (*q.shape[:2], layout.n_blocks, layout.n_blocks)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # every query block's row is a mean of probability rows: it sums to one
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), rtol=0, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(qk_problems())
def test_float32_path_is_close(problem):
    layout, q, k, scale = problem
    got = block_mass(q, k, layout.block_size, scale, dtype=torch.float32)
    torch.testing.assert_close(got.double(), block_mass_reference(q, k, layout.block_size, scale), rtol=0, atol=2e-5)


def test_dense_attention_with_mass_returns_exact_dense_output():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 70, 16, generator=gen) for _ in range(3))
    out, mass = dense_attention_with_mass(q, k, v, 0.3, 16)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))
    torch.testing.assert_close(mass.double(), block_mass_reference(q, k, 16, 0.3), rtol=0, atol=2e-5)


def test_site_stats_accumulate_a_mean_over_calls_and_batch_items():
    gen = torch.Generator().manual_seed(0)
    layout = TokenLayout((2, 4, 6), (1, 2, 4), 8)
    stats = SiteStats.empty(layout, heads=2, head_dim=8)
    refs = []
    for batch in (1, 3):
        q, k = (torch.randn(batch, 2, layout.seq_len, 8, generator=gen) for _ in range(2))
        stats.add(block_mass(q, k, 8))
        refs.append(block_mass_reference(q, k, 8))
    assert stats.samples == 4
    torch.testing.assert_close(stats.mass, torch.cat(refs).mean(0), rtol=0, atol=1e-12)


def test_stats_file_round_trip_and_corruption():
    gen = torch.Generator().manual_seed(1)
    layouts = [TokenLayout((2, 4, 6), (1, 2, 4), 8), TokenLayout((2, 4, 6), (1, 2, 4), 8, n_text=5, n_before=5)]
    ranges = []
    for steps in [(2, 5), (5, None)]:
        st_ = CalibrationStats(steps, calls=7, generations=2)
        for i, layout in enumerate(layouts):
            q, k = (torch.randn(1, 3, layout.seq_len, 8, generator=gen) for _ in range(2))
            st_.site(f"blocks.{i}.attn1", layout, 3, 8).add(block_mass(q, k, 8))
        ranges.append(st_)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.safetensors"
        save_stats(ranges, path)
        back = load_stats(path)
        assert [(r.steps, r.calls, r.generations) for r in back] == [((2, 5), 7, 2), ((5, None), 7, 2)]
        for a, b in zip(ranges, back):
            assert list(a.sites) == list(b.sites)
            for name in a.sites:
                sa, sb = a.sites[name], b.sites[name]
                assert (sa.layout, sa.heads, sa.head_dim, sa.samples) == (sb.layout, sb.heads, sb.head_dim, sb.samples)
                assert torch.equal(sa.mass_sum, sb.mass_sum)
        data = path.read_bytes()
        for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"\x00" * 64)):
            bad = Path(d) / name
            bad.write_bytes(content)
            with pytest.raises(ValueError, match="not a readable compact_compile statistics file"):
                load_stats(bad)


# ---- Triton kernels (the interpreter on CPU: TRITON_INTERPRET=1 from tests/conftest.py) --------

@settings(max_examples=8, deadline=None)
@given(st.integers(1, 80), st.sampled_from([16, 32]), st.sampled_from([16, 32]), st.integers(1, 2),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**31))
def test_triton_block_mass_and_lse_equal_the_reference(S, D, bs, H, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, H, S, D, generator=gen) * 1.5).to(dtype)
    k = torch.randn(1, H, S, D, generator=gen).to(dtype)
    assert triton_mass.supported(q.to(DEVICE))
    scale = 0.2
    lse = triton_mass.row_lse(q.to(DEVICE), k.to(DEVICE), scale)
    ref_lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * scale, -1)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=0, atol=1e-5)
    got = triton_mass.block_mass(q.to(DEVICE), k.to(DEVICE), lse, bs, scale)
    ref = block_mass_reference(q, k, bs, scale)     # of the same (bf16-rounded) values, in float64
    assert got.shape == ref.shape
    torch.testing.assert_close(got.cpu().double(), ref, rtol=0, atol=2e-5)


def test_triton_block_mass_with_reference_lse_and_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(1, 37, 3, 2, 16, generator=gen)               # [B, S, 3, H, D], as a qkv projection
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.25, -1).float()
    got = triton_mass.block_mass(q.to(DEVICE), k.to(DEVICE), lse.to(DEVICE), 16, 0.25)
    torch.testing.assert_close(got.cpu().double(), block_mass_reference(q, k, 16, 0.25), rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="block size"):
        triton_mass.block_mass(q.to(DEVICE), k.to(DEVICE), lse.to(DEVICE), 24, 0.25)


def test_an_explicit_launch_config_wins_over_the_fp32_tiles(monkeypatch):
    """On the GPU fp32 inputs take 64×64 tiles unless a config says otherwise (it raised a TypeError)."""
    monkeypatch.setattr(triton_mass, "INTERPRET", False)
    assert triton_mass._launch_config(None, torch.float32, 128)["BLOCK_M"] == 64
    c = triton_mass._launch_config(dict(BLOCK_M=32, BLOCK_N=16), torch.float32, 128)
    assert (c["BLOCK_M"], c["BLOCK_N"]) == (32, 16)
