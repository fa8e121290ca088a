"""An FP8 site's block choice and rectification estimate at joint (text + video) sites: which text-key
rows the Triton kernels read, and the per-call host work they must not do."""
import pytest
import torch
from support import DEVICE, needs_fp8, rectified_site

from compact_compile.kernels import rectified as rectified_module
from compact_compile.kernels.fp8 import quantize_tiles, smoothing_stats
from compact_compile.kernels.rectified import pooled
from compact_compile.layout import TokenLayout
from compact_compile.masks import text_blocks


@needs_fp8
@pytest.mark.parametrize("prompt_mask", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("n_text, n_before, k_rows", [(37, 0, "contiguous"), (37, 37, "contiguous"),
                                                      (37, 11, "contiguous"), (37, 0, "strided")])
def test_fp8_sites_choose_and_estimate_from_the_text_keys_in_the_models_order(n_text, n_before, k_rows, dynamic,
                                                                            prompt_mask, monkeypatch):
    """A rectified FP8 site choosing blocks and estimating R, Ō with text keys. Where the text follows
    the video, the Triton choice and estimate read the text keys from the model's unquantized k (their
    rows there are their tiled rows), so the FP8 site's keep, R and Ō equal a bf16 site's; where some
    text precedes the video, those rows hold video, and where the model's k is not laid out as those
    kernels read it (head dim not contiguous), the compiled estimate reads them dequantized from the
    tiles instead, within e4m3's rounding. Keys and values nearly constant per block, so that the
    estimate compensates skipped blocks (Ō ≠ 0); the text keys far from the video's, so that reading
    other rows would be far off. `prompt_mask`: a key-padding mask over the text, as HunyuanVideo's."""
    bs = 32
    layout = TokenLayout((2, 6, 8), (1, 4, 8), bs, n_text, n_before)   # 96 video tokens
    nb, S = layout.n_blocks, layout.seq_len
    g = torch.Generator().manual_seed(n_text + n_before)
    static = torch.eye(nb, dtype=torch.bool)[None] | text_blocks(layout)
    centre = lambda: torch.randn(2, 2, nb, 1, 32, generator=g).expand(-1, -1, -1, bs, -1).reshape(  # noqa: E731
        2, 2, -1, 32)[:, :, :S]
    q, k, v = (centre() + 0.05 * torch.randn(2, 2, S, 32, generator=g) for _ in range(3))
    k[:, :, layout.n_video:] = 3 * k[:, :, layout.n_video:] + 2      # text keys unlike the video's
    q, k, v = (x.to(DEVICE) for x in (q, k, v))
    target = layout.target_index(DEVICE)
    in_model_order = tuple(x.index_select(-2, target) for x in (q, k, v))
    if k_rows == "strided":
        in_model_order = tuple(x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in in_model_order)
    triton_reads_the_model = n_before == 0 and k_rows == "contiguous"
    key_valid = None
    if prompt_mask:     # tile order: the text last; each batch element keeps a different prompt length
        key_valid = torch.ones(2, S, dtype=torch.bool, device=DEVICE)
        key_valid[0, layout.n_video + n_text // 2:] = False
        key_valid[1, layout.n_video + 3:] = False
    tiles = quantize_tiles(q, k, v, *smoothing_stats(k, v, key_valid), bs)
    pools = pooled(q, k, v, layout.n_video, bs, key_valid)
    site = rectified_site(layout, static, dynamic=dynamic, rectify=True, kernel="triton")
    on_triton = []
    choose = rectified_module.choose_triton
    monkeypatch.setattr("compact_compile.kernels.site.choose_triton",
                        lambda pools, k, *a, **kw: on_triton.append(k) or choose(pools, k, *a, **kw))
    keep, _, r, o_bar = site._choose(0, q, k, v, None, pools, key_valid)
    keep8, _, r8, o_bar8 = site._choose(0, tiles.q, tiles.k, None, None, pools, key_valid,
                                        fp8=(tiles, torch.float32, in_model_order))
    assert len(on_triton) == (2 if triton_reads_the_model else 1)
    assert (r < 0.99).float().mean() > 0.3 and o_bar.norm() > 0, "the estimate should compensate here"
    if triton_reads_the_model:
        assert torch.equal(keep8.bool().expand_as(keep.bool()), keep.bool().expand_as(keep8.bool()))
        torch.testing.assert_close(r8, r, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(o_bar8, o_bar, rtol=1e-6, atol=1e-6)
    else:
        assert (r8 - r).abs().max() < 0.05 * r.abs().max()
        assert (o_bar8 - o_bar).norm() < 0.05 * o_bar.norm()


def test_a_site_copies_its_block_counts_to_the_device_once():
    """The compiled estimate's per-block counts reach the device at the first call only: a copy from
    host memory on every call would wait for the GPU to drain (two per site and call)."""
    layout = TokenLayout((2, 4, 8), (1, 4, 8), 32, 7, 7)
    static = torch.eye(layout.n_blocks, dtype=torch.bool)[None] | text_blocks(layout)
    site = rectified_site(layout, static, dynamic=False, rectify=True, rows=True)   # rows: the compiled estimate
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, dtype=torch.float64) for _ in range(3))
    first = site.estimate(q, k, v)

    class NoCopies(torch.Tensor):
        def to(self, *args, **kwargs):
            raise AssertionError("copied again")

    site.video_count, site.text_block = (x.as_subclass(NoCopies) for x in (site.video_count, site.text_block))
    again = site.estimate(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
