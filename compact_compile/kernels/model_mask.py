"""The runtime of a rewritten flex_attention site: the model's own masked attention, restricted to
the plan's blocks, on FlexAttention (the one kernel that evaluates a model's mask_mod and score_mod).

q, k, v arrive in tile order (layout.py); the model's BlockMask arrives, as block lists and the
tensors its functions captured, with every call, in the model's token order (passes/flex_sites.py).
With `src[p]` the model's position of the token at tiled position p (`model_positions`), the call is

    softmax over kept keys of score_mod(q·kᵀ·scale, b, h, src[i], src[j]) · v
    kept(i, j) = plan_block(i // bs, j // bs) ∧ model_mask(b, h, src[i], src[j]) ∧ j < S
    model_mask(b, h, qi, kj) = full(qi // Q_BLOCK, kj // KV_BLOCK)
                               ∨ (partial(qi // Q_BLOCK, kj // KV_BLOCK) ∧ mask_mod(b, h, qi, kj, *buffers))

which is exactly the model's call with the keys outside the plan's blocks dropped (with the dense
plan, the model's call itself). The BlockMask handed to FlexAttention is in tile order: a plan block
whose tokens meet no listed model block is skipped, one whose tokens meet only full model blocks is
full (no per-element mask), the rest are partial, where the mask_mod above decides per element.

Everything derived from the model's values (its block lists, its buffers) is computed per call and
never kept: NABLA chooses its blocks from each call's q and k. Only the layout's geometry (positions,
which model blocks each tile block touches) and the plan's block maps are cached, per device.
"""
from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..layout import TokenLayout
from ..schedule import CLOCK, warn_unknown_step
from ..spec import SiteSpec
from .flex import FlexKernel, flex
from .registry import kv_block_lists

NONE, PARTIAL, FULL = 0, 1, 2


def model_positions(layout: TokenLayout, tiled_by, device=None) -> torch.Tensor:
    """`src[p]`: the model's sequence position of the token at tiled position p. The model orders the
    video tokens in raster order, or (`tiled_by`) in tiles of that shape."""
    src = layout.source_index(device)
    if tiled_by is None:
        return src
    return TokenLayout(layout.grid, tuple(tiled_by), math.prod(tiled_by)).target_index(device)[src]


def model_block_states(kv_num, kv_indices, full_num=None, full_indices=None) -> torch.Tensor:
    """int8 `[B or 1, H or 1, nq, nk]` over the model's blocks: NONE, PARTIAL (mask_mod decides) or FULL."""
    state = _listed(kv_num, kv_indices).to(torch.int8)
    if full_num is not None:
        full = _listed(full_num, full_indices)
        state = torch.where(full, torch.tensor(FULL, dtype=torch.int8, device=full.device), state)
    return state


def _listed(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """bool `[B, H, nq, nk]`: block (n, m) is among the first num[n] of indices[n]. Counted rather
    than scattered as booleans: the entries past num[n] are arbitrary (a model's own lists may repeat
    a listed block there), and a False written over a True would drop it."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
    counts = torch.zeros(indices.shape, dtype=torch.int32, device=indices.device)
    return counts.scatter_add(-1, indices.long(), listed.to(torch.int32)) > 0


def touched_blocks(block_of: torch.Tensor, block_size: int) -> torch.Tensor:
    """long `[n_blocks, c]`: the model blocks holding the tokens of each tile block (tiled positions p
    with `block_of[p]`), padded by repeating the first, so that a min or max over them is unchanged."""
    n_blocks = -(-len(block_of) // block_size)
    holds = torch.zeros(n_blocks, int(block_of.max()) + 1, dtype=torch.bool, device=block_of.device)
    holds[torch.arange(len(block_of), device=block_of.device) // block_size, block_of] = True
    count = holds.sum(1)
    first = torch.argsort((~holds).to(torch.int8), dim=1, stable=True)[:, :int(count.max())]
    return torch.where(torch.arange(first.shape[1], device=first.device) < count[:, None], first, first[:, :1])


def states_over_blocks(state: torch.Tensor, q_touched: torch.Tensor, kv_touched: torch.Tensor):
    """(least, greatest) model state over the model block pairs a tile block pair (n, m) touches,
    int8 `[B or 1, H or 1, nb, nb]`. Every such pair holds a token pair of (n, m): a query of n lies
    in each of its q blocks, a key of m in each of its kv blocks."""
    B, H = state.shape[:2]
    nb, cq = q_touched.shape
    rows = state.index_select(2, q_touched.flatten()).view(B, H, nb, cq, -1)
    out = []
    for reduce in (torch.amin, torch.amax):
        r = reduce(rows, 3)
        out.append(reduce(r.index_select(3, kv_touched.flatten()).view(B, H, nb, nb, -1), 4))
    return tuple(out)


class ModelMaskedAttention:
    """A flex_attention site's runtime, built once from its SiteSpec (spec.model_mask set)."""

    def __init__(self, spec: SiteSpec):
        self.spec, self.model = spec, spec.model_mask
        self.layout = spec.layout
        self.flex_kernel = FlexKernel(spec.layout)
        self._geometry: dict[torch.device, tuple] = {}
        self._plans: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, q, k, v, scale, kv_num, kv_indices, full_num=None, full_indices=None,
                 score_buffers=(), mask_buffers=()) -> torch.Tensor:
        state = model_block_states(kv_num, kv_indices, full_num, full_indices)
        return flex(q, k, v, self.block_mask(state, tuple(mask_buffers), q.device), scale,
                    self._score_mod(tuple(score_buffers), q.device))

    def kept_blocks(self, state: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(partial, full): bool `[B or 1, H or 1, nb, nb]`, the tile blocks this call computes with and
        without the per-element mask, for the model's block states (`model_block_states`) and the plan's
        blocks of the step range in force."""
        _, q_touched, kv_touched, padded = self._geometry_on(device)
        least, greatest = states_over_blocks(state, q_touched, kv_touched)
        kept = greatest > NONE
        plan = self._plan_blocks(device)
        if plan is not None:
            kept = kept & plan
        full = kept & (least == FULL)
        if padded:   # the last key block holds the CPU's padding, which only the mask_mod excludes
            full[..., -1] = False
        return kept & ~full, full

    def block_mask(self, state: torch.Tensor, mask_buffers: tuple, device) -> BlockMask:
        """The BlockMask in tile order: the plan's blocks the model's mask reaches, the model's mask
        (at its own positions) inside them."""
        partial, full = self.kept_blocks(state, device)
        src, _, _, padded = self._geometry_on(device)
        S, bs = self.layout.seq_len, self.layout.block_size
        return BlockMask.from_kv_blocks(*kv_block_lists(partial), *kv_block_lists(full), BLOCK_SIZE=bs,
                                        mask_mod=self._mask_mod(state, src, mask_buffers, S if padded else None),
                                        seq_lengths=(len(src),) * 2 if padded else (S, S), compute_q_blocks=False)

    # ---- the model's functions at its own positions ----------------------------------------------
    def _mask_mod(self, state, src, buffers, valid_len):
        # plain locals in the closure: the compiled flex guards on what its mask_mod reads, and these
        # are the same for every site of a model (the mask function shared per code, flex_sites.py)
        q_block, kv_block, model_mask_mod = self.model.q_block, self.model.kv_block, self.model.mask_mod
        same_b, same_h = int(state.shape[0] > 1), int(state.shape[1] > 1)   # a mask for batch/head 1 broadcasts

        def mask_mod(b, h, q_idx, kv_idx):
            qi, kj = src[q_idx], src[kv_idx]
            s = state[b * same_b, h * same_h, qi // q_block, kj // kv_block]
            if model_mask_mod is None:
                keep = s > NONE
            else:
                keep = (s == FULL) | ((s == PARTIAL) & model_mask_mod(b, h, qi, kj, *buffers))
            return keep if valid_len is None else keep & (kv_idx < valid_len)

        return mask_mod

    def _score_mod(self, buffers, device):
        model_score_mod = self.model.score_mod
        if model_score_mod is None:
            return None
        src = self._geometry_on(device)[0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return model_score_mod(score, b, h, src[q_idx], src[kv_idx], *buffers)

        return score_mod

    # ---- cached: the layout's geometry and the plan's block maps (no model values) ---------------
    def _geometry_on(self, device):
        """(src int32 padded to whole blocks, q blocks touched, kv blocks touched, whether the CPU pads
        the tail) on `device`."""
        if device not in self._geometry:
            L, model = self.layout, self.model
            src = model_positions(L, model.tiled_by, device)
            padded_len = L.n_blocks * L.block_size
            src_padded = torch.cat([src, src[-1:].expand(padded_len - L.seq_len)]).to(torch.int32)
            self._geometry[device] = (src_padded, touched_blocks(src // model.q_block, L.block_size),
                                      touched_blocks(src // model.kv_block, L.block_size),
                                      self.flex_kernel._pads_tail(torch.device(device)))
        return self._geometry[device]

    def _plan_blocks(self, device):
        """The plan's blocks for the step in force, bool `[H or 1, nb, nb]`; None where all are kept."""
        spec = self.spec
        if spec.scheduled and CLOCK.current is None:
            warn_unknown_step()
        index = spec.range_index(CLOCK.current)
        if index is None:
            return None
        key = (index, device)
        if key not in self._plans:
            self._plans[key] = spec.ranges[index].blocks.to(device)
        return self._plans[key]


def make_model_masked_site(spec: SiteSpec) -> ModelMaskedAttention:
    return ModelMaskedAttention(spec)
