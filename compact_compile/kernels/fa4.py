"""Block-sparse attention on FlashAttention-4 (CuTe DSL, `pip install compact_compile[fa4]`).

FA4's Hopper forward is FlashAttention-3's design (a producer warp, two MMA warp groups in
ping-pong, softmax overlapped with the MMAs): what Triton cannot express on sm90. On the same block
lists it ran 1.47× faster than our Triton kernel on an H200 (../shared/research/platform.md §9).

Our block lists are FA4's "full" block lists (no mask_mod: no per-element cost). Two FA4 rules
shape them (flash_attn/cute/block_sparse_utils.py):
- it walks a list backwards and applies the sequence-length mask only to the first block it
  processes, so a partial last key block must be the LAST entry of its list: our lists are
  ascending (`kv_block_lists`), so it is;
- on sm90 the key block must equal its key tile, 128 for head dims ≤ 128; 64-token plans take
  another kernel.
Not here: key-padding masks (they need a CuTe mask_mod; such sites take our Triton kernel, and the
report says so), a rectification epilogue (R·O + Ō is merged in the graph), fp8 (sm100 only).
"""
from __future__ import annotations

import functools

import torch

from ..layout import TokenLayout
from .registry import BlockLists, batched, sdpa_dense

BLOCK = 128
HEAD_DIMS = (64, 96, 128)


@functools.cache
def _fa4():
    """(_flash_attn_fwd, BlockSparseTensorsTorch), or the ImportError message."""
    try:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from flash_attn.cute.interface import _flash_attn_fwd
    except Exception as e:  # noqa: BLE001  (a broken install raises more than ImportError)
        return f"flash_attn.cute not importable ({type(e).__name__}: {str(e)[:120]})"
    return _flash_attn_fwd, BlockSparseTensorsTorch


def fa4_importable() -> bool:
    return not isinstance(_fa4(), str)


class FA4Kernel:
    name = "fa4"
    fuses_rectify = False

    def __init__(self, layout: TokenLayout):
        self.block_size = layout.block_size

    @staticmethod
    def unsupported(device, dtype, head_dim, block_size, explicit, key_mask=False) -> str:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"no FA4 on {device}"
        major = torch.cuda.get_device_capability(device)[0]
        if major not in (9, 10):
            return f"compute capability {major}.x (FA4 block-sparse: sm90, sm100)"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {dtype} (FA4: fp16/bf16)"
        if head_dim not in HEAD_DIMS:
            return f"head dim {head_dim} (FA4 block-sparse here: {HEAD_DIMS})"
        if block_size != BLOCK:
            return f"block size {block_size} (FA4's key tile is {BLOCK})"
        if key_mask:
            return "key-padding mask (FA4 needs a CuTe mask_mod for it; not built yet)"
        if major == 10:
            return "sm100 needs 256-token query blocks for block sparsity; plans use 128"
        got = _fa4()
        return got if isinstance(got, str) else ""

    def prepare(self, lists: BlockLists):
        """FA4's block-sparse tensors: counts `[B|1, H|1, nq]`, indices `[B|1, H|1, nq, width]`
        int32, every listed block "full"; the "mask" lists are empty."""
        _, BlockSparseTensorsTorch = _fa4()
        num, idx = (x.to(torch.int32).contiguous() for x in batched(lists))
        empty = torch.zeros_like(num)
        return BlockSparseTensorsTorch(empty, torch.zeros_like(idx[..., :1]), num, idx,
                                       block_size=(self.block_size, self.block_size))

    def attend(self, q, k, v, prepared, scale, key_valid=None, rectify=None) -> torch.Tensor:
        if key_valid is not None or rectify is not None:
            raise ValueError("the FA4 kernel takes neither key masks nor a rectification epilogue")
        return _run(q, k, v, scale, block_sparse_tensors=prepared)

    def dense(self, q, k, v, scale, key_valid=None) -> torch.Tensor:
        if key_valid is not None:
            return sdpa_dense(q, k, v, scale, key_valid)
        return _run(q, k, v, scale)


def _run(q, k, v, scale, **sparse) -> torch.Tensor:
    """FA4 works in (B, S, H, D): it gets views of our (B, H, S, D) tensors, the output included, so
    nothing is copied."""
    flash_fwd, _ = _fa4()
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    flash_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
              out=out.transpose(1, 2), **sparse)
    return out
