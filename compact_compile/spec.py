"""SiteSpec: everything the runtime needs to know about one rewritten attention site, as plain data.

The planner (planner.py) makes one per eligible site from the options, the plan and the graph; the
rewrite (passes/rewrite.py) reads which inputs the site's op takes from it; `kernels.make_site`
builds the runtime from it. Nothing downstream asks a kernel object what it can do: what was chosen,
and why, is here, and the report prints it.

    SiteSpec(name="blocks.3.attn1", layout=TokenLayout(grid=(21, 30, 52), tile=(4, 4, 8), …),
             ranges=(StepRange(15, None, window),),   # dense below step 15, the window after
             selection=None, rectify="block", key_mask=False,
             kernel="triton", kernel_reason="CUDA sm90, FA4 not installed")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .layout import TokenLayout

RECTIFY_MODES = (None, "block", "rows")


@dataclass(frozen=True)
class StepRange:
    """Denoising steps start ≤ step < end (end None: open) use `blocks`, bool `[H or 1, nb, nb]`
    over the tiled sequence; `blocks` None means dense attention in these steps."""
    start: int
    end: int | None
    blocks: torch.Tensor | None

    def holds(self, step: int) -> bool:
        return self.start <= step and (self.end is None or step < self.end)


@dataclass(frozen=True)
class Selection:
    """Online block choice (dynamic plans, Rectified SpaAttn): per query block, the fewest top key
    blocks of the pooled estimate holding `p_remain` of its mass, at least ⌊(1 − drop)·nb⌋ of them,
    added to the range's static blocks."""
    p_remain: float = 0.3
    drop: float = 0.9

    def min_blocks(self, n_blocks: int) -> int:
        """⌊(1 − drop)·n_blocks⌋, the product rounded first: in floats (1 − 0.9)·10 is 0.99999…"""
        return math.floor(round((1 - self.drop) * n_blocks, 9))


@dataclass(frozen=True)
class ModelMask:
    """What a flex_attention site computes besides softmax(q·kᵀ)·v, read off the graph
    (passes/flex_sites.py): the model's BlockMask, whose block lists arrive with every call (they may
    change per call), and its functions, which do not change.

    A key is attended where its block (q // q_block, kv // kv_block) is listed full, or listed partial
    and `mask_mod(b, h, q, kv, *mask_buffers)` is True; scores pass through
    `score_mod(score, b, h, q, kv, *score_buffers)`. Positions are the model's; `tiled_by` says how
    the model orders the video tokens: tiles of that shape (NABLA's (1, 8, 8)), or None for raster."""
    q_block: int
    kv_block: int
    mask_mod: Callable | None = field(default=None, compare=False)    # None: every pair of a listed block
    score_mod: Callable | None = field(default=None, compare=False)   # None: the score unchanged
    tiled_by: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class SiteSpec:
    name: str
    layout: TokenLayout
    ranges: tuple[StepRange, ...]          # steps before ranges[0].start run dense
    selection: Selection | None = None
    rectify: str | None = None             # None, "block" (R, Ō per query block) or "rows" (per query row)
    key_mask: bool = False                 # the op gets a per-batch key mask `[B, S]` (key-padding)
    kernel: str = "flex"                   # a name in kernels.registry.KERNELS
    kernel_reason: str = ""
    merge_in_graph: bool = False           # rectified: R·O + Ō merged by the graph on the way back
    model_mask: ModelMask | None = None    # a flex_attention site: the model's own mask, kept inside the blocks
    fp8: bool = False                      # attention in e4m3 (kernels/fp8.py): the op gets quantized tiles
    extras: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.rectify not in RECTIFY_MODES:
            raise ValueError(f"rectify must be one of {RECTIFY_MODES}, not {self.rectify!r}")
        if not self.ranges:
            raise ValueError("a site needs at least one step range")
        if self.merge_in_graph and self.rectify != "block":
            raise ValueError("only per-block rectification can be merged in the graph")
        if self.fp8 and (self.merge_in_graph or self.rectify == "rows" or self.model_mask is not None):
            raise ValueError("FP8 attention rectifies per block, in the site's call, and keeps no model mask")

    @property
    def pooled(self) -> bool:
        """Whether the op takes rectification's block statistics (q̄, δq, k̄, δk, v̄), pooled by the
        rewrite in the same pass that reorders q, k, v."""
        return self.selection is not None or self.rectify is not None

    @property
    def scheduled(self) -> bool:
        return len(self.ranges) > 1 or self.ranges[0].start > 0

    def range_index(self, step: int | None) -> int | None:
        """Index of the range `step` falls in; None where attention is dense (a step before the first
        range, or a range without blocks). An unknown step (no timestep seen) takes the first range,
        a step past the last range the last one."""
        if step is None:
            index = 0
        elif step < self.ranges[0].start:
            return None
        else:
            index = next((i for i, r in enumerate(self.ranges) if r.holds(step)), len(self.ranges) - 1)
        return None if self.ranges[index].blocks is None else index

    @property
    def density(self) -> float:
        """Fraction of blocks computed by the first sparse range (online choices not counted)."""
        blocks = self.ranges[0].blocks
        return 1.0 if blocks is None else blocks.float().mean().item()


def single_range(blocks: torch.Tensor) -> tuple[StepRange, ...]:
    return (StepRange(0, None, blocks),)
