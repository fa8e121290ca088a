"""The dynamic plan's block choice in Triton (kernels/select_triton.py) against the torch estimate it
replaces (rectified._estimate, itself checked against the float64 reference in test_rectified.py),
on the GPU when there is one, else in Triton's interpreter."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import rectified_site

from compact_compile.kernels.rectified import _estimate, pooled
from compact_compile.kernels.select_triton import MAX_BLOCKS, select_blocks_triton
from compact_compile.layout import TokenLayout
from compact_compile.masks import text_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16


@settings(max_examples=10, deadline=None)
@given(grid=st.tuples(st.integers(1, 3), st.integers(2, 8), st.integers(2, 9)), n_text=st.sampled_from([0, 5, 13]),
       before=st.sampled_from([0.0, 0.5, 1.0]), p_remain=st.sampled_from([0.1, 0.3, 0.6]), drop=st.sampled_from([0.5, 0.8, 1.0]),
       density=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**31 - 1))
def test_choice_and_lists_equal_the_torch_estimate(grid, n_text, before, p_remain, drop, density, seed):
    """Partial last blocks, text before, after or around the video, per-head static blocks. The choice equals
    the torch estimate's (fp32 both; a block may differ only where cumulative sums round apart), and
    the lists hold exactly the kept blocks, ascending, then the others."""
    layout = TokenLayout(grid, (1, 4, 4), BS, n_text, round(before * n_text))
    nb = layout.n_blocks
    g = torch.Generator().manual_seed(seed)
    static = (torch.rand(2, nb, nb, generator=g) < density) | (text_blocks(layout) if n_text else False)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 32, generator=g).to(DEVICE) for _ in range(3))
    kern = rectified_site(layout, static, dynamic=True, rectify=False, p_remain=p_remain, drop=drop)
    pools = pooled(q, k, v, layout.n_video, BS)
    want, _, _ = _estimate(pools, None, k[:, :, layout.n_video:], static.to(DEVICE), kern.video_count.to(DEVICE),
                           kern.text_block.to(DEVICE), 32 ** -0.5, BS, True, False, False, p_remain, kern.k_min)
    keep, num, idx = select_blocks_triton(pools[0], pools[2], k, static, layout.n_video, 32 ** -0.5, BS, p_remain,
                                          kern.k_min)
    assert (keep.bool() != want).float().mean() <= 0.01
    assert torch.equal(num, keep.sum(-1, dtype=torch.int32))
    keep, num, idx = keep.cpu().bool(), num.cpu(), idx.cpu().long()
    for row in range(nb):
        kept = keep[1, 1, row].nonzero().flatten()
        assert torch.equal(idx[1, 1, row, :num[1, 1, row]], kept)
        assert torch.equal(idx[1, 1, row].sort().values, torch.arange(nb))


def test_at_least_k_min_and_the_static_blocks():
    """drop bounds the count from below, and the static blocks are always kept."""
    layout = TokenLayout((2, 8, 8), (1, 4, 4), BS)
    nb = layout.n_blocks
    static = torch.zeros(1, nb, nb, dtype=torch.bool)
    static[0, :, 0] = True
    q, k, v = (torch.randn(1, 1, layout.seq_len, 16, generator=torch.Generator().manual_seed(i)).to(DEVICE)
               for i in range(3))
    pools = pooled(q, k, v, layout.n_video, BS)
    keep, num, _ = select_blocks_triton(pools[0], pools[2], k, static, layout.n_video, 0.25, BS, 0.0, 5)
    assert keep[0, 0, :, 0].all() and (num >= 5).all()


def test_ties_at_the_cut_off_keep_exactly_the_covering_count():
    """Zero queries: every block gets P̂ = 1/8. p_remain 0.3 covers 3 blocks (cumulative 0.125, 0.25,
    0.375), so exactly 3 are chosen, not all 8 tied ones: the first three by index."""
    layout = TokenLayout((2, 8, 8), (1, 4, 4), BS)
    nb = layout.n_blocks
    k = torch.randn(1, 1, layout.seq_len, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    q_mean = torch.zeros(1, 1, nb, 16, device=DEVICE)
    keep, num, _ = select_blocks_triton(q_mean, pooled(k, k, k, layout.n_video, BS)[2], k,
                                        torch.zeros(1, nb, nb), layout.n_video, 0.25, BS, 0.3, 0)
    assert nb == 8 and (num == 3).all()
    assert torch.equal(keep[0, 0].cpu().bool(), (torch.arange(nb) < 3).expand(nb, nb))


def test_too_many_blocks_is_one_clear_error():
    q_mean = torch.zeros(1, 1, MAX_BLOCKS + 1, 16)
    with pytest.raises(ValueError, match="at most"):
        select_blocks_triton(q_mean, q_mean, torch.zeros(1, 1, 16 * (MAX_BLOCKS + 1), 16),
                             torch.ones(1, MAX_BLOCKS + 1, MAX_BLOCKS + 1), 16 * (MAX_BLOCKS + 1), 0.25, 16, 0.3, 1)
