"""FlexKernel (compiled FlexAttention over whole blocks) against the float64 reference.

Compiled flex costs several seconds per new shape on a CPU, so the property tests draw few examples.
They run on the GPU where there is one (FlexAttention's Triton kernels there, its C++ on the CPU).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from support import flat_layout, kernel_attend

from compact_compile.kernels import compiled
from compact_compile.kernels.compiled import RecompileLimit
from compact_compile.kernels.flex import FlexKernel
from compact_compile.kernels.ops import register_site
from compact_compile.kernels.reference import block_sparse_attention_reference, token_mask
from compact_compile.kernels.registry import kv_block_lists

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def problems(draw):
    """A shape (B, H, S, D, block size, scale) and two random block maps of that shape (per head, or
    one broadcast over the heads), with the diagonal kept so that no query block attends to nothing.
    Each new shape or scale costs a flex compile; more maps of the same shape are nearly free."""
    block_size = draw(st.sampled_from([64, 128]))
    # not a multiple of the block size: the last block is partial
    seq_len = draw(st.integers(block_size // 2, 3 * block_size).filter(lambda s: s % block_size))
    B, H, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([16, 32, 64]))
    nb = -(-seq_len // block_size)
    maps = []
    mask_heads = draw(st.sampled_from([1, H]))              # 1: one map broadcast over the heads
    for _ in range(2):
        keep = draw(st.lists(st.booleans(), min_size=mask_heads * nb * nb, max_size=mask_heads * nb * nb))
        maps.append(torch.tensor(keep).reshape(mask_heads, nb, nb) | torch.eye(nb, dtype=torch.bool))
    scale = draw(st.sampled_from([None, 0.25]))
    return B, H, seq_len, D, block_size, maps, scale, draw(st.integers(0, 2**31))


def check(problem, dtype, rtol):
    B, H, S, D, bs, maps, scale, seed = problem
    g = torch.Generator().manual_seed(seed)
    for blocks in maps:
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3))
        out = kernel_attend("flex", blocks, *(x.to(DEVICE) for x in (q, k, v)), scale, block_size=bs).cpu()
        ref = block_sparse_attention_reference(q, k, v, blocks, bs, scale)
        assert out.shape == (B, H, S, D) and out.dtype == dtype
        err = (out.double() - ref).abs().max().item()
        assert err <= rtol * ref.abs().max().item(), f"max err {err:.3g}, max |ref| {ref.abs().max().item():.3g}"
        if not blocks.all():
            # a kernel ignoring the map would be this far off, 10× the allowed error; a map whose dropped
            # blocks barely matter (S = 129 at 128-token blocks: one key in the last block) proves nothing
            dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
            assume((dense - ref).abs().max() > 10 * rtol * ref.abs().max())


@settings(max_examples=6, deadline=None)
@given(problems())
def test_flex_matches_reference_fp32(problem):
    check(problem, torch.float32, 1e-5)


@settings(max_examples=4, deadline=None)
@given(problems())
def test_flex_matches_reference_bf16(problem):
    check(problem, torch.bfloat16, 2e-2)


def test_reference_token_mask():
    blocks = torch.tensor([[[True, False], [True, True]]])
    mask = token_mask(blocks, 5, 3)
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], want)


def test_kv_block_lists():
    blocks = torch.tensor([[True, False, True], [False, False, True], [True, True, True]])
    num, idx = kv_block_lists(blocks)
    assert num.tolist() == [2, 1, 3] and num.dtype == idx.dtype == torch.int32
    assert [idx[i, : num[i]].tolist() for i in range(3)] == [[0, 2], [2], [0, 1, 2]]


def test_block_mask_is_built_once_per_prepared_map():
    blocks = torch.eye(3, dtype=torch.bool)[None]
    kernel = FlexKernel(flat_layout(192, 64))
    prepared = kernel.prepare(kv_block_lists(blocks))
    bm = kernel.block_mask(prepared, 1)
    assert kernel.block_mask(prepared, 1) is bm
    assert bm.BLOCK_SIZE == (64, 64) and bm.seq_lengths == (192, 192)
    assert torch.equal(bm.to_dense().bool()[0, 0], blocks[0])


def test_cpu_partial_tail_is_padded_and_masked():
    blocks = torch.eye(3, dtype=torch.bool)[None]
    kernel = FlexKernel(flat_layout(150, 64))
    bm = kernel.block_mask(kernel.prepare(kv_block_lists(blocks)), 1)
    assert bm.seq_lengths == (192, 192)          # CPU: padded to whole blocks, the padding masked
    assert torch.equal(bm.to_dense().bool()[0, 0], blocks[0])


def test_recompile_limit_raises_instead_of_falling_back_to_eager(monkeypatch):
    """After MAX_SHAPES compiled shapes, a new shape is an error, not a silent S×S eager flex."""
    monkeypatch.setattr(compiled, "MAX_SHAPES", 1)
    blocks = torch.ones(1, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        q = torch.randn(1, 2, 100, 16)
        kernel_attend("flex", blocks, q, q, q)                  # the one allowed shape
        q = torch.randn(1, 2, 150, 16)
        with pytest.raises(RecompileLimit, match="MAX_SHAPES"):
            kernel_attend("flex", blocks[:, :1, :1].expand(1, 3, 3), q, q, q)


def test_attention_op_fake_matches_real_strides():
    """torch.ops.compact.attention: schema, fake tensor and AOT checks, with permuted (non-contiguous)
    inputs as Dynamo hands them over, and a kernel whose output is not contiguous."""
    def kernel(q, k, v, scale, pools=None, key_valid=None):  # (B, S, H, D)-strided, like CPU SDPA on permuted q
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    handle = register_site(kernel)
    q, k, v = (torch.randn(2, 40, 3, 16).transpose(1, 2) for _ in range(3))
    key_valid = torch.rand(2, 40) < 0.8
    for valid in (None, key_valid):
        out = torch.ops.compact.attention(q, k, v, handle, 0.3, [], valid)
        assert out.is_contiguous()
        torch.testing.assert_close(out, kernel(q, k, v, 0.3, None, valid))
        torch.library.opcheck(torch.ops.compact.attention.default, (q, k, v, handle, 0.3, [], valid),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("S, block_size", [(8, 16), (8, 64), (24, 64), (40, 64)])
def test_partial_tail_block_has_no_nan(S, block_size):
    """Inductor's CPU flex kernel returned NaN rows at these lengths (torch 2.13, data-dependent):
    the CPU path pads to whole blocks. Several draws, since the failure was intermittent."""
    blocks = torch.ones(1, 1, 1, dtype=torch.bool)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 2, S, 16, generator=g) for _ in range(3))
        out = kernel_attend("flex", blocks, q, k, v, block_size=block_size)
        ref = block_sparse_attention_reference(q, k, v, blocks, block_size)
        assert torch.isfinite(out).all() and (out.double() - ref).norm() / ref.norm() < 1e-5
