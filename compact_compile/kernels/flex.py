"""Block-sparse attention on FlexAttention: a plan's block map becomes a `BlockMask` of whole
blocks (no mask_mod, so no per-element masking cost), built once per device, and a compiled
`flex_attention` call.

`BlockMask.from_kv_blocks` takes the compacted form directly (per query block: how many key blocks,
and which), O(blocks²); `create_block_mask` would evaluate a mask function over all S² pairs.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# Flex compiles one kernel per (shape, dtype, device). Dynamo's default limit of 8 per function,
# when hit, silently falls back to eager flex, which materialises the S×S scores; we raise instead.
MAX_FLEX_SHAPES = 64


class FlexRecompileLimit(RuntimeError):
    pass


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def kv_block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the count of kept key blocks and their indices (kept first, ascending)."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


class FlexBlockSparse:
    """Attention over the kept blocks of `blocks` (bool `[H or 1, n_blocks, n_blocks]`)."""

    def __init__(self, blocks: torch.Tensor, seq_len: int, block_size: int):
        self.blocks, self.seq_len, self.block_size = blocks.bool(), seq_len, block_size
        self._masks: dict[torch.device, BlockMask] = {}

    def block_mask(self, device: torch.device) -> BlockMask:
        if device not in self._masks:
            num, idx = kv_block_lists(self.blocks.to(device)[None])
            # all kept blocks are "full" (no mask_mod); the partial-block lists are empty. A separate
            # tensor for the empty list: one tensor in both roles breaks Inductor's CPU template.
            self._masks[device] = BlockMask.from_kv_blocks(
                torch.zeros_like(num), idx.clone(), num, idx, BLOCK_SIZE=self.block_size,
                seq_lengths=(self.seq_len, self.seq_len), compute_q_blocks=False)
        return self._masks[device]

    def __call__(self, q, k, v, scale: float | None = None) -> torch.Tensor:
        bm = self.block_mask(q.device)
        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_FLEX_SHAPES, fail_on_recompile_limit_hit=True):
                return _compiled_flex()(q, k, v, block_mask=bm, scale=scale)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise FlexRecompileLimit(
                f"FlexAttention was compiled for {MAX_FLEX_SHAPES} attention shapes in this process; "
                f"rather than fall back to eager flex (S×S memory), compact_compile stops here. "
                f"Compile with fixed video sizes or raise compact_compile.kernels.flex.MAX_FLEX_SHAPES") from None
