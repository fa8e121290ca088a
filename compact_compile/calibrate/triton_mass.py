"""Triton kernels for the block attention mass (stats.py) on the GPU, O(blocks²) memory.

Given the row log-sum-exp lse_i = ln Σ_j exp(s_ij) with s_ij = scale·q_i·k_j (from the dense flash
call that computes the output anyway, or from `row_lse` below), the probabilities are recomputed
tile by tile, never stored:

    p_ij = exp(s_ij − lse_i) = 2^(q_i·k_j·c − lse_i·log2 e),   c = scale·log2 e      (base 2: exp2)
    out[b, h, n, m] += Σ_{i ∈ tile} Σ_{j ∈ m} p_ij                                  (per key block m)

One program owns BLOCK_M query rows of one (batch, head) and walks all key blocks in order; for key
block m it sums its BLOCK_N-wide sub-tiles into a per-row vector, then reduces that to one number
and adds it to the (query block, key block) cell. BLOCK_M divides the plan block, so a cell gets
PLAN_BLOCK / BLOCK_M atomic adds (one per program, per key block). The work per tile is the QKᵀ
product and one exp2 per score — FlashAttention's forward without the PV product and the rescaling.

`row_lse` is pass 1 where no flash lse is available (fp32 inputs): the online max/sum of
FlashAttention over the key tiles, m' = max(m, max_j s_ij·c), l' = l·2^(m − m') + Σ_j 2^(s_ij·c − m'),
lse = (m + log2 l)·ln 2.

Keys ≥ S (partial last block) and keys a key-padding mask excludes are masked out of the sums;
query rows ≥ S load lse = +inf, so their p is 2^(−inf) = 0. fp32 inputs take 3×TF32 dots (fp32's
accuracy; Triton's default on the GPU, one TF32 dot, is off by ~1e-3). With TRITON_INTERPRET=1 the
kernels run on CPU tensors (tests): there bf16 `tl.dot` is wrong (triton-lang/triton#11584), so bf16
tiles are upcast to fp32 for the dots.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..kernels.estimate_triton import dot_precision

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)  # best of a sweep on H200
# fp32 inputs: 3×TF32 dots keep split copies of both tiles, 320 KiB of shared memory at 128×128 and
# head dim 128 (sm90 has 227 KiB; compiled for sm90 with triton 3.7); 64×64 tiles take 160–192 KiB
FP32_TILES = dict(BLOCK_M=64, BLOCK_N=64)
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


def supported(q: torch.Tensor) -> bool:
    """Shapes and devices these kernels take: CUDA sm80+ (or the interpreter on CPU), head dim in
    HEAD_DIMS, fp16/bf16/fp32."""
    if q.shape[-1] not in HEAD_DIMS or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.is_cuda:
        return not INTERPRET and torch.cuda.get_device_capability(q.device)[0] >= 8
    return INTERPRET and q.device.type == "cpu"


@triton.jit
def _query_tile(Q, stride_qb, stride_qh, stride_qs, H, S,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """This program's (batch, head, query rows, row mask, q tile): rows pid_m·BLOCK_M … of head pid_bh."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_m = offs_m < S
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=valid_m[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return b, h, offs_m, valid_m, q


@triton.jit
def _block_mass_kernel(Q, K, LSE, OUT, KV_VALID,
                       stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                       stride_lb, stride_lh, stride_ob, stride_oh, stride_oq, stride_mb,
                       H, S, NK, qk_scale,
                       HEAD_DIM: tl.constexpr, PLAN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, HAS_KEYMASK: tl.constexpr,
                       PRECISION: tl.constexpr):
    b, h, offs_m, valid_m, q = _query_tile(Q, stride_qb, stride_qh, stride_qs, H, S, HEAD_DIM, BLOCK_M, UPCAST)
    pid_m = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # lse in base 2; rows past S get +inf so that every p of theirs is 2^(−inf) = 0
    lse2 = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m, mask=valid_m, other=float("inf")) * 1.4426950408889634
    k_base = K + b * stride_kb + h * stride_kh
    out_ptr = OUT + b * stride_ob + h * stride_oh + ((pid_m * BLOCK_M) // PLAN_BLOCK) * stride_oq
    SUB: tl.constexpr = PLAN_BLOCK // BLOCK_N
    for kb in range(0, NK):
        acc = tl.zeros([BLOCK_M], tl.float32)           # Σ_{j ∈ kb} p_ij per row i
        for sub in tl.static_range(SUB):
            pos = kb * PLAN_BLOCK + sub * BLOCK_N + offs_n
            valid_n = pos < S
            if HAS_KEYMASK:   # key-padding: excluded keys carry no mass
                valid_n = valid_n & (tl.load(KV_VALID + b * stride_mb + pos, mask=pos < S, other=0) != 0)
            k = tl.load(k_base + pos[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=valid_n[:, None],
                        other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)   # q_i·k_j, fp32
            p = tl.math.exp2(s * qk_scale - lse2[:, None])   # p_ij = 2^(q·k·c − lse·log2 e)
            p = tl.where(valid_n[None, :], p, 0.0)
            acc += tl.sum(p, 1)
        tl.atomic_add(out_ptr + kb, tl.sum(acc, 0))     # Σ_{i ∈ tile} Σ_{j ∈ kb} p_ij


@triton.jit
def _row_lse_kernel(Q, K, LSE, KV_VALID,
                    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_lb, stride_lh, stride_mb,
                    H, S, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                    HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr):
    b, h, offs_m, valid_m, q = _query_tile(Q, stride_qb, stride_qh, stride_qs, H, S, HEAD_DIM, BLOCK_M, UPCAST)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b * stride_kb + h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, S, BLOCK_N):   # the first tile has a key < S, so m_i is finite after it
        pos = n0 + offs_n
        valid_n = pos < S
        if HAS_KEYMASK:
            valid_n = valid_n & (tl.load(KV_VALID + b * stride_mb + pos, mask=pos < S, other=0) != 0)
        k = tl.load(k_base + pos[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=valid_n[:, None],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                                          # m'
        if HAS_KEYMASK:   # no valid key yet: exponents against 0 (2^(−inf) = 0), not −inf − −inf = NaN
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)  # l'
        m_i = m_new
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453                                # natural log
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=valid_m)


def _check(q, k):
    if q.dim() != 4 or k.shape != q.shape or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q, k must be [B, H, S, D] of one shape, dtype and device; got {tuple(q.shape)} "
                         f"{q.dtype}, {tuple(k.shape)} {k.dtype}")
    if not supported(q):
        raise RuntimeError(f"block-mass Triton kernel: unsupported input (device {q.device}, dtype {q.dtype}, "
                           f"head dim {q.shape[-1]}); needs CUDA sm80+ or TRITON_INTERPRET=1, head dim in {HEAD_DIMS}")
    return q if q.stride(-1) == 1 else q.contiguous(), k if k.stride(-1) == 1 else k.contiguous()


def _launch_config(config: dict | None, dtype: torch.dtype, plan_block: int | None = None) -> dict:
    fp32 = {} if INTERPRET or dtype != torch.float32 else FP32_TILES
    c = {**(INTERPRET_CONFIG if INTERPRET else DEFAULT_CONFIG), **fp32, **(config or {})}
    if plan_block is not None:  # kernel tiles must divide the plan block (cells own whole sub-tiles)
        c["BLOCK_M"], c["BLOCK_N"] = min(c["BLOCK_M"], plan_block), min(c["BLOCK_N"], plan_block)
    return c


def _key_mask(key_valid, q) -> tuple[torch.Tensor, int]:
    """(the int8 key mask `[B or 1, S]` and its batch stride) for the kernels; a dummy when None."""
    if key_valid is None:
        return q, 0
    m = key_valid.to(device=q.device, dtype=torch.int8).contiguous()
    return m, (m.stride(0) if m.shape[0] > 1 else 0)


def row_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, config: dict | None = None,
            key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """ln Σ_j exp(scale·q_i·k_j) over the keys `key_valid` (bool `[B or 1, S]`) keeps, `[B, H, S]` fp32."""
    q, k = _check(q, k)
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    c = _launch_config(config, q.dtype)
    mask, mask_stride = _key_mask(key_valid, q)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    _row_lse_kernel[(triton.cdiv(S, c["BLOCK_M"]), B * H)](
        q, k, lse, mask, *q.stride()[:3], *k.stride()[:3], *lse.stride()[:2], mask_stride, H, S, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        PRECISION=dot_precision(q.dtype, q.device), HAS_KEYMASK=key_valid is not None, num_warps=c["num_warps"],
        num_stages=c["num_stages"])
    return lse


def block_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_size: int, scale: float | None = None,
               config: dict | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """A `[B, H, nb, nb]` fp32 (see stats.py) from q, k `[B, H, S, D]` and the row lse `[B, H, S]`
    (over the same keys: those `key_valid` keeps)."""
    q, k = _check(q, k)
    B, H, S, D = q.shape
    if block_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"block size {block_size} not supported (16 … 256, a power of two)")
    if lse.shape != (B, H, S):
        raise ValueError(f"lse must be [B, H, S] = {(B, H, S)}; got {tuple(lse.shape)}")
    lse = lse.to(torch.float32)
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    scale = D ** -0.5 if scale is None else scale
    nb = triton.cdiv(S, block_size)
    c = _launch_config(config, q.dtype, block_size)
    mask, mask_stride = _key_mask(key_valid, q)
    out = torch.zeros(B, H, nb, nb, device=q.device, dtype=torch.float32)
    _block_mass_kernel[(triton.cdiv(S, c["BLOCK_M"]), B * H)](
        q, k, lse, out, mask, *q.stride()[:3], *k.stride()[:3], *lse.stride()[:2], *out.stride()[:3], mask_stride,
        H, S, nb, scale * LOG2E,
        HEAD_DIM=D, PLAN_BLOCK=block_size, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
        UPCAST=INTERPRET and q.dtype == torch.bfloat16, PRECISION=dot_precision(q.dtype, q.device),
        HAS_KEYMASK=key_valid is not None, num_warps=c["num_warps"], num_stages=c["num_stages"])
    counts = torch.full((nb,), float(block_size), device=q.device)
    counts[-1] = S - (nb - 1) * block_size
    return out / counts[:, None]
