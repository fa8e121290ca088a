"""The Triton block-sparse flash-attention kernel itself (the launcher, autotuning and the SparseKernel
live in triton_sparse.py).

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
  has seen no valid key yet keeps m = −inf and takes its exponents against 0, so the zeros it adds
  are zeros, not NaN, and its first valid keys set its true maximum (FP8's P needs it: e4m3 of
  448·2^(s·c) against a base of 0 would round a row of low scores to zeros);
- rectification epilogue: with R `[B, H, nq]` and Ō `[B, H, nq, D]` (fp32, per query block),
  the kernel writes R·O + Ō.
- FP8 (constexpr FP8; the tiles come from fp8.py's quantization): q, k are e4m3 with one fp32 scale
  per (batch, head, plan block), k smoothed (its mean over tokens subtracted), v e4m3 transposed
  ([D, S] per head: the K-major operand Hopper's e4m3 wgmma wants) with one scale per channel.
  s_ij = (q̃_i·k̃_j)·σq_n·σk_m: an e4m3 dot into fp32, and the two block scales fold into c (one
  scalar per tile). P enters the PV dot as e4m3 of 448·p: p ≤ 1 after the running max, so 448·p uses
  e4m3's whole range (values down to 448·2^-6 relative stay normal) and the factor costs nothing,
  being log2(448) added to the exponent; l sums the same 448·p (fp32), so it cancels in acc / l.
  Each tile's PV dot starts from zero and is added to acc in fp32 registers: Hopper's e4m3 MMA
  accumulates in ~22 bits, so it is used for one tile's BLOCK_N products only (two-level
  accumulation, as SageAttention2). The output is acc·σv / l, σv per channel.

On Hopper the K/V tiles come through TMA tensor descriptors where the strides allow (autotuned
against pointer loads; rows past S read as zeros). fp32 inputs get IEEE fp32 dots, not TF32.

Partial last block (S not a multiple of the block size): only key block nk−1 can hold keys ≥ S,
and it is the last entry of a sorted list, so the main loop runs unmasked and only that entry is
handled by a masked tail loop (keys ≥ S get −inf); query rows ≥ S are not stored.

With TRITON_INTERPRET=1 (set before Triton is imported) the kernel runs in Triton's interpreter on
CPU tensors (slowly: tests only), e4m3 dots included. The interpreter's bf16 `tl.dot` is wrong
(triton-lang/triton#11584), so there, and only there, bf16 tiles are upcast to fp32 for the dots; and
its cast to e4m3 loses a rounding carry, so there P is rounded first (ROUND_E4M3: fp8_triton.to_e4m3).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .fp8_triton import to_e4m3

# log2(448): P enters the PV dot as e4m3 of 448·p (fp8.E4M3_MAX); a jit function reads a global only as
# tl.constexpr (the interpreter reads any global, the compiler refuses others)
P_LOG2_SCALE = tl.constexpr(8.807354922057604)


@triton.jit
def _kv_tile(acc, l_i, m_i, q, k_base, v_base, idx_ptr, valid_base, masked_base, ks_base, k_off, v_off, offs_n, j,
             S, stride_ks, stride_vs, qk_scale,
             PLAN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_KEYMASK: tl.constexpr,
             UPCAST: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
             ROUND_E4M3: tl.constexpr):
    """One BLOCK_N key tile: step j of the flattened (list entry, sub-tile) loop."""
    SUB: tl.constexpr = PLAN_BLOCK // BLOCK_N          # kernel tiles per plan block
    kb = tl.load(idx_ptr + j // SUB)                   # listed key block
    n0 = kb * PLAN_BLOCK + (j % SUB) * BLOCK_N         # first tiled key position of this tile
    pos = n0 + offs_n
    if USE_TMA:   # k_base, v_base are tensor descriptors of this (batch, head)'s K [S, D] and V [S, D] (FP8: Vᵀ [D, S])
        k = k_base.load([n0, 0])
        if FP8:
            v = v_base.load([0, n0]).T
        else:
            v = v_base.load([n0, 0])
    else:         # contiguous tile: 64-bit scalar start + 32-bit in-tile offsets k_off, v_off
        k_ptrs = k_base + n0.to(tl.int64) * stride_ks + k_off
        v_ptrs = v_base + n0.to(tl.int64) * stride_vs + v_off
        if MASK:
            k = tl.load(k_ptrs, mask=(pos < S)[:, None], other=0.0)
            if FP8:
                v = tl.load(v_ptrs, mask=(pos < S)[None, :], other=0.0).T
            else:
                v = tl.load(v_ptrs, mask=(pos < S)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
            if FP8:
                v = v.T
    p_ty = v.dtype
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)      # s_ij = q_i·k_j, fp32
    c = qk_scale
    if FP8:   # q̃·k̃ times this tile's key-block scale (qk_scale holds the query block's already), kept a
        # normal number: two all-zero blocks' scales (1e-30/448 each) multiply to 0, and −inf·0 is NaN
        c = tl.maximum(qk_scale * tl.load(ks_base + kb), 1e-30)
    if MASK:
        qk = tl.where((pos < S)[None, :], qk, float("-inf"))
    if HAS_KEYMASK:   # key-padding: excluded keys score −inf, in the blocks that have any (a select
        if tl.load(masked_base + kb) != 0:    # over the whole tile costs ~20% of the kernel)
            valid = tl.load(valid_base + pos, mask=pos < S, other=0)
            qk = tl.where((valid != 0)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * c)          # m' = max(m, max_j s_ij·c)
    base = m_new
    if HAS_KEYMASK:   # a row with no valid key yet keeps m' = −inf, its exponents taken against 0:
        base = tl.where(m_new == float("-inf"), 0.0, m_new)   # 2^(−inf − 0) = 0, not NaN
    if FP8:
        p = tl.math.exp2(qk * c - (base - P_LOG2_SCALE)[:, None])   # 448·p_ij, in [0, 448]
    else:
        p = tl.math.exp2(qk * c - base[:, None])        # p_ij = 2^(s_ij·c − m'), one FMA per score
    alpha = tl.math.exp2(m_i - base)                    # α = 2^(m − m')
    l_i = l_i * alpha + tl.sum(p, 1)                    # l' = α·l + Σ_j p_ij
    if FP8:       # this tile's P·V from zero, summed into acc in fp32 (two-level accumulation)
        acc = acc * alpha[:, None] + tl.dot(to_e4m3(p, ROUND_E4M3), v)
    else:
        p = p.to(p_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)   # acc' = α·acc + P·V
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["H", "S", "NK", "S_BUCKET"])  # one binary across sequence lengths
def _attn_fwd(Q, K, V, Out, KV_NUM, KV_IDX, KV_VALID, KV_MASKED, R, OBAR, QS, KS, VS,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os,
              stride_nb, stride_nh, stride_nq, stride_ib, stride_ih, stride_iq, stride_mb, stride_kmb,
              stride_rb, stride_rh, stride_rq, stride_cb, stride_ch, stride_cq,
              H, S, NK, qk_scale, S_BUCKET, FIRST_BLOCKS,
              HEAD_DIM: tl.constexpr, PLAN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              EVEN_S: tl.constexpr, HAS_KEYMASK: tl.constexpr, HAS_RECT: tl.constexpr, UPCAST: tl.constexpr,
              TMA_OK: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
              ROUND_E4M3: tl.constexpr):
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
    ks_base = KS + (b * H + h) * NK             # FP8 scales: contiguous [B, H, nq or nk] and [B, H, D]
    if FP8:
        qk_scale = qk_scale * tl.load(QS + (b * H + h) * NK + qb)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if USE_TMA:   # Hopper's tensor-memory accelerator copies the K/V tiles (eligibility: `_tma_ok`)
        k_base = tl.make_tensor_descriptor(k_base, shape=[S, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        if FP8:
            v_base = tl.make_tensor_descriptor(v_base, shape=[HEAD_DIM, S], strides=[stride_vd, 1],
                                               block_shape=[HEAD_DIM, BLOCK_N])
        else:
            v_base = tl.make_tensor_descriptor(v_base, shape=[S, HEAD_DIM], strides=[stride_vs, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
    k_off = offs_n[:, None] * stride_ks + offs_d[None, :]
    if FP8:   # Vᵀ tile [D, BLOCK_N], contiguous along the keys
        v_off = offs_d[:, None] * stride_vd + offs_n[None, :]
    else:
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
        acc, l_i, m_i = _kv_tile(acc, l_i, m_i, q, k_base, v_base, idx_ptr, valid_base, masked_base, ks_base, k_off,
                                 v_off, offs_n, j, S, stride_ks, stride_vs, qk_scale,
                                 PLAN_BLOCK, BLOCK_N, False, HAS_KEYMASK, UPCAST, USE_TMA, PRECISION, FP8, ROUND_E4M3)
    if not EVEN_S:
        # sub-tiles of block nk−1 that hold a key < S; each starts below S, so every row of the first
        # one has a finite score and m_i never stays −inf into a later tile (unless keys are masked)
        n_tail = (n - n_main) * ((S - (NK - 1) * PLAN_BLOCK + BLOCK_N - 1) // BLOCK_N)
        for j in range(n_main * SUB, n_main * SUB + n_tail):
            acc, l_i, m_i = _kv_tile(acc, l_i, m_i, q, k_base, v_base, idx_ptr, valid_base, masked_base, ks_base,
                                     k_off, v_off, offs_n, j, S, stride_ks, stride_vs, qk_scale,
                                     PLAN_BLOCK, BLOCK_N, True, HAS_KEYMASK, UPCAST, USE_TMA, PRECISION, FP8,
                                     ROUND_E4M3)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]    # O = acc / l (a row with no kept key: 0)
    if FP8:         # v's channel scales
        out = out * tl.load(VS + (b * H + h) * HEAD_DIM + offs_d)[None, :]
    if HAS_RECT:    # rectified output R·O + Ō of this query block
        r = tl.load(R + b * stride_rb + h * stride_rh + qb * stride_rq)
        ob = tl.load(OBAR + b * stride_cb + h * stride_ch + qb * stride_cq + offs_d)
        out = out * r + ob[None, :]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=q_valid[:, None])
