"""Block-sparse attention on FlashAttention-4 (CuTe DSL, `pip install compact_compile[fa4]`).

FA4's Hopper forward is FlashAttention-3's design (a producer warp, two MMA warp groups in
ping-pong, softmax overlapped with the MMAs): what Triton cannot express on sm90. On the same block
lists it ran 1.47× faster than our Triton kernel on an H200 (../shared/research/platform.md §9).

FA4 takes two lists of key blocks per query block (flash_attn/cute/block_sparse_utils.py,
`consume_block_sparse_loads`): "mask" blocks, where it calls a CuTe `mask_mod` on every score, then
"full" blocks, where it does not. Without a key mask all our blocks are full: no per-element cost.
With a key-padding mask (`key_valid`: HunyuanVideo's and Mochi's prompt padding) each call splits
the lists (`split_lists`): a block holding a key that key_valid excludes becomes a mask block, whose
`mask_mod` reads key_valid at (batch, key); a block whose keys it excludes all leaves the lists (every
score of it would be −inf: it adds nothing, and a row left with no block gets 0 as before); the others
stay full. Padding touches the few text blocks, so the video blocks, nearly all the work, pay nothing
for the mask, and blocks of padding alone cost nothing.

FA4 rules that shape the lists (flash_attn 4.0.0b36):
- it walks each list backwards and applies the sequence-length mask only to the first block it
  processes of each list (block_sparse_utils.py:431–616), so a partial last key block must be the
  LAST entry of whichever list holds it: our lists are ascending (`kv_block_lists`) and the split
  keeps their order, so it is. Keys past S are not "masked keys": they leave a block full;
- on sm90 the key block must equal its key tile, 128 for head dims ≤ 128; 64-token plans take
  another kernel;
- a query row that sees no valid key gets 0, as in our Triton kernel and the float64 reference:
  FA4's softmax takes a −inf row max as 0 and a zero row sum as 1 (softmax.py:224, 277), and an
  empty list pair writes zeros (flash_fwd_sm90.py:1231).
FP8 (`attend_fp8`, fa4_fp8_sm90.py): e4m3 tiles on FA4's Hopper forward, head dim 128, 128-token
blocks; a key-padding mask splits the lists and runs the same mask_mod, its table ahead of the scales.
Not here: a rectification epilogue (R·O + Ō is merged in the graph; for FP8 in the site's call) and
sm100 (its block sparsity needs 256-token query blocks; plans use 128).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..layout import TokenLayout
from .fp8 import FP8Tiles
from .registry import BlockLists, batched, checked_key_valid, masked_key_blocks, sdpa_dense

BLOCK = 128
HEAD_DIMS = (64, 96, 128)
FP8_HEAD_DIM = 128
# fa4_fp8_sm90 overrides methods of this release's Hopper kernel (the extra pins it); under another, FA4's
# own softmax could run without the FP8 scales: that path is then refused, not run
FP8_BUILT_ON = "4.0.0b36"


@functools.cache
def _fa4():
    """(_flash_attn_fwd, BlockSparseTensorsTorch), or the ImportError message."""
    try:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from flash_attn.cute.interface import _flash_attn_fwd
    except Exception as e:  # noqa: BLE001  (a broken install raises more than ImportError)
        return f"flash_attn.cute not importable ({type(e).__name__}: {str(e)[:120]})"
    return _flash_attn_fwd, BlockSparseTensorsTorch


@functools.cache
def _fa4_version() -> str | None:
    """The installed flash-attn-4's version (read once: a metadata lookup scans sys.path)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-attn-4")
    except PackageNotFoundError:
        return None


def fa4_importable() -> bool:
    return not isinstance(_fa4(), str)


@functools.cache
def _key_valid_mask_mod():
    """The CuTe mask_mod of key-padding masks: score (b, ·, ·, kv) is kept iff aux_tensors[0][b, kv]
    != 0. Built once per process: FA4 keys its compile cache on a hash of the callable's source
    (interface.py:1111), which it stores on the function object (utils.py:151–186); a new function
    per call would be read and hashed again on every call.

    FA4 calls it as mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors), each index a
    one-element TensorSSA (mask.py:23–50), and keeps the score where it returns True. Only mask
    blocks call it (block_sparse_utils.py:431–616)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def key_valid_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        valid = utils.scalar_to_ssa(aux_tensors[0][batch[0], kv_idx[0]], cutlass.Int32)
        return valid != utils.scalar_to_ssa(0, cutlass.Int32)

    return key_valid_mask


# ---- the per-call split (plain torch: runs and is tested on the CPU) ------------------------------

def _packed(keep: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, the entries of `idx` where `keep`, packed to the front in their order), int32. The rest
    of each row is 0: FA4 reads only the first `count` entries."""
    width = idx.shape[-1]
    slot = torch.where(keep, keep.cumsum(-1) - 1, width)     # dropped entries go to a spare column
    out = idx.new_zeros(*idx.shape[:-1], width + 1).scatter_(-1, slot, idx)
    return keep.sum(-1, dtype=torch.int32), out[..., :width].contiguous()


def key_block_states(key_valid: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """int8 `[B or 1, n_blocks]` of a key-padding mask (`[B or 1, S]`, nonzero = keep): 0 where key
    block n keeps every key, 1 where it excludes some (`masked_key_blocks`), 2 where it keeps none.
    Positions past S in a partial last block are no keys."""
    pad = n_blocks * block_size - key_valid.shape[-1]
    kept_none = ~F.pad(key_valid != 0, (0, pad)).reshape(-1, n_blocks, block_size).any(-1)
    return masked_key_blocks(key_valid, n_blocks, block_size).to(torch.int8) + kept_none.to(torch.int8)


def split_lists(lists: BlockLists, states: torch.Tensor):
    """FA4's (mask_cnt, mask_idx, full_cnt, full_idx) from our block lists (`kv_block_lists`) and the
    per-call `states` (`[B or 1, nk]`, `key_block_states`): each listed block of state 1 (some keys
    excluded) goes to the mask list, of state 0 to the full list, of state 2 (none kept) to neither,
    both lists in the order of ours (ascending). Counts `[B', H or 1, nq]`, indices
    `[B', H or 1, nq, width]`, int32, B' the batch of the lists or of the states, whichever is not 1."""
    num, idx = batched(lists)
    B = max(num.shape[0], states.shape[0])
    _, H, nq, width = idx.shape
    listed = torch.arange(width, device=idx.device) < num[..., None]
    idx = torch.where(listed, idx, 0).expand(B, H, nq, width)   # entries past the count: any block
    state = states.to(idx.device, torch.int8)[:, None, None, :].expand(B, H, nq, states.shape[-1]).gather(
        -1, idx.long())
    return (*_packed(listed & (state == 1), idx), *_packed(listed & (state == 0), idx))


@triton.jit
def _split_lists_kernel(num, idx, states, mask_cnt, mask_idx, full_cnt, full_idx, H, NQ, WIDTH,
                        num_sb, num_sh, idx_sb, idx_sh, idx_sq, states_sb, BLOCK_W: tl.constexpr):
    """`split_lists` on the GPU, one program per (batch, head, query block): the torch version is
    about 15 launches over [B, H, nq, width] tensors (0.5 ms a call at HunyuanVideo's size)."""
    row = tl.program_id(0)
    q, h, b = row % NQ, (row // NQ) % H, row // (NQ * H)
    n = tl.load(num + b * num_sb + h * num_sh + q)
    cols = tl.arange(0, BLOCK_W)
    listed = cols < n
    block = tl.load(idx + b * idx_sb + h * idx_sh + q * idx_sq + cols, mask=listed, other=0)
    state = tl.load(states + b * states_sb + block, mask=listed, other=0)
    to_mask, to_full = listed & (state == 1), listed & (state == 0)
    # a list's k-th kept entry goes to slot k: the running count of kept entries before it
    tl.store(mask_idx + row * WIDTH + tl.cumsum(to_mask.to(tl.int32), 0) - 1, block, mask=to_mask)
    tl.store(full_idx + row * WIDTH + tl.cumsum(to_full.to(tl.int32), 0) - 1, block, mask=to_full)
    tl.store(mask_cnt + row, tl.sum(to_mask.to(tl.int32), 0))
    tl.store(full_cnt + row, tl.sum(to_full.to(tl.int32), 0))


def split_lists_triton(lists: BlockLists, states: torch.Tensor):
    """`split_lists` in one launch, the same outputs (entries past each count 0)."""
    num, idx = batched(lists)
    B = max(num.shape[0], states.shape[0])
    _, H, nq, width = idx.shape
    counts = [torch.zeros(B, H, nq, dtype=torch.int32, device=idx.device) for _ in range(2)]
    lists_out = [torch.zeros(B, H, nq, width, dtype=torch.int32, device=idx.device) for _ in range(2)]
    num, idx = num.to(torch.int32), idx.to(torch.int32)
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    states = states.to(idx.device, torch.int8).contiguous()
    stride = lambda t, d: t.stride(d) if t.shape[d] > 1 else 0  # noqa: E731  (size-1 dims broadcast)
    _split_lists_kernel[(B * H * nq,)](
        num, idx, states, counts[0], lists_out[0], counts[1], lists_out[1], H, nq, width,
        stride(num, 0), stride(num, 1), stride(idx, 0), stride(idx, 1), idx.stride(2), stride(states, 0),
        BLOCK_W=triton.next_power_of_2(width))
    return counts[0], lists_out[0], counts[1], lists_out[1]


# ---- the kernel -------------------------------------------------------------------------------------

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
        if major == 10:
            return "sm100 needs 256-token query blocks for block sparsity; plans use 128"
        got = _fa4()   # key masks (key_mask) run through the mask_mod: nothing more to check
        return got if isinstance(got, str) else ""

    def prepare(self, lists: BlockLists):
        """FA4's block-sparse tensors: counts `[B|1, H|1, nq]`, indices `[B|1, H|1, nq, width]`
        int32, every listed block "full"; the "mask" lists are empty (a key mask splits them per call)."""
        _, BlockSparseTensorsTorch = _fa4()
        num, idx = (x.to(torch.int32).contiguous() for x in batched(lists))
        empty = torch.zeros_like(num)
        return BlockSparseTensorsTorch(empty, torch.zeros_like(idx[..., :1]), num, idx,
                                       block_size=(self.block_size, self.block_size))

    def attend(self, q, k, v, prepared, scale, key_valid=None, rectify=None) -> torch.Tensor:
        if rectify is not None:
            raise ValueError("the FA4 kernel takes no rectification epilogue (R·O + Ō is merged in the graph)")
        if key_valid is None:
            return _run(q, k, v, scale, block_sparse_tensors=prepared)
        lists, table = self._key_masked(prepared, key_valid, q.shape[0], q.shape[-2], q.device)
        return _run(q, k, v, scale, block_sparse_tensors=lists, mask_mod=_key_valid_mask_mod(), aux_tensors=[table])

    def _key_masked(self, prepared, key_valid, B: int, S: int, device):
        """(the lists split for a key-padding mask, the mask_mod's table): key_valid as int32, padded
        with zeros to whole blocks, so that every key index FA4 asks about is in bounds (it also wraps
        indices past S, mask.py:234–258, but need not)."""
        bs = self.block_size
        checked_key_valid(key_valid, B, S)
        nk = -(-S // bs)
        valid = key_valid.to(device, torch.bool).expand(B, S)
        _, BlockSparseTensorsTorch = _fa4()
        split = split_lists_triton((prepared.full_block_cnt, prepared.full_block_idx), key_block_states(valid, nk, bs))
        table = F.pad(valid.to(torch.int32), (0, nk * bs - S)).contiguous()   # row-major, as compiled
        return BlockSparseTensorsTorch(*split, block_size=(bs, bs)), table

    def dense(self, q, k, v, scale, key_valid=None) -> torch.Tensor:
        if key_valid is not None:
            return sdpa_dense(q, k, v, scale, key_valid)
        return _run(q, k, v, scale)

    @staticmethod
    def fp8_unsupported(head_dim: int, block_size: int, key_mask: bool = False) -> str:
        """Why its FP8 path cannot take these inputs ("" if it can; key masks it takes)."""
        if head_dim != FP8_HEAD_DIM:
            return f"head dim {head_dim} (its FP8 path: {FP8_HEAD_DIM})"
        version = _fa4_version()
        if version != FP8_BUILT_ON:
            return f"flash-attn-4 {version} installed; its FP8 path is built on {FP8_BUILT_ON}'s Hopper kernel"
        return ""

    def attend_fp8(self, tiles: FP8Tiles, prepared, scale, dtype, key_valid=None, rectify=None) -> torch.Tensor:
        """`attend` over e4m3 tiles (fp8.py), the output in dtype."""
        if rectify is not None:
            raise ValueError("the FA4 kernel's FP8 path takes no rectification epilogue (the site merges R·O + Ō)")
        why = _fp8_refusal(tiles.q.device, dtype, tiles.q.shape[-1], self.block_size)
        if why:
            raise ValueError(f"the FA4 kernel's FP8 path cannot take these inputs: {why}")
        if key_valid is None:
            return _run_fp8(tiles, prepared, scale, dtype)
        B, _, S, _ = tiles.q.shape
        lists, table = self._key_masked(prepared, key_valid, B, S, tiles.q.device)
        return _run_fp8(tiles, lists, scale, dtype, key_table=table)


@functools.cache
def _fp8_refusal(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> str:
    """FA4Kernel's two checks for a direct `attend_fp8` call, once per input kind, not per call (the
    planner has already made them for every rewritten site)."""
    return (FA4Kernel.unsupported(device, dtype, head_dim, block_size, True)
            or FA4Kernel.fp8_unsupported(head_dim, block_size))


_FP8_COMPILED: dict[tuple, object] = {}


def _run_fp8(tiles: FP8Tiles, lists, scale, dtype, key_table=None, num_stages: int = 3,
             p_in_registers: bool = False) -> torch.Tensor:
    """fa4_fp8_sm90's kernel on the tiles: q, k as (B, S, H, D) views, vᵀ `[B, H, D, S16]` as a
    (B, S, H, D) view whose key mode is the contiguous one, the scales (after `key_table`, the key mask's,
    where given) as FA4's aux tensors; the output in dtype, (B, H, S, D). Shapes and strides are dynamic
    but zero strides are compiled in, so it is built once per output dtype, `num_stages` (K/V tiles in
    flight; benchmarks vary it), key mask or none, P's place (`p_in_registers`, which needs vᵀ's keys in
    MMA_KEY_ORDER: `in_mma_key_order`; benchmarks and tests vary it) and pattern of lists broadcast over
    batch or heads, as FA4's interface keys it."""
    from flash_attn.cute.block_sparsity import to_cute_block_sparse_tensors
    from flash_attn.cute.cute_dsl_utils import to_cute_tensor
    from flash_attn.cute.interface import torch2cute_dtype_map
    from flash_attn.cute.utils import AuxData

    B, H, S, D = tiles.q.shape
    _, BlockSparseTensorsTorch = _fa4()
    lists = BlockSparseTensorsTorch(*(t.expand(B, H, *t.shape[2:]) for t in (
        lists.mask_block_cnt, lists.mask_block_idx, lists.full_block_cnt, lists.full_block_idx)))
    q, k = tiles.q.transpose(1, 2), tiles.k.transpose(1, 2)
    # in MMA_KEY_ORDER, the last group's slots past S hold real keys (and slots before it padding): all
    # S16 rows are read then; the padding's V is 0 and its P is masked
    v = tiles.v_t.permute(0, 3, 1, 2)[:, :tiles.v_t.shape[-1] if p_in_registers else S]
    out = torch.empty(B, H, S, D, dtype=dtype, device=q.device)
    aux = [tiles.q_scale, tiles.k_scale, tiles.v_scale] if key_table is None else \
        [key_table, tiles.q_scale, tiles.k_scale, tiles.v_scale]
    key = (dtype, num_stages, key_table is not None, p_in_registers,
           tuple(tuple(st == 0 for st in t.stride()) for t in lists[:4]))
    if key not in _FP8_COMPILED:
        def e4m3(t, leading_dim):
            t = to_cute_tensor(t.view(torch.uint8), leading_dim=leading_dim)
            t.element_type = torch2cute_dtype_map[torch.float8_e4m3fn]
            return t
        _FP8_COMPILED[key] = compile_fp8_kernel(
            torch2cute_dtype_map[dtype], num_stages, key_table is not None, e4m3(q, 3), e4m3(k, 3), e4m3(v, 1),
            to_cute_tensor(out.transpose(1, 2)), to_cute_block_sparse_tensors(lists),
            [to_cute_tensor(t, assumed_align=4, leading_dim=t.dim() - 1) for t in aux], p_in_registers)
    _FP8_COMPILED[key](q.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8), out.transpose(1, 2), None,
                         D ** -0.5 if scale is None else scale, *[None] * 8, tuple(lists[:4]) + (None,) * 4,
                         AuxData(aux, None), None, None)
    return out


def compile_fp8_kernel(out_dtype, num_stages: int, key_masked: bool, q, k, v, out, lists, aux,
                       p_in_registers: bool = False):
    """fa4_fp8_sm90's kernel compiled for these CuTe tensors, as `_run_fp8` calls it: real ones there,
    fake ones in benchmarks/sass_fa4_fp8.py (the same build for sm_90a on a machine without a GPU)."""
    import cutlass.cute as cute
    from flash_attn.cute.utils import AuxData

    from .fa4_fp8_sm90 import fp8_block_sparse_sm90

    kernel = fp8_block_sparse_sm90()(out_dtype, num_stages, _key_valid_mask_mod() if key_masked else None,
                                     p_in_registers)
    return cute.compile(kernel, q, k, v, out, None, 1.0, *[None] * 8, lists, AuxData(aux, None), None, None,
                        cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True), options="--enable-tvm-ffi")


def in_mma_key_order(tiles: FP8Tiles) -> FP8Tiles:
    """The tiles with vᵀ's keys reordered within each aligned group of 16 as `p_in_registers` reads
    them (fa4_fp8_sm90.MMA_KEY_ORDER); vᵀ's rows are padded to a multiple of 16 (fp8.py), so every
    group is whole."""
    from .fa4_fp8_sm90 import MMA_KEY_ORDER

    order = torch.tensor(MMA_KEY_ORDER, device=tiles.v_t.device)
    v_t = tiles.v_t.view(torch.uint8).unflatten(-1, (-1, 16)).index_select(-1, order).flatten(-2)
    return tiles._replace(v_t=v_t.view(tiles.v_t.dtype))


def _run(q, k, v, scale, **sparse) -> torch.Tensor:
    """FA4 works in (B, S, H, D): it gets views of our (B, H, S, D) tensors, the output included, so
    nothing is copied."""
    flash_fwd, _ = _fa4()
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    flash_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
              out=out.transpose(1, 2), **sparse)
    return out
