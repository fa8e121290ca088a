"""Block-sparse attention on FlexAttention: a block map becomes a `BlockMask` of whole blocks (no
mask_mod, so no per-element masking cost) and a compiled `flex_attention` call.

`BlockMask.from_kv_blocks` takes the compacted form directly (per query block: how many key blocks,
and which), O(blocks²); `create_block_mask` would evaluate a mask function over all S² pairs.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .compiled import compiled

_flex = compiled(flex_attention)


def flex(q, k, v, block_mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    """Compiled FlexAttention; inputs are zero-padded to the block mask's length (see block_mask)."""
    S, padded = q.shape[-2], block_mask.seq_lengths[0]
    if padded > S:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, padded - S)) for t in (q, k, v))
    # the GPU kernel's tiles must divide the mask's blocks; its default (128 on Hopper) does not divide 64
    bs = block_mask.BLOCK_SIZE[0]
    tiles = {"BLOCK_M": bs, "BLOCK_N": bs} if q.is_cuda and bs < 128 else None
    return _flex(q, k, v, block_mask=block_mask, scale=scale, kernel_options=tiles)[..., :S, :]


def kv_block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the count of kept key blocks and their indices (kept first, ascending)."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def block_mask_from_lists(num: torch.Tensor, idx: torch.Tensor, seq_len: int, block_size: int) -> BlockMask:
    """BlockMask of kept-block lists (`kv_block_lists`), kept blocks computed whole: for CUDA, or a
    CPU sequence of whole blocks (see `block_mask`)."""
    # the partial-block lists are empty. A separate tensor for them: one tensor in both roles
    # breaks Inductor's CPU flex template.
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx.clone(), num, idx, BLOCK_SIZE=block_size,
                                    seq_lengths=(seq_len, seq_len), compute_q_blocks=False)


def block_mask(blocks: torch.Tensor, seq_len: int, block_size: int) -> BlockMask:
    """BlockMask of bool `blocks` `[B or 1, H or 1, n_blocks, n_blocks]`, kept blocks computed whole.

    On the CPU a sequence that ends inside a block is padded to whole blocks and the last key block
    masks the padding (`kv_idx < seq_len`): Inductor's CPU flex kernel (torch 2.13) reads
    uninitialised memory for some partial tails (NaN rows, e.g. at 8, 24 or 40 tokens)."""
    if blocks.device.type != "cpu" or seq_len % block_size == 0:
        return block_mask_from_lists(*kv_block_lists(blocks), seq_len, block_size)
    full, tail = blocks.clone(), torch.zeros_like(blocks)
    full[..., -1], tail[..., -1] = False, blocks[..., -1]
    (num, idx), (tail_num, tail_idx) = kv_block_lists(full), kv_block_lists(tail)
    padded = blocks.shape[-1] * block_size
    return BlockMask.from_kv_blocks(tail_num, tail_idx, num, idx, BLOCK_SIZE=block_size,
                                    mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < seq_len,
                                    seq_lengths=(padded, padded), compute_q_blocks=False)


class FlexBlockSparse:
    """Attention over the kept blocks of a static `blocks` (bool `[H or 1, n_blocks, n_blocks]`)."""

    def __init__(self, blocks: torch.Tensor, seq_len: int, block_size: int):
        self.blocks, self.seq_len, self.block_size = blocks.bool(), seq_len, block_size
        self._masks: dict[torch.device, BlockMask] = {}

    def block_mask(self, device: torch.device) -> BlockMask:
        if device not in self._masks:
            self._masks[device] = block_mask(self.blocks.to(device)[None], self.seq_len, self.block_size)
        return self._masks[device]

    def __call__(self, q, k, v, scale: float | None = None) -> torch.Tensor:
        return flex(q, k, v, block_mask=self.block_mask(q.device), scale=scale)
