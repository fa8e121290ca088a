"""Float64 reference for block-sparse attention, written for clarity, not speed: expand the block
map to a token mask and run masked softmax attention on upcast inputs. O(S²) memory: tests only."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_mask(blocks: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """bool `[..., S, S]`: query i may see key j iff block (i // bs, j // bs) is kept."""
    return blocks.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :seq_len, :seq_len]


def block_sparse_attention_reference(q, k, v, blocks, block_size: int, scale: float | None = None):
    """softmax(q·kᵀ·scale masked to the kept blocks)·v in float64; q, k, v `[B, H, S, D]`, blocks
    `[H or 1, n_blocks, n_blocks]`. Returns float64."""
    mask = token_mask(blocks.to(q.device), q.shape[-2], block_size)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)
