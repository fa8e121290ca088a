"""The pooling kernels of kernels/pool_triton.py against rectified.block_pool (float64 math spelled
out in torch), on the GPU when there is one, else in Triton's interpreter."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_compile.kernels.pool_triton import block_pool_qkv_triton, tile_pool_qkv_triton
from compact_compile.kernels.rectified import block_pool
from compact_compile.layout import TokenLayout, auto_tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def model_layout(g, B, H, S, D, dtype):
    """[B, H, S, D] views of [B, S, H, D] tensors, as attention receives them from diffusers."""
    return [torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("n_kv, cols", [(100, 64), (70, 16), (0, 32)])
def test_block_pool_equals_reference(n_kv, cols):
    """q over every token, k and v over the first n_kv (video) tokens, strided heads, partial last
    block; each block whole or split into column slices."""
    q, k, v = model_layout(torch.Generator().manual_seed(2), 2, 3, 100, 64, torch.float32)
    got = [t.cpu().double() for t in block_pool_qkv_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), n_kv, 32,
                                                           config=dict(COLS=cols))]
    (qm, qd), (km, kd), (vm, _) = (block_pool(x.double(), n, 32) for x, n in ((q, 100), (k, n_kv), (v, n_kv)))
    for a, b in zip(got, (qm, qd, km, kd, vm)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(grid=st.tuples(st.integers(1, 3), st.integers(2, 9), st.integers(2, 9)), n_text=st.sampled_from([0, 7]),
       before=st.sampled_from([0.0, 0.5, 1.0]), block_size=st.sampled_from([16, 32]), D=st.sampled_from([16, 32, 64]),
       cols=st.sampled_from([16, 64]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       B=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_tile_pool_equals_gather_then_pool(grid, n_text, before, block_size, D, cols, dtype, B, seed):
    """One pass: q, k, v gathered into tile order bit for bit, and the statistics of the tiled tensors
    (keys and values over video tokens only; text, wherever the model puts it, goes last)."""
    layout = TokenLayout(grid, auto_tile(grid, block_size), block_size, n_text, round(before * n_text))
    S = layout.seq_len
    q, k, v = model_layout(torch.Generator().manual_seed(seed), B, 2, S, D, dtype)
    src = layout.source_index()
    tiled, pools = tile_pool_qkv_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), src.to(DEVICE), layout.n_video,
                                        block_size, config=dict(COLS=cols))
    want = [x.index_select(-2, src) for x in (q, k, v)]
    for got, w in zip(tiled, want):
        assert got.is_contiguous() and got.dtype == dtype and torch.equal(got.cpu(), w)
    (qm, qd), (km, kd), (vm, _) = (block_pool(x.double(), n, block_size) for x, n in
                                   zip(want, (S, layout.n_video, layout.n_video)))
    for got, w in zip(pools, (qm, qd, km, kd, vm)):
        torch.testing.assert_close(got.cpu().double(), w, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_one_clear_error():
    q = torch.randn(1, 1, 40, 16)
    with pytest.raises(ValueError, match="src must be an int32/int64"):
        tile_pool_qkv_triton(q, q, q, torch.arange(39), 40, 16)
    for other in (torch.randn(1, 1, 40, 24), torch.randn(1, 1, 40, 32)):   # head dim not a power of two; v ≠ q
        with pytest.raises(ValueError, match="one shape with a power-of-two head dim"):
            block_pool_qkv_triton(other, other, other if other.shape[-1] == 24 else q, 40, 16)
