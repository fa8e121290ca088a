"""The FlashAttention-4 kernel backend (kernels/fa4.py) against the float64 reference, on a GPU where
FA4 is installed (`pip install compact_compile[fa4]`; elsewhere these tests cannot run and say so).

The traps it must not fall into (../shared/research/platform.md §9): a partial last key block is
masked only when it is the last entry of its list, and a kernel that ignores the lists computes
dense attention — both are checked against the reference, with sparse outputs that dense attention
would not match. Key-padding masks (FA4's "mask" lists and our mask_mod) likewise: masked keys in
video and text blocks, per batch element, rows left with no valid key, and a mask that is ignored
would not match. The CPU half of the key-mask path, splitting the lists, is test_fa4_lists.py."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import rectified_site

from compact_compile.kernels.fa4 import FA4Kernel, fa4_importable
from compact_compile.kernels.reference import (block_sparse_attention_reference, rectified_attention_reference,
                                               token_mask)
from compact_compile.kernels.registry import kv_block_lists
from compact_compile.layout import TokenLayout
from compact_compile.masks import text_blocks, window_blocks

ON_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and fa4_importable()
pytestmark = pytest.mark.skipif(not ON_GPU, reason="needs an sm90 GPU with flash_attn.cute (FA4) installed")
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def flat(S):
    return TokenLayout((1, 1, S), (1, 1, 128), 128)


def rel(out, ref):
    return ((out.double().cpu() - ref.cpu()).norm() / ref.cpu().norm()).item()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, 1500), D=st.sampled_from([64, 128]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), lists=st.sampled_from(["shared", "per head", "per batch"]),
       density=st.floats(0.0, 1.0), scale=st.sampled_from([None, 0.05]), seed=st.integers(0, 2**31 - 1))
def test_fa4_matches_float64_reference(B, H, S, D, dtype, lists, density, scale, seed):
    g = torch.Generator().manual_seed(seed)
    nb = -(-S // 128)
    shape = {"shared": (1, nb, nb), "per head": (H, nb, nb), "per batch": (B, H, nb, nb)}[lists]
    blocks = torch.rand(shape, generator=g) < density
    blocks[..., torch.arange(nb), torch.arange(nb)] = True
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(dtype).cuda() for _ in range(3))
    kern = FA4Kernel(flat(S))
    out = kern.attend(q, k, v, kern.prepare(tuple(x.cuda() for x in kv_block_lists(blocks))), scale)
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, 128, scale)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < TOL[dtype]


def test_fa4_does_not_ignore_its_lists():
    """The partial last block listed last, other blocks dropped: sparse ≠ dense, = reference."""
    g = torch.Generator().manual_seed(0)
    S, nb = 1000, 8
    blocks = torch.rand(2, nb, nb, generator=g) < 0.3
    blocks[..., torch.arange(nb), torch.arange(nb)] = True
    blocks[..., nb - 1] = True                       # the partial block in every list
    q, k, v = (torch.randn(1, 2, S, 128, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
    kern = FA4Kernel(flat(S))
    out = kern.attend(q, k, v, kern.prepare(tuple(x.cuda() for x in kv_block_lists(blocks))), None)
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, 128)
    dense = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), torch.ones(1, nb, nb, dtype=torch.bool), 128)
    assert rel(out, ref) < TOL[torch.bfloat16] and rel(dense, ref) > 0.1
    torch.testing.assert_close(kern.dense(q, k, v, None).float(), dense.float().cuda(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n_before", [0, 77, 30])
@pytest.mark.parametrize("dynamic", [False, True])
def test_fa4_site_with_text_blocks_and_rectification(n_before, dynamic):
    """A joint text+video site on FA4: text blocks dense, online choice per batch element, R·O + Ō
    merged after the kernel; equals the rectified float64 reference."""
    layout = TokenLayout((3, 16, 24), (1, 8, 16), 128, 77, n_before)
    g = torch.Generator().manual_seed(1)
    static = torch.eye(layout.n_blocks, dtype=torch.bool)[None] | text_blocks(layout)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 64, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
    site = rectified_site(layout, static, dynamic=dynamic, rectify=True, drop=0.8, kernel="fa4")
    assert site.kernel.name == "fa4"
    keep, _, _ = site.estimate(q, k, v)
    out = site(q, k, v)
    ref, _ = rectified_attention_reference(*(x.cpu() for x in (q, k, v)), n_video=layout.n_video, block_size=128,
                                           static=static, dynamic=dynamic, rectify=True, drop=0.8, keep=keep.cpu())
    assert rel(out, ref) < TOL[torch.bfloat16]


def test_fa4_refuses_what_it_cannot_run():
    cuda = torch.device("cuda")
    assert "block size 64" in FA4Kernel.unsupported(cuda, torch.bfloat16, 128, 64, False)
    assert "dtype" in FA4Kernel.unsupported(cuda, torch.float32, 128, 128, False)
    assert FA4Kernel.unsupported(cuda, torch.bfloat16, 128, 128, False) == ""
    assert FA4Kernel.unsupported(cuda, torch.bfloat16, 128, 128, False, key_mask=True) == ""


# ---- key-padding masks: FA4's "mask" lists and our mask_mod -----------------------------------------

def key_mask(kind: str, B: int, S: int, n_text: int, g: torch.Generator) -> torch.Tensor:
    """bool `[B or 1, S]`, the last `n_text` tokens text (as in tile order). "random": each key kept
    with its batch element's own probability, so masked keys fall in video and text blocks;
    "text padding": each batch element keeps its own prefix of the text (none, some or all);
    "video hole": that, and a run of up to three blocks of keys excluded, so that some blocks hold
    no valid key and rows that list only those get 0; "broadcast": one random row for the batch.
    Key 0 is always kept: the output is never all zeros."""
    if kind in ("random", "broadcast"):
        rows = B if kind == "random" else 1
        valid = torch.rand(rows, S, generator=g) < 0.2 + 0.7 * torch.rand(rows, 1, generator=g)
    else:
        valid = torch.ones(B, S, dtype=torch.bool)
        for b in range(B):
            valid[b, S - n_text + int(torch.randint(0, n_text + 1, (1,), generator=g)):] = False
            if kind == "video hole":
                start = int(torch.randint(0, S, (1,), generator=g))
                valid[b, start:start + int(torch.randint(1, 3 * 128, (1,), generator=g))] = False
    valid[:, 0] = True
    return valid


def attend_masked(q, k, v, blocks, key_valid, scale=None):
    kern = FA4Kernel(flat(q.shape[-2]))
    prepared = kern.prepare(tuple(x.cuda() for x in kv_block_lists(blocks)))
    return kern.attend(q, k, v, prepared, scale, key_valid=key_valid.cuda())


def assert_no_key_rows_zero(out, blocks, key_valid):
    """Rows that see no valid key in their listed blocks are 0 (the reference's and Triton's rule)."""
    B, H, S, _ = out.shape
    seen = (token_mask(blocks, S, 128) & key_valid[:, None, None, :]).any(-1).expand(B, H, S)
    assert (out.cpu()[~seen] == 0).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), H=st.integers(1, 3), S=st.integers(1, 1500), n_text=st.sampled_from([0, 77, 256]),
       D=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       lists=st.sampled_from(["shared", "per head", "per batch"]), density=st.floats(0.0, 1.0),
       kind=st.sampled_from(["random", "text padding", "video hole", "broadcast"]),
       scale=st.sampled_from([None, 0.05]), seed=st.integers(0, 2**31 - 1))
def test_fa4_key_mask_matches_float64_reference(B, H, S, n_text, D, dtype, lists, density, kind, scale, seed):
    """Random lists, partial last blocks, per-batch masks over video and text keys: the float64
    reference with the mask, rows without a valid key 0."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-S // 128)
    shape = {"shared": (1, nb, nb), "per head": (H, nb, nb), "per batch": (B, H, nb, nb)}[lists]
    blocks = torch.rand(shape, generator=g) < density
    blocks[..., torch.arange(nb), torch.arange(nb)] = True
    key_valid = key_mask(kind, B, S, min(n_text, S - 1), g)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(dtype).cuda() for _ in range(3))
    out = attend_masked(q, k, v, blocks, key_valid, scale)
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, 128, scale, key_valid)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < TOL[dtype]
    assert_no_key_rows_zero(out, blocks, key_valid)


def test_fa4_does_not_ignore_the_key_mask():
    """Masked keys in video blocks and in the partial last (text) block of one batch element, half the
    keys of the other: the output is the masked reference, and the unmasked one — what a kernel that
    drops the mask computes — is far from it, as is FA4 itself without the mask. Both of FA4's lists
    are used: blocks with masked keys and blocks without."""
    from compact_compile.kernels.fa4 import key_block_states, split_lists
    g = torch.Generator().manual_seed(0)
    S, nb = 1000, 8
    blocks = torch.rand(2, nb, nb, generator=g) < 0.4
    blocks[..., torch.arange(nb), torch.arange(nb)] = True
    blocks[..., nb - 1] = True                       # the partial block in every list
    key_valid = torch.ones(2, S, dtype=torch.bool)
    key_valid[0, 100:400] = False                    # video: all of block 1, parts of blocks 0 and 3
    key_valid[0, 920:] = False                       # text padding in the partial last block
    key_valid[1] = torch.rand(S, generator=g) < 0.5
    key_valid[:, 0] = True
    q, k, v = (torch.randn(2, 2, S, 128, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
    out = attend_masked(q, k, v, blocks, key_valid)
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, 128, key_valid=key_valid)
    ref_unmasked = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, 128)
    kern = FA4Kernel(flat(S))
    unmasked = kern.attend(q, k, v, kern.prepare(tuple(x.cuda() for x in kv_block_lists(blocks))), None)
    assert rel(out, ref) < TOL[torch.bfloat16]
    assert rel(ref_unmasked, ref) > 0.1 and rel(unmasked, ref) > 0.1
    mask_cnt, _, full_cnt, _ = split_lists(kv_block_lists(blocks), key_block_states(key_valid, nb, 128))
    assert mask_cnt.sum() > 0 and full_cnt.sum() > 0 and (mask_cnt[0] < mask_cnt[1]).any()


def test_fa4_rows_without_a_valid_key_are_zero():
    """Key block 1 wholly masked, block 0 partly: block 1 leaves every list, so query block 0 keeps
    block 0 as a mask block; query block 1 lists only block 1 and is left with no block (0); query
    block 2 keeps the partial last block as a full block, whose sequence mask must still apply.
    Finite, zeros where no key is seen, the reference elsewhere."""
    S = 3 * 128 - 20
    blocks = torch.tensor([[[True, True, False], [False, True, False], [False, True, True]]])
    key_valid = torch.ones(1, S, dtype=torch.bool)
    key_valid[0, 128:256] = False
    key_valid[0, 5] = False
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, S, 128, generator=g).to(torch.float16).cuda() for _ in range(3))
    out = attend_masked(q, k, v, blocks, key_valid)
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, 128, key_valid=key_valid)
    assert torch.isfinite(out).all()
    assert (out[:, :, 128:256] == 0).all()
    assert rel(out, ref) < TOL[torch.float16]
    assert_no_key_rows_zero(out, blocks, key_valid)


def test_fa4_key_mask_compiles_once():
    """FA4 keys its compile cache on the mask_mod and the layouts of its inputs: another mask (other
    values, other blocks masked) on the same shapes runs the kernel compiled for the first."""
    from flash_attn.cute.interface import _flash_attn_fwd
    g = torch.Generator().manual_seed(3)
    S, nb = 700, 6
    blocks = (torch.rand(1, nb, nb, generator=g) < 0.5) | torch.eye(nb, dtype=torch.bool)
    q, k, v = (torch.randn(2, 2, S, 64, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
    first, second = (key_mask(kind, 2, S, 77, g) for kind in ("text padding", "random"))
    attend_masked(q, k, v, blocks, first)
    compiled = len(_flash_attn_fwd.compile_cache.cache)
    out = attend_masked(q, k, v, blocks, second)
    assert len(_flash_attn_fwd.compile_cache.cache) == compiled
    ref = block_sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), blocks, 128, key_valid=second)
    assert rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dynamic, rectify", [(False, False), (False, True), (True, True)])
def test_fa4_joint_site_with_prompt_padding(dynamic, rectify):
    """A joint text+video site as HunyuanVideo and Mochi have it (text last, each batch element its
    own number of valid prompt tokens) through the whole site on FA4: a window over the video
    blocks, every block holding text in full, online choice and R·O + Ō where asked; equals the
    rectified float64 reference over the valid keys."""
    layout = TokenLayout((3, 16, 24), (1, 8, 16), 128, 77)
    g = torch.Generator().manual_seed(4)
    static = window_blocks(layout, (1, 3, 3))[None] | text_blocks(layout)
    key_valid = torch.ones(2, layout.seq_len, dtype=torch.bool)
    key_valid[0, layout.n_video + 10:] = False
    key_valid[1, layout.n_video + 60:] = False
    q, k, v = (torch.randn(2, 2, layout.seq_len, 128, generator=g).to(torch.bfloat16).cuda() for _ in range(3))
    site = rectified_site(layout, static, dynamic=dynamic, rectify=rectify, drop=0.8, kernel="fa4")
    assert site.kernel.name == "fa4"
    keep, _, _ = site.estimate(q, k, v, key_valid=key_valid.cuda())
    out = site(q, k, v, None, None, key_valid.cuda())
    ref, _ = rectified_attention_reference(*(x.cpu() for x in (q, k, v)), n_video=layout.n_video, block_size=128,
                                           static=static, dynamic=dynamic, rectify=rectify, drop=0.8,
                                           keep=keep.cpu(), key_valid=key_valid)
    unmasked, _ = rectified_attention_reference(*(x.cpu() for x in (q, k, v)), n_video=layout.n_video,
                                                block_size=128, static=static, dynamic=dynamic, rectify=rectify,
                                                drop=0.8, keep=keep.cpu())
    assert rel(out, ref) < TOL[torch.bfloat16] and rel(unmasked, ref) > 4 * TOL[torch.bfloat16]
