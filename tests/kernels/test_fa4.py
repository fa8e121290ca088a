"""The FlashAttention-4 kernel backend (kernels/fa4.py) against the float64 reference, on a GPU where
FA4 is installed (`pip install compact_compile[fa4]`; elsewhere these tests cannot run and say so).

The traps it must not fall into (../shared/research/platform.md §9): a partial last key block is
masked only when it is the last entry of its list, and a kernel that ignores the lists computes
dense attention — both are checked against the reference, with sparse outputs that dense attention
would not match."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import rectified_site

from compact_compile.kernels.fa4 import FA4Kernel, fa4_importable
from compact_compile.kernels.reference import block_sparse_attention_reference, rectified_attention_reference
from compact_compile.kernels.registry import kv_block_lists
from compact_compile.layout import TokenLayout
from compact_compile.masks import text_blocks

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
    assert "key-padding" in FA4Kernel.unsupported(cuda, torch.bfloat16, 128, 128, False, key_mask=True)
    assert FA4Kernel.unsupported(cuda, torch.bfloat16, 128, 128, False) == ""
