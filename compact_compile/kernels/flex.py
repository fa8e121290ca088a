"""Block-sparse attention on FlexAttention: block lists become a `BlockMask` of whole blocks and a
compiled `flex_attention` call. Runs wherever torch runs (the CPU path, and the fallback on GPUs).

`BlockMask.from_kv_blocks` takes the compacted lists directly, O(blocks²); `create_block_mask` would
evaluate a mask function over all S² pairs. Listed blocks are "full" (no per-element mask_mod cost)
except where some key must be excluded: a key-padding mask (`key_valid`), or the CPU's padded tail
(below). Those blocks go to the partial lists, where `mask_mod` reads the key's validity.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..layout import TokenLayout
from .compiled import compiled
from .registry import BlockLists, batched, kv_block_lists, masked_key_blocks, sdpa_dense

_flex = compiled(flex_attention)


def flex(q, k, v, block_mask: BlockMask, scale: float | None = None, score_mod=None) -> torch.Tensor:
    """Compiled FlexAttention; inputs are zero-padded to the block mask's length (see `FlexKernel`).
    `score_mod`: a flex_attention site's own (kernels/model_mask.py)."""
    S, padded = q.shape[-2], block_mask.seq_lengths[0]
    if padded > S:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, padded - S)) for t in (q, k, v))
    # the GPU kernel's tiles must divide the mask's blocks; its default (128 on Hopper) does not divide 64
    bs = block_mask.BLOCK_SIZE[0]
    tiles = {"BLOCK_M": bs, "BLOCK_N": bs} if q.is_cuda and bs < 128 else None
    return _flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                 kernel_options=tiles)[..., :S, :]


def kept_map(lists: BlockLists) -> torch.Tensor:
    """bool `[B or 1, H or 1, nq, nk]` from block lists: the inverse of `kv_block_lists`."""
    num, idx = batched(lists)
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    return torch.zeros(idx.shape, dtype=torch.bool, device=idx.device).scatter(-1, idx.long(), listed)


def _full_block_mask(lists: BlockLists, seq_len: int, block_size: int) -> BlockMask:
    num, idx = batched(lists)
    # the partial lists are empty; a separate tensor for them: one tensor in both roles breaks
    # Inductor's CPU flex template
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx.clone(), num, idx, BLOCK_SIZE=block_size,
                                    seq_lengths=(seq_len, seq_len), compute_q_blocks=False)


def _masked_block_mask(lists: BlockLists, seq_len: int, block_size: int, key_valid: torch.Tensor) -> BlockMask:
    """Listed blocks holding an excluded key are partial (mask_mod: the key is valid); the rest full.
    `key_valid` `[B, whole blocks]`, False past the sequence."""
    nk = key_valid.shape[-1] // block_size
    has_excluded = masked_key_blocks(key_valid, nk, block_size)[:, None, None, :]
    kept = kept_map(lists)
    (part_num, part_idx), (full_num, full_idx) = (kv_block_lists(kept & has_excluded),
                                                  kv_block_lists(kept & ~has_excluded))
    return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=lambda b, h, q_idx, kv_idx: key_valid[b, kv_idx],
                                    seq_lengths=(seq_len, seq_len), compute_q_blocks=False)


class FlexKernel:
    """FlexAttention over whole blocks.

    On the CPU a sequence that ends inside a block is padded to whole blocks and the padding is
    excluded like a masked key: Inductor's CPU flex kernel (torch 2.13) reads uninitialised memory
    for some partial tails (NaN rows, e.g. at 8, 24 or 40 tokens)."""

    name = "flex"
    fuses_rectify = False

    def __init__(self, layout: TokenLayout):
        self.seq_len, self.block_size = layout.seq_len, layout.block_size

    @staticmethod
    def unsupported(device, dtype, head_dim, block_size, explicit, key_mask=False) -> str:
        return ""

    def _pads_tail(self, device) -> bool:
        return device.type == "cpu" and self.seq_len % self.block_size != 0

    def prepare(self, lists: BlockLists):
        """(the lists, their BlockMask when no key is ever excluded on their device)."""
        whole = not self._pads_tail(lists[0].device)
        return lists, _full_block_mask(lists, self.seq_len, self.block_size) if whole else None

    def block_mask(self, prepared, batch: int, key_valid=None) -> BlockMask:
        lists, whole = prepared
        if key_valid is None and whole is not None:
            return whole
        S, bs, device = self.seq_len, self.block_size, lists[0].device
        padded = -(-S // bs) * bs
        valid = torch.ones(1, S, dtype=torch.bool, device=device) if key_valid is None else key_valid.bool()
        valid = torch.nn.functional.pad(valid, (0, padded - S), value=False).expand(batch, padded)
        return _masked_block_mask(lists, padded if self._pads_tail(device) else S, bs, valid)

    def attend(self, q, k, v, prepared, scale, key_valid=None, rectify=None) -> torch.Tensor:
        if rectify is not None:
            raise ValueError("FlexAttention has no rectification epilogue: merge R·O + Ō outside")
        return flex(q, k, v, self.block_mask(prepared, q.shape[0], key_valid), scale)

    def dense(self, q, k, v, scale, key_valid=None) -> torch.Tensor:
        return sdpa_dense(q, k, v, scale, key_valid)
