"""FP8 (e4m3) block-sparse attention on FlashAttention-4's Hopper forward (CuTe DSL). Imported only
where FA4 is installed (fa4.py's `attend_fp8`); its tiles and scales are fp8.py's.

FA4's `FlashAttentionForwardSm90` (4.0.0b36) is FlashAttention-3's design: a TMA producer warp, two
MMA warp groups in ping-pong, each overlapping the softmax of key tile j with the P·V MMA of tile
j−1, and it already walks our block lists (128×128 tiles). It takes fp16/bf16 only. What e4m3 needs
on top, and where this subclass puts it:

- Both wgmma operands K-major in shared memory: K is ([keys, D], D contiguous) as for bf16; V's
  tiles are read keys-contiguous from our transposed vᵀ `[B, H, D, S16]` (`sV_layout`), so the
  P·V MMA takes Vᵀ K-major (`_get_tiled_mma`) and nothing is transposed in the kernel.
- P goes through shared memory (FA4's `mma_pv_is_rs=False` path): the P·V MMA reads it like any
  operand. Each warp converts its own rows (`cvt.rn.satfinite.e4m3x2.f32`) and stores them, two
  bytes a store. Or (`p_in_registers`, not the default until measured) P stays in registers as the
  MMA's A operand, as in FlashAttention-3's FP8 path: an e4m3 A register holds 4 consecutive keys of
  one row, where the S accumulator gives a thread keys 2t, 2t+1, 2t+8, 2t+9 of each 16; with vᵀ's
  keys in that order (`MMA_KEY_ORDER`, within aligned groups of 16) each A register is 4 of the
  thread's own S values (`pack_p`): no shuffle, no shared memory, no fence.
- The scales, at no per-score cost. s_ij = (q̃_i·k̃_j)·σq_m·σk_n with one σq per query block (the
  CTA's 128 rows) and one σk per key block: FA4's score_mod hook (`apply_score_mod`, which gets the
  batch, head and both block indices) here returns the tile's exponent constant
  c = scale·log2(e)·σq_m·σk_n instead of modifying scores, and the online softmax below keeps its
  running max in those units: m' = max(m, max_j s̃_ij·c) (c > 0 commutes with max), one FFMA per
  score as before. P enters the MMA as e4m3 of 448·p (log2(448) added to the exponent; the row sum
  holds the same factor, which cancels), so probabilities down to 448·2^-6 relative stay normal.
  v's per-channel scale multiplies the output's columns in the epilogue, once per CTA.
- A key-padding mask: FA4's own path for the bf16 kernel (fa4.py): the blocks holding a masked key are
  its "mask" blocks, where the `mask_mod` reads the keys' table (aux tensor 0, the scales after it)
  and sets their scores to −inf before the scale constant multiplies them (−inf·c = −inf for c > 0),
  so their p is 0; a row with no key left keeps m = −inf and takes 0, as without a mask.
- The output dtype (bf16/fp16) differs from the inputs': O is staged through the shared memory of
  Q in that dtype (`_get_shared_storage_cls` sizes it; `epilogue`).
Accumulation: FA4 keeps O in the MMA accumulator across tiles, where Hopper's e4m3 MMA adds each
k32 step at ≥ 13 bits; reference.fp8_attention_reference(o_in_mma=True) bounds that on top of fp8.py's
bound (the Triton kernel adds each tile's P·V in fp32 registers). Measured: the same error against
float64 as the Triton kernel's (benchmarks/results/attention-fp8-fa4-*).
"""
# no `from __future__ import annotations`: CuTe reads the shared-memory struct's annotations as objects
import functools
import math

from .fa4 import BLOCK as TILE, FP8_HEAD_DIM as HEAD_DIM   # query and key tile: the plans' block size

# key k of each aligned 16-key group of vᵀ, in the order `p_in_registers` needs: slot 4t + j holds key
# (j & 1) + 2t + 8(j >> 1), the key whose score a thread holds as byte j of its A register (t = lane % 4)
MMA_KEY_ORDER = tuple((j & 1) + 2 * t + 8 * (j >> 1) for t in range(4) for j in range(4))
# the S accumulator values `pack_p` puts in A register r of the P·V MMA (r = rh + 2·kh + 4·kb: row half,
# 16-key half, 32-key block of a 128-key tile), byte j first: c + (j & 1) + 4(j >> 1), c = 16·kb + 8·kh + 2·rh
P_PACKING = tuple(tuple(16 * (r // 4) + 8 * (r // 2 % 2) + 2 * (r % 2) + (j & 1) + 4 * (j >> 1) for j in range(4))
                  for r in range(TILE // 8))
LOG2_E = math.log2(math.e)
LOG2_P_SCALE = math.log2(448.0)   # P enters the P·V MMA as e4m3 of 448·p (fp8.E4M3_MAX)


@functools.cache
def fp8_block_sparse_sm90() -> type:
    """The kernel class, `FP8BlockSparseSm90`: built at the first FP8 call, so that importing this
    module (or the package) never loads the CUTLASS DSL or FA4, optional GPU dependencies. The
    imports bind module globals: CuTe re-reads a jit function's source against its globals (a
    closure's names are not seen there)."""
    global cutlass, cute, sm90_utils_basic, Float32, const_expr, warpgroup, LayoutEnum, utils, AuxData
    global layout_utils, sm90_utils, e4m3x4_pack_f32
    import cutlass
    import cutlass.cute as cute
    import cutlass.utils.hopper_helpers as sm90_utils_basic
    from cutlass import Float32, const_expr
    from cutlass.cute.nvgpu import warpgroup
    from cutlass.utils import LayoutEnum
    from flash_attn.cute import utils
    from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
    from flash_attn.cute.utils import AuxData
    from quack import layout_utils, sm90_utils
    from quack.blockscaled.nvfp4_utils import e4m3x4_pack_f32

    def block_scales(*_):
        """FA4's score_mod slot, filled so that FA4 hands every tile's (batch, head, query block, key
        block) to `apply_score_mod`, which returns the tile's exponent constant; never called itself."""
        raise AssertionError("the FP8 kernel's scales are applied by apply_score_mod")

    class FP8BlockSparseSm90(FlashAttentionForwardSm90):
        """e4m3 q, k, vᵀ tiles and their scales (aux tensors: q's `[B, H, nq]`, k's `[B, H, nk]`, v's
        `[B, H, D]`, fp32) → O in `out_dtype`, over FA4's block-sparse lists; head dim 128, 128-token
        blocks. `key_mask`: FA4's mask_mod of a key-padding mask, its table the first aux tensor.
        `p_in_registers`: P as the P·V MMA's register operand, vᵀ's keys in MMA_KEY_ORDER."""

        def __init__(self, out_dtype, num_stages: int = 3, key_mask=None, p_in_registers: bool = False):
            super().__init__(cutlass.Float8E4M3FN, HEAD_DIM, HEAD_DIM, 1, is_causal=False, is_local=False,
                             pack_gqa=False, tile_m=TILE, tile_n=TILE, num_stages=num_stages, num_threads=384,
                             Q_in_regs=False, intra_wg_overlap=True, mma_pv_is_rs=p_in_registers,
                             score_mod=block_scales, mask_mod=key_mask, has_aux_tensors=True)
            self.out_dtype = out_dtype
            self.scales_at = 0 if key_mask is None else 1     # aux tensors: [the keys' table,] q's, k's, v's scales

        # ---- what differs from bf16 on the host side -------------------------------------------------
        def _check_type(self, q_type, k_type, v_type, o_type, lse_type, *varlen_types):
            if not (q_type == k_type == v_type == cutlass.Float8E4M3FN) or o_type != self.out_dtype:
                raise TypeError(f"FP8 kernel: q, k, v e4m3 and O {self.out_dtype}; "
                                f"got {q_type}, {k_type}, {v_type}, {o_type}")
            if lse_type is not None or any(t is not None for t in varlen_types):
                raise TypeError("FP8 kernel: no LSE output, no variable lengths")

        @property
        def sV_layout(self):
            return self._sV_layout

        @sV_layout.setter
        def sV_layout(self, _row_major):
            # every layout FA4 assigns here is replaced by the keys-contiguous one: vᵀ's tiles as they are
            # in memory, and the K-major operand an e4m3 wgmma takes
            self._sV_layout = sm90_utils.make_smem_layout(cutlass.Float8E4M3FN, LayoutEnum.COL_MAJOR,
                                                          (self.tile_n, self.tile_hdimv), self.num_stages)

        def _get_tiled_mma(self):
            def mma(tiler_n, a_source):
                return sm90_utils_basic.make_trivial_tiled_mma(
                    self.dtype, self.dtype, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K, Float32,
                    atom_layout_mnk=(self.tile_m // 64, 1, 1), tiler_mn=(64, tiler_n), a_source=a_source)
            p_source = warpgroup.OperandSource.RMEM if self.mma_pv_is_rs else warpgroup.OperandSource.SMEM
            return mma(self.tile_n, warpgroup.OperandSource.SMEM), mma(self.tile_hdimv, p_source)

        def _get_shared_storage_cls(self):
            def buffer(n_elems):
                return cute.struct.Align[cute.struct.MemRange[self.dtype, n_elems], self.buffer_align_bytes]

            o_bytes = cute.cosize(self.sO_layout) * self.out_dtype.width // 8   # O, staged where Q was
            sQ_t = buffer(max(cute.cosize(self.sQ_layout), o_bytes))
            sK_t, sV_t, sP_t = (buffer(0 if x is None else cute.cosize(x))
                                for x in (self.sK_layout, self.sV_layout, self.sP_layout))
            mbar_Q_t = cute.struct.MemRange[cutlass.Int64, 2]
            mbar_KV_t = cute.struct.MemRange[cutlass.Int64, self.num_stages * 2]

            @cute.struct
            class SharedStorage:
                mbar_ptr_Q: mbar_Q_t
                mbar_ptr_K: mbar_KV_t
                mbar_ptr_V: mbar_KV_t
                sV: sV_t
                sQ: sQ_t
                sK: sK_t
                sP: sP_t

            return SharedStorage

        # ---- the scales and the e4m3 P, in the main loop ---------------------------------------------
        def mma(self, *args):
            aux_data = args[-2]
            assert isinstance(aux_data, AuxData)
            self._scales = aux_data.tensors     # read by the epilogue, inside this same trace
            return super().mma(*args)

        @cute.jit
        def apply_score_mod(self, thr_mma_qk, batch_idx, head_idx, m_block, acc_S, n_block, softmax_scale, seqlen,
                            aux_data: AuxData = AuxData(), fastdiv_mods=None):
            """This tile's c = scale·log2(e)·σq·σk (acc_S is neither read nor changed), kept a normal
            number: two all-zero blocks' scales (1e-30/448 each) multiply to 0, and −inf·0 is NaN."""
            q_scale, k_scale = aux_data.tensors[self.scales_at], aux_data.tensors[self.scales_at + 1]
            c = softmax_scale * LOG2_E * q_scale[batch_idx, head_idx, m_block] * k_scale[batch_idx, head_idx, n_block]
            return cute.arch.fmax(c, Float32(1e-30))

        @cute.jit
        def online_softmax(self, softmax, acc_S: cute.Tensor, c: Float32, is_first: cutlass.Constexpr[bool]):
            """FA4's online softmax with the running max in exponent units (m = max s̃·c) and P = 448·p:
                m' = max(m, c·max_j s̃_ij);  p_ij = 2^(s̃_ij·c − m' + log2 448);  α = 2^(m − m')
                l' = α·l + Σ_j p_ij;  O' = α·O + P·V (the caller's MMA)
            A row with no key yet (m' = −inf) takes its exponents against 0: zeros, not NaN. Returns α."""
            acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)
            row_scale = cute.make_fragment_like(softmax.row_max, Float32)
            for r in cutlass.range(cute.size(softmax.row_max), unroll_full=True):
                row = acc_S_mn[r, None].load()
                m_cur = cute.arch.warp_reduction_max(utils.fmax_reduce(row, init_val=None, arch=softmax.arch),
                                                     threads_in_group=4) * c
                m_prev = softmax.row_max[r]
                m_new = m_cur if const_expr(is_first) else cute.arch.fmax(m_prev, m_cur)
                base = Float32(0.0) if m_new == -Float32.inf else m_new
                p = cute.math.exp2(row * c + (LOG2_P_SCALE - base), fastmath=True)
                if const_expr(is_first):
                    row_scale[r] = Float32(1.0)
                    softmax.row_sum[r] = utils.fadd_reduce(p, init_val=None, arch=softmax.arch)
                else:
                    row_scale[r] = cute.math.exp2(m_prev - base, fastmath=True)
                    softmax.row_sum[r] = utils.fadd_reduce(p, init_val=softmax.row_sum[r] * row_scale[r],
                                                           arch=softmax.arch)
                softmax.row_max[r] = m_new
                acc_S_mn[r, None].store(p)
            return row_scale

        @cute.jit
        def store_p(self, acc_S: cute.Tensor, smem_copy_params, tOrP: cute.Tensor):
            """P in e4m3 where the P·V MMA reads it: its A registers (`pack_p`), or shared memory, each
            warp its own rows, which a warp barrier and the async-proxy fence make visible to it."""
            if const_expr(self.mma_pv_is_rs):
                self.pack_p(acc_S, tOrP)
            else:
                self.store_p_shared(acc_S, smem_copy_params)

        @cute.jit
        def pack_p(self, acc_S: cute.Tensor, tOrP: cute.Tensor):
            """A register (rh, kh) of key block kb (32 keys) holds, byte j, row r + 8·rh and key slot
            4t + j + 16·kh; the accumulator's value c + v0 + 4·v2', c = 16·kb + 8·kh + 2·rh, is row r + 8·rh,
            key 2t + v0 + 8·v2' of that 16-key group: with vᵀ's keys in MMA_KEY_ORDER, slot 4t + j is key
            (j & 1) + 2t + 8(j >> 1), so byte j is value c + (j & 1) + 4(j >> 1): P_PACKING
            (tests/kernels/test_fa4_key_order.py checks it on CUTLASS's layouts)."""
            p_i32 = cute.recast_tensor(tOrP, cutlass.Int32)
            for r in cutlass.range_constexpr(cute.size(p_i32)):
                a, b, c, d = P_PACKING[r]
                p_i32[r] = e4m3x4_pack_f32(acc_S[a], acc_S[b], acc_S[c], acc_S[d])

        @cute.jit
        def store_p_shared(self, acc_S: cute.Tensor, smem_copy_params):
            p_acc = layout_utils.reshape_acc_to_frgA(acc_S)
            p8 = cute.make_rmem_tensor_like(p_acc, self.dtype)
            p8.store(p_acc.load().to(self.dtype))
            cute.copy(smem_copy_params.smem_thr_copy_P, smem_copy_params.smem_thr_copy_P.retile(p8),
                      smem_copy_params.tPsP)
            cute.arch.fence_view_async_shared()
            cute.arch.sync_warp()

        @cute.jit
        def first_half_block_overlap(self, n_block, mma_qk_fn, kv_consumer_state, pipeline_k, tOrP,
                                     smem_copy_params, softmax, seqlen, scores_scale=None, acc_O=None, mask_fn=None,
                                     score_mod_fn=None, is_first_block: bool = False):
            """The first listed block: S = Q·Kᵀ, its softmax and P (its P·V waits for the next block)."""
            pipeline_k.consumer_wait(kv_consumer_state, pipeline_k.consumer_try_wait(kv_consumer_state))
            acc_S = mma_qk_fn(B_idx=kv_consumer_state.index, wg_wait=0)
            pipeline_k.consumer_release(kv_consumer_state)
            c = score_mod_fn(acc_S, n_block=n_block, seqlen=seqlen)
            mask_fn(acc_S, n_block=n_block, mask_seqlen=True)
            self.online_softmax(softmax, acc_S, c, is_first_block)
            self.store_p(acc_S, smem_copy_params, tOrP)
            return kv_consumer_state

        @cute.jit
        def mma_one_n_block_intrawg_overlap(self, smem_pipe_read, n_block, mma_qk_fn, mma_pv_fn, pipeline_k,
                                            pipeline_v, acc_O, tOrP, smem_copy_params, softmax, seqlen,
                                            scores_scale=None, score_mod_fn=None, mask_fn=None, check_inf=True):
            """One listed block: S = Q·Kᵀ of this block is issued with the previous block's O += P·V, then
            this block's softmax runs while that MMA finishes (FA4's intra-warpgroup overlap). The scales
            load after the wait: on an H200 that ran 4–6% faster than loading them before the MMAs' issue
            or between the issue and the wait (three runs of one day, the other timings in them within 2%)."""
            smem_pipe_read_v = smem_pipe_read.clone()
            smem_pipe_read.advance()
            pipeline_k.consumer_wait(smem_pipe_read, pipeline_k.consumer_try_wait(smem_pipe_read))
            self.warp_scheduler_barrier_sync()
            acc_S = mma_qk_fn(B_idx=smem_pipe_read.index, wg_wait=-1)
            pipeline_v.consumer_wait(smem_pipe_read_v, pipeline_v.consumer_try_wait(smem_pipe_read_v))
            mma_pv_fn(B_idx=smem_pipe_read_v.index, wg_wait=-1)
            self.warp_scheduler_barrier_arrive()
            warpgroup.wait_group(1)
            pipeline_k.consumer_release(smem_pipe_read)
            c = score_mod_fn(acc_S, n_block=n_block, seqlen=seqlen)
            if const_expr(mask_fn is not None):
                mask_fn(acc_S=acc_S, n_block=n_block)
            row_scale = self.online_softmax(softmax, acc_S, c, False)
            warpgroup.wait_group(0)
            pipeline_v.consumer_release(smem_pipe_read_v)
            softmax.rescale_O(acc_O, row_scale)
            self.store_p(acc_S, smem_copy_params, tOrP)
            return smem_pipe_read

        # ---- the output ------------------------------------------------------------------------------
        @cute.jit
        def scale_columns(self, acc_O: cute.Tensor, v_scale: cute.Tensor, tiled_mma, tidx, batch_idx, head_idx):
            """O·σv: column d of this head's output times v's channel scale σv_d."""
            cO = tiled_mma.get_slice(tidx).partition_C(cute.make_identity_tensor((self.tile_m, self.tile_hdimv)))
            for i in cutlass.range(cute.size(acc_O), unroll_full=True):
                acc_O[i] = acc_O[i] * v_scale[batch_idx, head_idx, cO[i][1]]

        def epilogue(self, acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O, tma_atom_O, tiled_mma, tidx,
                     m_block, head_idx, batch_idx):
            """v's channel scales, then FA4's epilogue in the output dtype, through Q's shared memory viewed
            in that dtype. A plain method (FA4 calls it while tracing), so that it can switch self.dtype."""
            self.scale_columns(acc_O, self._scales[self.scales_at + 2], tiled_mma, tidx, batch_idx, head_idx)
            o_layout = sm90_utils.make_smem_layout(self.out_dtype, LayoutEnum.ROW_MAJOR, (self.tile_m, self.tile_hdimv))
            sO = cute.make_tensor(cute.recast_ptr(sO.iterator, o_layout.inner, dtype=self.out_dtype), o_layout.outer)
            in_dtype, self.dtype = self.dtype, self.out_dtype
            try:
                super().epilogue(acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O, tma_atom_O, tiled_mma, tidx,
                                 m_block, head_idx, batch_idx)
            finally:
                self.dtype = in_dtype

    return FP8BlockSparseSm90
