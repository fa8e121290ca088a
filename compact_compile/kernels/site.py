"""The runtime of one rewritten attention site, built from its SiteSpec by `make_site`.

Per call: the step range in force (from the step clock; a dense step runs the kernel's dense path),
that range's static block lists (prepared by the kernel once per device), the online choice and the
rectification estimate where the spec asks for them (rectified.py), then the kernel. The rewritten
graph calls it through `torch.ops.compact.attention` (the merged output) or, where the spec merges
R·O + Ō in the graph, `torch.ops.compact.attention_parts` (O, R, Ō).

A site whose spec is fp8 is called through `torch.ops.compact.attention_fp8` with e4m3 tiles
(fp8.py) instead: `fp8(tiles, …)`, on a kernel with an FP8 path; its dense (warm-up) steps run the kernel's
dense attention on q, k, v in their dtype. A site that is dense at every step is not made fp8.

Wrappers (the `observer` option: calibration, the fidelity harness, tests) get the site and return
anything with the same two calls, `__call__` and `parts` (and `fp8` for fp8 sites); the rewrite reads
what the op takes from the spec, never from the object.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..layout import tile_index
from ..schedule import CLOCK, warn_unknown_step
from ..spec import SiteSpec
from .fp8 import FP8Tiles, dequantized_keys
from .rectified import choose_triton, estimate, merge, on_triton, pooled, triton_shapes, valid_counts
from .registry import kernel_class, kv_block_lists


class SiteKernel(Protocol):
    """What the ops call; `pools` are (q̄, δq, k̄, δk, v̄) when spec.pooled, `key_valid` bool `[B, S]`
    in tile order when spec.key_mask."""

    def __call__(self, q, k, v, scale, pools=None, key_valid=None) -> torch.Tensor: ...

    def parts(self, q, k, v, scale, pools, key_valid=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def fp8(self, tiles: FP8Tiles, scale, pools, key_valid, dtype: torch.dtype, unquantized) -> torch.Tensor: ...


class SiteAttention:
    def __init__(self, spec: SiteSpec):
        self.spec = spec
        self.kernel = kernel_class(spec.kernel)(spec.layout)
        L = spec.layout
        nb, bs = L.n_blocks, L.block_size
        self.video_count = (torch.arange(nb * bs) < L.n_video).view(nb, bs).sum(1).float()
        self.text_block = torch.arange(L.n_video, L.seq_len) // bs
        self.k_min = spec.selection.min_blocks(nb) if spec.selection else 0
        self._static: dict[tuple[int, torch.device], tuple] = {}
        self._counts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- calls ----------------------------------------------------------------------------------
    def __call__(self, q, k, v, scale=None, pools=None, key_valid=None) -> torch.Tensor:
        o, r, o_bar = self._attend(q, k, v, scale, pools, key_valid, fuse=True)
        return o if r is None else merge(o, r, o_bar, self.spec.layout.block_size)

    def parts(self, q, k, v, scale, pools, key_valid=None):
        """(O, R, Ō), R and Ō per query block: the output is R·O + Ō. A call that needs no
        rectification (a dense step) gives R = 1, Ō = 0."""
        o, r, o_bar = self._attend(q, k, v, scale, pools, key_valid, fuse=False)
        if r is None:
            B, H, nq = pools[0].shape[:3]
            r, o_bar = o.new_ones(B, H, nq, dtype=torch.float32), o.new_zeros(B, H, nq, o.shape[-1], dtype=torch.float32)
        return o, r, o_bar

    def fp8(self, tiles: FP8Tiles, scale, pools, key_valid, dtype: torch.dtype, unquantized) -> torch.Tensor:
        """`__call__` over the e4m3 tiles of q, k, v (spec.fp8), rectification fused in the kernel
        where it fuses it (Triton), else merged here;
        the output in `dtype`, in tile order. A dense step runs the kernel's dense attention on
        `unquantized` (q, k, v in the model's order, in their dtype) instead: the warm-up is there for
        quality, and a bf16 dense kernel beats FP8 over every block (Wan2.1-14B's warm-up step with
        FP8 over every block: 12,053 ms, against 11,280 for Inductor dense)."""
        o, r, o_bar = self._attend(tiles.q, tiles.k, None, scale, pools, key_valid, fuse=True,
                                   fp8=(tiles, dtype, unquantized))
        return o if r is None else merge(o, r, o_bar, self.spec.layout.block_size)

    def estimate(self, q, k, v, scale=None, pools=None, key_valid=None):
        """(keep bool `[B, H, nq, nk]`, R, Ō) of the current step's range for these inputs (R, Ō None
        without rectification; keep all True in a dense step): for benchmarks and tests."""
        index = self.spec.range_index(CLOCK.current)
        B, H, nb = q.shape[0], q.shape[1], self.spec.layout.n_blocks
        if index is None:
            return torch.ones(B, H, nb, nb, dtype=torch.bool, device=q.device), None, None
        if not self.spec.pooled:
            return self._static_data(index, q.device)[0].expand(B, H, nb, nb), None, None
        keep, _, r, o_bar = self._choose(index, q, k, v, scale, pools, key_valid)
        return keep.bool().expand(B, H, nb, nb), r, o_bar

    def text_kept(self, index: int = 0) -> bool:
        """Whether range `index` keeps every block holding text (the Triton estimate needs it)."""
        return self._static_data(index, torch.device("cpu"))[3]

    # ---- work -----------------------------------------------------------------------------------
    def _attend(self, q, k, v, scale, pools, key_valid, fuse: bool, fp8=None):
        """(O, R, Ō), R and Ō None where nothing is left to merge. `fp8`: (tiles, output dtype, the
        unquantized q, k, v in model order), q and k then being the tiles' e4m3 q and k."""
        spec = self.spec
        if spec.scheduled and CLOCK.current is None:
            warn_unknown_step()
        index = spec.range_index(CLOCK.current)
        if fp8 is None:
            def attend(prepared, rectify=None):
                return self.kernel.attend(q, k, v, prepared, scale, key_valid, rectify=rectify)
        else:
            def attend(prepared, rectify=None):
                return self.kernel.attend_fp8(fp8[0], prepared, scale, fp8[1], key_valid, rectify=rectify)
        if index is None:
            if fp8 is None:
                return self.kernel.dense(q, k, v, scale, key_valid), None, None
            q, k, v = (x.index_select(-2, tile_index(spec.layout, x.device)) for x in fp8[2])   # as key_valid
            return self.kernel.dense(q, k, v, scale, key_valid).to(fp8[1]), None, None
        prepared = self._static_data(index, q.device)[2]
        if not spec.pooled:
            return attend(prepared), None, None
        keep, lists, r, o_bar = self._choose(index, q, k, v, scale, pools, key_valid, fp8)
        if spec.selection is not None:
            prepared = self.kernel.prepare(lists if lists is not None else kv_block_lists(keep.bool()))
        fused = fuse and r is not None and spec.rectify == "block" and self.kernel.fuses_rectify
        o = attend(prepared, rectify=(r, o_bar) if fused else None)
        return (o, None, None) if fused else (o, r, o_bar)

    def _static_data(self, index: int, device: torch.device):
        """(static blocks bool, as int8, the kernel's prepared lists, whether every block holding text
        is kept) of range `index` on `device`."""
        key = (index, device)
        if key not in self._static:
            blocks = self.spec.ranges[index].blocks
            text_kept = bool(blocks[..., self.text_block.unique()].all())
            blocks = blocks.to(device)
            self._static[key] = (blocks, blocks.to(torch.int8), self.kernel.prepare(kv_block_lists(blocks)), text_kept)
        return self._static[key]

    def _block_counts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(video keys per key block, each text key's block) on `device`, copied there once: a copy
        from host memory waits for the GPU to drain (copied per call, they were two stream
        synchronizations per site and call in HunyuanVideo's FP8 forward, with 184 ms of idle GPU)."""
        if device not in self._counts:
            self._counts[device] = (self.video_count.to(device), self.text_block.to(device))
        return self._counts[device]

    def _choose(self, index, q, k, v, scale, pools, key_valid, fp8=None):
        """(keep, its block lists `[B, H, …]` or None, R, Ō) for this call's range. With `fp8` (the
        tiles, the output dtype, the unquantized q, k, v in model order; q, k then the e4m3 tiles, v
        None) the pools come from the reorder. The Triton choice and estimate read the text keys one by
        one from rows n_video… of k: where the text follows the video (HunyuanVideo, Mochi), the model's
        own k has them there, unquantized, as a bf16 site's tiled k does (the kernels' layout checked on
        it: its rows contiguous); where some text precedes the video, the compiled estimate reads them
        dequantized from the tiles."""
        tiles = None if fp8 is None else fp8[0]
        spec, L = self.spec, self.spec.layout
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        static, static_i8, _, text_kept = self._static_data(index, q.device)
        dynamic, rectify = spec.selection is not None, spec.rectify is not None
        p_remain = spec.selection.p_remain if dynamic else 0.0
        pools = pooled(q, k, v, L.n_video, L.block_size, key_valid) if pools is None else pools
        text_rows = k if tiles is None else fp8[2][1] if L.n_before == 0 and triton_shapes(*fp8[2]) else None
        if text_rows is not None and on_triton(
                q, k, k if tiles is not None else v, rows=spec.rectify == "rows", rectify=rectify, dynamic=dynamic,
                text_kept=text_kept, n_blocks=L.n_blocks, explicit_triton=spec.kernel == "triton"):
            return choose_triton(pools, text_rows, static_i8, L.n_video, scale, L.block_size, dynamic=dynamic,
                                 rectify=rectify, p_remain=p_remain, k_min=self.k_min, key_valid=key_valid)
        video_count, text_block = self._block_counts(q.device)
        counts = valid_counts(video_count, L.n_video, L.block_size, key_valid)
        text_valid = None if key_valid is None else key_valid[:, L.n_video:].bool()
        k_text = k[:, :, L.n_video:] if tiles is None else dequantized_keys(tiles, L.n_video, L.block_size)
        keep, r, o_bar = estimate(pools, q if spec.rectify == "rows" else None, k_text, static, counts,
                                  text_block, scale, L.block_size, dynamic, rectify,
                                  spec.rectify == "rows", p_remain, self.k_min, text_valid)
        return keep, None, r, o_bar


def make_site(spec: SiteSpec) -> SiteAttention:
    return SiteAttention(spec)

