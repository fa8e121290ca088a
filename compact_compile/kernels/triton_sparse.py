"""Our Triton block-sparse attention: the launcher (argument checks, autotuned configurations, TMA
eligibility) and `TritonKernel`, the registry's "triton" entry. The kernel and its math are in
triton_attn.py; `block_sparse_attention` runs it on q, k, v in their dtype, `block_sparse_attention_fp8`
on e4m3 tiles (fp8.py).

With TRITON_INTERPRET=1 (set before Triton is imported) the kernel runs in Triton's interpreter
on CPU tensors (slowly: tests only).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import TokenLayout
from .fp8 import E4M3, FP8Tiles
from .registry import checked_key_valid, masked_key_blocks, sdpa_dense
from .triton_attn import _attn_fwd

# Triton reads TRITON_INTERPRET when it is imported (its own library functions are jit-decorated then),
# so the interpreter must be chosen before `import triton`: tests/conftest.py does it on CPU machines.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SIZES = (16, 32, 64, 128)
# e4m3 dots take K ≥ 32: the head dim is q·kᵀ's K, the key tile P·V's
FP8_HEAD_DIMS = tuple(d for d in HEAD_DIMS if d >= 32)
FP8_BLOCK_SIZES = tuple(b for b in BLOCK_SIZES if b >= 32)
LOG2E = 1.4426950408889634


def triton_available(device) -> bool:
    """Whether this kernel can run on `device`: a CUDA GPU of compute capability ≥ 8.0, or the CPU
    when Triton runs in its interpreter (TRITON_INTERPRET=1 before import; for tests, far too slow for use)."""
    device = torch.device(device)
    if device.type == "cuda":
        return not INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and INTERPRET


# ---- launch configuration ---------------------------------------------------------------------------
# sm90 candidates (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA loads of K/V); the autotuner keys on
# head dim, seq-len bucket, plan block, the fused extras and TMA eligibility, and Triton adds the
# argument dtypes. On an H100 at 90% sparsity TMA loads gave 2–5% (results/kernel-configs-*.json);
# automatic warp specialisation (tl.range(warp_specialize=True)) gave nothing and fails to build at 4 warps.
SM90_CONFIGS = [
    (128, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 128, 8, 3, False), (128, 128, 8, 2, False),
    (128, 64, 8, 3, True), (128, 64, 8, 3, False), (64, 64, 4, 3, False), (64, 64, 4, 4, False),
]
INTERPRET_CONFIG = dict(BLOCK_M=64, BLOCK_N=64)


def _fit(block_m: int, block_n: int, plan_block: int) -> tuple[int, int]:
    """Kernel tiles must divide the plan block (one list per program, whole sub-tiles per block)."""
    return min(block_m, plan_block), min(block_n, plan_block)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    seen, out = set(), []
    for c in configs:
        bm, bn = _fit(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], args["PLAN_BLOCK"])
        tma = c.kwargs["USE_TMA"] and args["TMA_OK"]
        key = (bm, bn, c.num_warps, c.num_stages, tma)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma), num_warps=c.num_warps,
                                     num_stages=c.num_stages))
    return out


def _tma_ok(*tensors) -> bool:
    """Whether K/V tiles can come through TMA descriptors: the Triton build has device-side
    descriptors, and every base address and row/head/batch stride is a multiple of 16 bytes."""
    return hasattr(tl, "make_tensor_descriptor") and all(
        t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:3]) for t in tensors)


def _tma_scratch(device):
    """Triton's allocator for the global memory of the descriptors the kernel builds, on `device`."""
    return lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)


_attn_fwd_tuned = None if INTERPRET else triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=m, BLOCK_N=n, USE_TMA=tma), num_warps=w, num_stages=s)
             for m, n, w, s, tma in SM90_CONFIGS],
    key=["HEAD_DIM", "S_BUCKET", "PLAN_BLOCK", "HAS_KEYMASK", "HAS_RECT", "TMA_OK", "FP8"],
    prune_configs_by={"early_config_prune": _prune},
)(_attn_fwd)

_last_launch: dict = {}


def chosen_config() -> dict:
    """The configuration of the last launch, with the compiler's resource report where available
    (registers per thread, spills, shared memory): for benchmarks and reports."""
    info = dict(_last_launch.get("config", {}))
    kernel = _last_launch.get("kernel")
    for name in ("n_regs", "n_spills"):
        if getattr(kernel, name, None) is not None:
            info[name] = getattr(kernel, name)
    shared = getattr(getattr(kernel, "metadata", None), "shared", None)
    if shared is not None:
        info["shared_bytes"] = shared
    return info


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, H, S, D] of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} not supported (supported: {HEAD_DIMS})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dim, stride 1; got strides "
                             f"{t.stride()}. Call .contiguous() on it first.")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")


def _check_fp8(tiles: FP8Tiles, block_size: int, dtype: torch.dtype):
    B, H, S, D = tiles.q.shape
    nb = triton.cdiv(S, block_size)
    want = dict(q=((B, H, S, D), E4M3), k=((B, H, S, D), E4M3), v_t=((B, H, D, None), E4M3),
                q_scale=((B, H, nb), torch.float32), k_scale=((B, H, nb), torch.float32),
                v_scale=((B, H, D), torch.float32))
    for name, (shape, dt) in want.items():
        t = getattr(tiles, name)
        if (tuple(t.shape[:3]) != shape[:3] or (shape[3:] != (None,) and tuple(t.shape) != shape)
                or t.dtype != dt or not t.is_contiguous()):
            raise ValueError(f"FP8 tiles: {name} must be contiguous {dt} {shape} (None: any); got {t.dtype} "
                             f"{tuple(t.shape)}")
    if tiles.v_t.shape[-1] < S or tiles.v_t.shape[-1] % 16:
        raise ValueError(f"FP8 tiles: v_t's rows must hold S = {S} tokens, padded to a multiple of 16")
    limit = _fp8_shape_limit(D, block_size)
    if limit:
        raise ValueError(f"{limit[0]} not supported in FP8 ({limit[1]})")
    if dtype not in DTYPES:
        raise ValueError(f"output dtype must be one of {DTYPES}, not {dtype}")


def _fp8_shape_limit(head_dim: int, block_size: int) -> tuple[str, str] | None:
    """(what, why) where the FP8 path cannot take this head dim or block size, else None."""
    if head_dim not in FP8_HEAD_DIMS:
        return f"head dim {head_dim}", f"q·kᵀ's K is the head dim, and e4m3 dots need K ≥ 32; supported: {FP8_HEAD_DIMS}"
    if block_size not in FP8_BLOCK_SIZES:
        return (f"block size {block_size}",
                f"P·V's K is the key tile, and e4m3 dots need K ≥ 32; supported: {FP8_BLOCK_SIZES}")
    return None


def block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size: int, scale: float | None = None, *,
                           key_valid=None, rectify=None, first_blocks: int = 0, out=None,
                           config: dict | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale over the listed key blocks)·v, `[B, H, S, D]` in q's dtype (contiguous
    unless `out` is given).

    kv_num_blocks `[B or 1, H or 1, nq]`, kv_indices `[B or 1, H or 1, nq, nk]` int32 (a leading
    dim may be left out): per query block of `block_size` tokens, the count and the (ascending)
    indices of its key blocks (`registry.kv_block_lists`).
    key_valid: bool `[B or 1, S]`: keys where it is False are excluded (key-padding masks).
    rectify: (R `[B, H, nq]`, Ō `[B, H, nq, D]`), anything broadcastable: write R·O + Ō instead.
    first_blocks: the last `first_blocks` query blocks are launched first (their lists are the longest:
    the text rows of joint attention); the result does not depend on it.
    config: dict(BLOCK_M=, BLOCK_N=, num_warps=, num_stages=, tma=) to bypass the autotuner; `tma`
    loads K/V through TMA descriptors where the inputs allow it (`_tma_ok`), else it is ignored.
    """
    _check_qkv(q, k, v)
    return _launch(q, k, v, None, q.dtype, kv_num_blocks, kv_indices, block_size, scale, key_valid, rectify,
                   first_blocks, out, config)


def block_sparse_attention_fp8(tiles: FP8Tiles, kv_num_blocks, kv_indices, block_size: int,
                               scale: float | None = None, *, dtype: torch.dtype, key_valid=None, rectify=None,
                               first_blocks: int = 0, out=None, config: dict | None = None) -> torch.Tensor:
    """`block_sparse_attention` of the e4m3 tiles of fp8.py (q, k per-block scales, k smoothed, v
    transposed with per-channel scales; the scales' block size is `block_size`), the output in `dtype`."""
    _check_fp8(tiles, block_size, dtype)
    return _launch(tiles.q, tiles.k, tiles.v_t, tiles, dtype, kv_num_blocks, kv_indices, block_size, scale,
                   key_valid, rectify, first_blocks, out, config)


def _launch(q, k, v, fp8: FP8Tiles | None, dtype, kv_num_blocks, kv_indices, block_size, scale, key_valid, rectify,
            first_blocks, out, config) -> torch.Tensor:
    if not triton_available(q.device):
        raise RuntimeError(f"the Triton block-sparse kernel cannot run on {q.device}: it needs a CUDA GPU "
                           f"(sm80+), or TRITON_INTERPRET=1 set before Triton is imported (CPU, tests only)")
    B, H, S, D = q.shape
    nq = triton.cdiv(S, block_size)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size {block_size} not supported {BLOCK_SIZES}")
    num, idx = kv_num_blocks, kv_indices
    num = num.reshape((1,) * (3 - num.dim()) + tuple(num.shape))
    idx = idx.reshape((1,) * (4 - idx.dim()) + tuple(idx.shape))
    if num.shape[0] not in (1, B) or num.shape[1] not in (1, H) or num.shape[2] != nq:
        raise ValueError(f"kv_num_blocks must be [B or 1, H or 1, {nq}]; got {tuple(kv_num_blocks.shape)}")
    if idx.shape[:3] != num.shape or idx.shape[3] != nq:
        raise ValueError(f"kv_indices must be [{', '.join(map(str, num.shape))}, {nq}]; got {tuple(kv_indices.shape)}")
    num = num.to(device=q.device, dtype=torch.int32)
    idx = idx.to(device=q.device, dtype=torch.int32)
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    if out is None:
        out = torch.empty(B, H, S, D, device=q.device, dtype=dtype)
    elif out.shape != q.shape or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be [B, H, S, D] in {dtype} with a contiguous last dim")
    if key_valid is not None:
        key_valid = checked_key_valid(key_valid, B, S).to(device=q.device, dtype=torch.int8).contiguous()
        blocks_masked = masked_key_blocks(key_valid, nq, block_size).to(torch.int8)
    if rectify is not None:
        r, obar = rectify
        r = r.to(device=q.device, dtype=torch.float32).expand(B, H, nq)
        obar = obar.to(device=q.device, dtype=torch.float32).expand(B, H, nq, D)
        if obar.stride(-1) != 1:
            obar = obar.contiguous()
        r_strides, c_strides = r.stride(), obar.stride()[:3]
    else:
        r = obar = None
        r_strides = c_strides = (0, 0, 0)
    scale = D ** -0.5 if scale is None else scale
    # v's token and channel strides: [B, H, S, D] as given, or (FP8) transposed [B, H, D, S16]
    stride_vs, stride_vd = (v.stride(2), 1) if fp8 is None else (1, v.stride(2))
    scales = (q, q, q) if fp8 is None else (fp8.q_scale, fp8.k_scale, fp8.v_scale)
    bstride = lambda t, d: t.stride(d) if t.shape[d] > 1 else 0  # noqa: E731  (broadcast dims: 0)
    args = (q, k, v, out, num, idx, *((num, num) if key_valid is None else (key_valid, blocks_masked)), r, obar,
            *scales, *q.stride()[:3], *k.stride()[:3], *v.stride()[:2], stride_vs, stride_vd, *out.stride()[:3],
            bstride(num, 0), bstride(num, 1), num.stride(2), bstride(idx, 0), bstride(idx, 1), idx.stride(2),
            *((0, 0) if key_valid is None else (bstride(key_valid, 0), bstride(blocks_masked, 0))),
            *r_strides, *c_strides,
            H, S, nq, scale * LOG2E, triton.next_power_of_2(S), min(first_blocks, nq))
    meta = dict(HEAD_DIM=D, PLAN_BLOCK=block_size, EVEN_S=S % block_size == 0,
                HAS_KEYMASK=key_valid is not None, HAS_RECT=rectify is not None,
                UPCAST=INTERPRET and q.dtype == torch.bfloat16, TMA_OK=_tma_ok(k, v),
                # fp32 inputs get fp32 dots, not TF32: torch's own fp32 matmul default (e4m3 dots ignore it)
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8 is not None,
                ROUND_E4M3=INTERPRET)
    if meta["TMA_OK"] and not INTERPRET:   # any allocator serves; this one is torch's caching allocator
        triton.set_allocator(_tma_scratch(q.device))
    if config is None and INTERPRET:
        config = INTERPRET_CONFIG
    if config is not None:
        bm, bn = _fit(config["BLOCK_M"], config["BLOCK_N"], block_size)
        if fp8 is not None and bn < 32:
            raise ValueError(f"config BLOCK_N {bn}: the FP8 path's P·V dot needs key tiles of ≥ 32")
        launch = dict(BLOCK_M=bm, BLOCK_N=bn, USE_TMA=bool(config.get("tma")) and meta["TMA_OK"],
                      num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
        kernel = _attn_fwd[(triton.cdiv(S, bm), B * H)](*args, **meta, **launch)
    else:
        grid = lambda m: (triton.cdiv(S, m["BLOCK_M"]), B * H)  # noqa: E731
        kernel = _attn_fwd_tuned[grid](*args, **meta)
        c = _attn_fwd_tuned.best_config
        launch = dict(**c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    _last_launch.update(config=launch, kernel=kernel)
    return out


class TritonKernel:
    """Our Triton kernel: block lists as they are, key masks and the rectified epilogue in the one
    pass; and an FP8 path (`attend_fp8`), key masks and the rectification epilogue fused in it too."""

    name = "triton"
    fuses_rectify = True

    def __init__(self, layout: TokenLayout):
        self.block_size = layout.block_size
        self.text_blocks = layout.n_blocks - layout.n_video // layout.block_size if layout.n_text else 0

    @staticmethod
    def unsupported(device, dtype, head_dim, block_size, explicit, key_mask=False) -> str:
        """Unless asked for `explicit`ly it runs on CUDA GPUs only (the CPU interpreter is for tests),
        and not on fp32, whose sm90 tiles it is not sized for."""
        device = torch.device(device)
        if not triton_available(device) or (not explicit and device.type != "cuda"):
            return f"no Triton on {device}"
        if dtype not in DTYPES or (dtype == torch.float32 and not explicit):
            return f"dtype {dtype}" + (" (its sm90 tiles are sized for fp16/bf16)" if dtype == torch.float32 else "")
        if head_dim not in HEAD_DIMS:
            return f"head dim {head_dim} (supported: {HEAD_DIMS})"
        if block_size not in BLOCK_SIZES:
            return f"block size {block_size} (supported: {BLOCK_SIZES})"
        return ""

    @staticmethod
    def fp8_unsupported(head_dim: int, block_size: int, key_mask: bool = False) -> str:
        """Why its FP8 path cannot take these shapes ("" if it can; key masks it takes)."""
        limit = _fp8_shape_limit(head_dim, block_size)
        return f"{limit[0]}: {limit[1]}" if limit else ""

    def prepare(self, lists):
        return tuple(x.to(torch.int32).contiguous() for x in lists)

    def attend(self, q, k, v, prepared, scale, key_valid=None, rectify=None) -> torch.Tensor:
        return block_sparse_attention(q, k, v, *prepared, self.block_size, scale, key_valid=key_valid,
                                      rectify=rectify, first_blocks=self.text_blocks)

    def dense(self, q, k, v, scale, key_valid=None) -> torch.Tensor:
        return sdpa_dense(q, k, v, scale, key_valid)

    def attend_fp8(self, tiles: FP8Tiles, prepared, scale, dtype, key_valid=None, rectify=None) -> torch.Tensor:
        """`attend` over e4m3 tiles (fp8.py)."""
        return block_sparse_attention_fp8(tiles, *prepared, self.block_size, scale, dtype=dtype, key_valid=key_valid,
                                          rectify=rectify, first_blocks=self.text_blocks)
