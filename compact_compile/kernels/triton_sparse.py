"""Block-sparse attention forward in Triton, over compacted key-block lists.

Per (batch, head, query block) a list of key blocks: `kv_num_blocks [B or 1, H or 1, nq]` and
`kv_indices [B or 1, H or 1, nq, nk]` (kept first, ascending: `registry.kv_block_lists`), broadcast
where a dim is 1 (static plans: over the batch; head-agnostic plans: over heads too). One program
computes BLOCK_M query rows of one (batch, head) and walks only its listed key blocks: no scan over
a dense bitmap.

Online softmax (FlashAttention-2) in base 2. For query row i and the key tiles j seen so far, with
s_ij = q_i·k_j and c = scale·log2(e):
    m_i  = max_j s_ij·c                       running max (base-2 exponent domain)
    l_i  = Σ_j 2^(s_ij·c − m_i)               running normaliser
    acc_i = Σ_j 2^(s_ij·c − m_i) · v_j        running unnormalised output
A new tile raises the max to m' = max(m_i, max_j s_ij·c); the old sums are rescaled by
α = 2^(m_i − m'), so l' = α·l + Σ_j p_ij, acc' = α·acc + P·V with p_ij = 2^(s_ij·c − m').
At the end O_i = acc_i / l_i = softmax(s_i·scale)·V since 2^(x·log2 e) = e^x.

Extras, fused into the one pass:
- key-padding masks: with `key_valid [B, S]`, keys where it is 0 score −inf, in the key blocks that
  hold such a key (a per-block flag computed per call: text padding touches a few blocks); a row that
  has seen no valid key yet keeps m = 0 as its exponent base, so the zeros it adds are zeros, not NaN;
- rectification epilogue: with R `[B, H, nq]` and Ō `[B, H, nq, D]` (fp32, per query block),
  the kernel writes R·O + Ō.

On Hopper the K/V tiles come through TMA tensor descriptors where the strides allow (autotuned
against pointer loads; rows past S read as zeros). fp32 inputs get IEEE fp32 dots, not TF32.

Partial last block (S not a multiple of the block size): only key block nk−1 can hold keys ≥ S,
and it is the last entry of a sorted list, so the main loop runs unmasked and only that entry is
handled by a masked tail loop (keys ≥ S get −inf); query rows ≥ S are not stored.

With TRITON_INTERPRET=1 (set before Triton is imported) the kernels run in Triton's interpreter
on CPU tensors (slowly: tests only). The interpreter's bf16 `tl.dot` is wrong
(triton-lang/triton#11584), so there, and only there, bf16 tiles are upcast to fp32 for the dots.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import TokenLayout
from .registry import checked_key_valid, masked_key_blocks, sdpa_dense

# Triton reads TRITON_INTERPRET when it is imported (its own library functions are jit-decorated then),
# so the interpreter must be chosen before `import triton`: tests/conftest.py does it on CPU machines.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def triton_available(device) -> bool:
    """Whether this kernel can run on `device`: a CUDA GPU of compute capability ≥ 8.0, or the CPU
    when Triton runs in its interpreter (TRITON_INTERPRET=1 before import; for tests, far too slow for use)."""
    device = torch.device(device)
    if device.type == "cuda":
        return not INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and INTERPRET


@triton.jit
def _kv_tile(acc, l_i, m_i, q, k_base, v_base, idx_ptr, valid_base, masked_base, k_off, v_off, offs_n, j, S,
             stride_ks, stride_vs, qk_scale,
             PLAN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_KEYMASK: tl.constexpr,
             UPCAST: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr):
    """One BLOCK_N key tile: step j of the flattened (list entry, sub-tile) loop."""
    SUB: tl.constexpr = PLAN_BLOCK // BLOCK_N          # kernel tiles per plan block
    kb = tl.load(idx_ptr + j // SUB)                   # listed key block
    n0 = kb * PLAN_BLOCK + (j % SUB) * BLOCK_N         # first tiled key position of this tile
    pos = n0 + offs_n
    if USE_TMA:   # k_base, v_base are tensor descriptors of this (batch, head)'s [S, D]; rows ≥ S read 0
        k = k_base.load([n0, 0])
        v = v_base.load([n0, 0])
    else:         # contiguous tile: 64-bit scalar start + 32-bit in-tile offsets k_off, v_off
        k_ptrs = k_base + n0.to(tl.int64) * stride_ks + k_off
        v_ptrs = v_base + n0.to(tl.int64) * stride_vs + v_off
        if MASK:
            k = tl.load(k_ptrs, mask=(pos < S)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(pos < S)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    p_ty = v.dtype
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)      # s_ij = q_i·k_j, fp32
    if MASK:
        qk = tl.where((pos < S)[None, :], qk, float("-inf"))
    if HAS_KEYMASK:   # key-padding: excluded keys score −inf, in the blocks that have any (a select
        if tl.load(masked_base + kb) != 0:    # over the whole tile costs ~20% of the kernel)
            valid = tl.load(valid_base + pos, mask=pos < S, other=0)
            qk = tl.where((valid != 0)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)   # m' = max(m, max_j s_ij·c)
    if HAS_KEYMASK:   # a row with no valid key yet: exponents against 0, so 2^(−inf − 0) = 0, not NaN
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])    # p_ij = 2^(s_ij·c − m')
    alpha = tl.math.exp2(m_i - m_new)                   # α = 2^(m − m')
    l_i = l_i * alpha + tl.sum(p, 1)                    # l' = α·l + Σ_j p_ij
    p = p.to(p_ty)
    if UPCAST:
        p = p.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)   # acc' = α·acc + P·V
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["H", "S", "NK", "S_BUCKET"])  # one binary across sequence lengths
def _attn_fwd(Q, K, V, Out, KV_NUM, KV_IDX, KV_VALID, KV_MASKED, R, OBAR,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
              stride_nb, stride_nh, stride_nq, stride_ib, stride_ih, stride_iq, stride_mb, stride_kmb,
              stride_rb, stride_rh, stride_rq, stride_cb, stride_ch, stride_cq,
              H, S, NK, qk_scale, S_BUCKET, FIRST_BLOCKS,
              HEAD_DIM: tl.constexpr, PLAN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              EVEN_S: tl.constexpr, HAS_KEYMASK: tl.constexpr, HAS_RECT: tl.constexpr, UPCAST: tl.constexpr,
              TMA_OK: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr):
    # grid: (query tiles, B·H); all tiles of one head run together, so its K/V stay in L2. Except
    # that the tiles of the last FIRST_BLOCKS query blocks (text, which attends every key block) of
    # every head are launched before all others: a row 10× longer than the rest, started in the last
    # wave, would run on alone after everything else finished.
    n_tiles = tl.num_programs(0)
    pid = tl.program_id(1) * n_tiles + tl.program_id(0)
    n_first = tl.where(FIRST_BLOCKS > 0, n_tiles - (NK - FIRST_BLOCKS) * (PLAN_BLOCK // BLOCK_M), 0)  # their tiles
    n_heavy = n_first * tl.num_programs(1)
    heavy = pid < n_heavy
    p = tl.where(heavy, pid, pid - n_heavy)
    per_head = tl.where(heavy, n_first, n_tiles - n_first)
    pid_bh = p // per_head
    pid_m = p % per_head + tl.where(heavy, n_tiles - n_first, 0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    qb = m0 // PLAN_BLOCK                       # plan query block (BLOCK_M divides PLAN_BLOCK)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = offs_m < S
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=q_valid[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if USE_TMA:   # Hopper's tensor-memory accelerator copies the K/V tiles (eligibility: `_tma_ok`)
        k_base = tl.make_tensor_descriptor(k_base, shape=[S, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_base = tl.make_tensor_descriptor(v_base, shape=[S, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    k_off = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_off = offs_n[:, None] * stride_vs + offs_d[None, :]
    valid_base = KV_VALID + b * stride_mb
    masked_base = KV_MASKED + b * stride_kmb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # this (batch, head, query block)'s list; the strides are 0 where the lists broadcast
    idx_ptr = KV_IDX + b * stride_ib + h * stride_ih + qb * stride_iq
    n = tl.load(KV_NUM + b * stride_nb + h * stride_nh + qb * stride_nq)
    SUB: tl.constexpr = PLAN_BLOCK // BLOCK_N
    n_main = n
    if not EVEN_S:   # the partial block nk−1, if listed, is the last entry: keep it for the tail
        last = tl.load(idx_ptr + tl.maximum(n - 1, 0))
        n_main = tl.where((n > 0) & (last == NK - 1), n - 1, n)
    for j in range(0, n_main * SUB):
        acc, l_i, m_i = _kv_tile(acc, l_i, m_i, q, k_base, v_base, idx_ptr, valid_base, masked_base, k_off, v_off,
                                 offs_n, j, S, stride_ks, stride_vs, qk_scale,
                                 PLAN_BLOCK, BLOCK_N, False, HAS_KEYMASK, UPCAST, USE_TMA, PRECISION)
    if not EVEN_S:
        # sub-tiles of block nk−1 that hold a key < S; each starts below S, so every row of the first
        # one has a finite score and m_i never stays −inf into a later tile (unless keys are masked)
        n_tail = (n - n_main) * ((S - (NK - 1) * PLAN_BLOCK + BLOCK_N - 1) // BLOCK_N)
        for j in range(n_main * SUB, n_main * SUB + n_tail):
            acc, l_i, m_i = _kv_tile(acc, l_i, m_i, q, k_base, v_base, idx_ptr, valid_base, masked_base, k_off,
                                     v_off, offs_n, j, S, stride_ks, stride_vs, qk_scale,
                                     PLAN_BLOCK, BLOCK_N, True, HAS_KEYMASK, UPCAST, USE_TMA, PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]    # O = acc / l (a row with no kept key: 0)
    if HAS_RECT:    # rectified output R·O + Ō of this query block
        r = tl.load(R + b * stride_rb + h * stride_rh + qb * stride_rq)
        ob = tl.load(OBAR + b * stride_cb + h * stride_ch + qb * stride_cq + offs_d)
        out = out * r + ob[None, :]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=q_valid[:, None])


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
    key=["HEAD_DIM", "S_BUCKET", "PLAN_BLOCK", "HAS_KEYMASK", "HAS_RECT", "TMA_OK"],
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
    if not triton_available(q.device):
        raise RuntimeError(f"the Triton block-sparse kernel cannot run on {q.device}: it needs a CUDA GPU "
                           f"(sm80+), or TRITON_INTERPRET=1 set before Triton is imported (CPU, tests only)")
    B, H, S, D = q.shape
    nq = triton.cdiv(S, block_size)
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block size {block_size} not supported (16, 32, 64, 128)")
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
        out = torch.empty(B, H, S, D, device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be [B, H, S, D] in q's dtype with a contiguous last dim")
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
    bstride = lambda t, d: t.stride(d) if t.shape[d] > 1 else 0  # noqa: E731  (broadcast dims: 0)
    args = (q, k, v, out, num, idx, *((num, num) if key_valid is None else (key_valid, blocks_masked)), r, obar,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            bstride(num, 0), bstride(num, 1), num.stride(2), bstride(idx, 0), bstride(idx, 1), idx.stride(2),
            *((0, 0) if key_valid is None else (bstride(key_valid, 0), bstride(blocks_masked, 0))),
            *r_strides, *c_strides,
            H, S, nq, scale * LOG2E, triton.next_power_of_2(S), min(first_blocks, nq))
    meta = dict(HEAD_DIM=D, PLAN_BLOCK=block_size, EVEN_S=S % block_size == 0,
                HAS_KEYMASK=key_valid is not None, HAS_RECT=rectify is not None,
                UPCAST=INTERPRET and q.dtype == torch.bfloat16, TMA_OK=_tma_ok(k, v),
                # fp32 inputs get fp32 dots, not TF32: torch's own fp32 matmul default
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if meta["TMA_OK"] and not INTERPRET:   # any allocator serves; this one is torch's caching allocator
        triton.set_allocator(_tma_scratch(q.device))
    if config is None and INTERPRET:
        config = INTERPRET_CONFIG
    if config is not None:
        bm, bn = _fit(config["BLOCK_M"], config["BLOCK_N"], block_size)
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
    """Our Triton kernel: block lists as they are, key masks and the rectified epilogue in the one pass."""

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
        return ""

    def prepare(self, lists):
        return tuple(x.to(torch.int32).contiguous() for x in lists)

    def attend(self, q, k, v, prepared, scale, key_valid=None, rectify=None) -> torch.Tensor:
        return block_sparse_attention(q, k, v, *prepared, self.block_size, scale, key_valid=key_valid,
                                      rectify=rectify, first_blocks=self.text_blocks)

    def dense(self, q, k, v, scale, key_valid=None) -> torch.Tensor:
        return sdpa_dense(q, k, v, scale, key_valid)
