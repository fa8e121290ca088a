"""FP8 (e4m3) attention's quantization: what the tiles and their scales are, how they are made, and
where FP8 attention can run. The Triton kernel (triton_attn.py, FP8=True) and FA4's (fa4_fp8_sm90.py)
consume them; the reorder pass (pool_triton.py) makes them on the GPU in the pass that already reads
q, k, v; `quantize_tiles` here is the same arithmetic in torch (the CPU path and the tests' reference).
This module is torch only (importing it loads no Triton); the e4m3 conversion Triton kernels share is
fp8_triton.py's.

e4m3 is a floating-point format: 3 mantissa bits, so every normal value is rounded to within a
relative u = 2^-4 of itself, from 2^-6 up to its largest finite value 448 (2^-9 steps below 2^-6).
A scale therefore buys range, not precision: it maps the largest |x| it covers to 448, and only
values more than ~2^15 below that lose relative precision. Hence:

  q, k   one fp32 scale per (batch, head, plan block) of tokens: σ = amax/448 over the block. Per
         token would change only tokens 2^15 below their block's largest; per block, the kernel
         folds both scales into one scalar per tile (free).
  k      smoothed first: k − μ, μ = k's mean over all tokens of its (batch, head). For query i every
         score shifts by the same q_i·μ, and softmax over any set of keys (the kept blocks, the keys a
         key-padding mask keeps) is unchanged by a shift common to that row: exact for any μ, sparse
         or dense, masked or not. Rectification's estimate uses the unsmoothed pooled statistics
         (its GAPR test compares |q̄·k̄| terms, which a shift would change), so it is unaffected too.
         Why: a common offset of k (large in real models) would set the scale and the rounding,
         u·|μ| per element, which then swamps the part of k that varies between keys — the only
         part softmax sees.
  v      one fp32 scale per channel of each (batch, head): amax over all tokens / 448; applied to
         the output once (O·σv), since P·V sums over tokens within a channel.
  P      448·p (p ≤ 1 after the running max) in e4m3: no per-block scale needed.
  q, k   rotated before rounding: q·M and (k − μ)·M, M = H₈ ⊗ I in the pass's column order
         (`rotation`: each channel mixed with the 7 others D/8 apart, ±1), M·Mᵀ = 8·I, so
         (q·M)·((k − μ)·M)ᵀ = 8·q·(k − μ)ᵀ and the 1/8 rides in q's scale: the kernels' scores are
         the same numbers. Why: rounding k puts independent noise on every score, Σ_d (q_d·δk_d)²,
         largest where q and k share large channels, which real models' do; mixing spreads them
         (FlashAttention-3's incoherent processing, with a rotation each thread of the pass applies
         to the 16 columns it holds: 24 adds per 8 values, no data movement between threads).
         On the trained models' own q, k, v: the error of rounding q and k 2.18–3.38% → 1.19–2.06%,
         and their FP8 videos +1.9 to +3.8 dB PSNR against bf16 sparse, every one ≥ 41.7 dB; the pass
         0.02–0.11 ms slower (BENCHMARKS.md, "Where the FP8 error comes from").
With a key-padding mask, μ and v's amax are taken over the keys it keeps: a padding key's score never
counts, so it must not set the offset or the scale (its v, saturated at ±448, weighs 0).

Error bound (FP8 output Õ against exact attention O = Σ_j a_ij v_j over the same kept keys):
  1. quantization, per element: |x̃ − x| ≤ u·|x| + 2^-10·σ (half a subnormal step), x = q·M/8,
     (k − μ)·M, v (below, q and k are those rotated ones: the scores are the same).
  2. scores: |s̃_ij − s_ij| ≤ Δ_ij = scale·Σ_d (e^q_id·|k'_jd| + |q_id|·e^k_jd + e^q_id·e^k_jd), e the
     bounds of 1. (≈ 2u·scale·Σ_d |q_id·k'_jd|: the scores' magnitude, of k' = k − μ, sets it); the
     softmax weights then move by a factor within e^{±2Δ_i}, Δ_i = max_j Δ_ij:
     Σ_j |ã_ij − a_ij| ≤ e^{2Δ_i} − 1.
  3. P in e4m3 and v's rounding: + u·Σ_j a_ij·|v_jd| + n_i·2^-10/448·max_j |v_jd| + u·max_j |v_jd|.
  |Õ_id − O_id| ≤ (e^{2Δ_i} − 1)·max_j |v_jd| + (3) + the output's rounding to its dtype.
This worst case adds every rounding error with one sign; with N(0, 1) activations the errors are
independent and the output's relative error is a few percent (tests/kernels/test_fp8.py checks 1.
on the pass and 3. on the kernel exactly, reference.fp8_attention_reference; test_smoothing_…
shows what 2. does to keys with a large mean when they are not smoothed). On the trained models' own
q, k, v it is 0.8–2.4% per site (1.2–3.6% unrotated), most of it still k's rounding (BENCHMARKS.md,
"Where the FP8 error comes from", with what removing more of it was measured to cost).

μ and v's channel amax are reductions over all tokens, needed before the first tile is quantized:
the rewritten graph computes them (`smoothing_stats`) where Inductor can fuse them into the kernels
producing k and v; the reorder pass then reads q, k, v once and writes the e4m3 tiles.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# σ = amax·(1/448) with 1/448 rounded to fp32 once: one rounding, the same on the CPU, in torch on CUDA
# (which divides by a scalar as a multiply by its reciprocal) and in the Triton pass (whose `/` is an
# approximate division on the GPU), so the scales the two quantizers give are bit for bit equal
# (fp8_triton.SCALE_PER_AMAX there)
INV_E4M3_MAX = 1.0 / E4M3_MAX
U = 2.0 ** -4        # e4m3's relative rounding error (3 mantissa bits, round to nearest)
TINY = 1e-30         # floor of an amax: an all-zero block gets a finite scale and zero tiles
MIN_CAPABILITY = (8, 9)   # e4m3 tensor cores: Ada, Hopper, Blackwell


class FP8Tiles(NamedTuple):
    """q, k, v of one site call in tile order, quantized; what the FP8 kernel reads."""
    q: torch.Tensor          # e4m3 [B, H, S, D]
    k: torch.Tensor          # e4m3 [B, H, S, D], of k − k_mean
    v_t: torch.Tensor        # e4m3 [B, H, D, S16]: v transposed, rows padded to a multiple of 16 (TMA)
    q_scale: torch.Tensor    # fp32 [B, H, nq]
    k_scale: torch.Tensor    # fp32 [B, H, nk]
    v_scale: torch.Tensor    # fp32 [B, H, D]
    k_mean: torch.Tensor     # fp32 [B, H, D]

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def fp8_unsupported(device) -> str:
    """Why FP8 attention cannot run on `device` ("" if it can): e4m3 tensor cores need compute
    capability ≥ 8.9; on the CPU only Triton's interpreter (tests) runs the kernel."""
    from .triton_sparse import INTERPRET

    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; e4m3 tensor "
                    f"cores need ≥ {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper)")
        return ""
    if device.type == "cpu" and INTERPRET:
        return ""
    return f"no e4m3 tensor cores on {device.type} (a CUDA GPU of compute capability ≥ 8.9 is needed)"


def smoothing_stats(k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(k's mean, v's largest |value|), fp32 `[B, H, D]`, of `[B, H, S, D]` tensors in any token order,
    over the tokens a key-padding mask `key_valid` (bool `[B or 1, S]`, same order) keeps, else all:
    padding keys, whose scores never count, must not set the offset smoothing removes or v's scales
    (a masked v beyond them saturates at ±448 in the e4m3 conversion, and weighs 0). The graph
    computes them before the reorder (two reductions Inductor may fuse into k's and v's producers)."""
    if key_valid is None:
        return k.float().mean(-2), v.float().abs().amax(-2)
    keep = key_valid[:, None, :, None]
    count = keep.sum(-2).clamp_min(1)
    return k.float().masked_fill(~keep, 0).sum(-2) / count, v.float().abs().masked_fill(~keep, 0).amax(-2)


def padded_rows(seq_len: int) -> int:
    """Row length of v's transposed tiles: a multiple of 16 bytes, as TMA descriptors need."""
    return -(-seq_len // 16) * 16


def saturated(x: torch.Tensor) -> torch.Tensor:
    """fp32 `x` as e4m3, beyond ±448 clipped to ±448 as Triton's conversion does. torch's own cast
    saturates on the CPU but gives NaN on CUDA (torch 2.11), and one NaN in v reaches every row's P·V."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


@functools.lru_cache(maxsize=None)
def rotation(dim: int, device=None) -> torch.Tensor:
    """M, fp32 `[dim, dim]` of 0 and ±1 (dim a multiple of 16), M·Mᵀ = Mᵀ·M = 8·I: H₈ ⊗ I_{dim/8} (each
    channel mixed with the 7 others dim/8 apart, H₈ Sylvester's) with its columns in the pass's order,
    column t = 16g + 2j + e of x·M being Σ_j' H₈[j, j']·x[2g + e + (dim/8)·j'] (pool_triton's
    `_rotated_channels`: each thread of the pass holds one group of 8 whole, in 16 adjacent columns).
    Built once per (dim, device) and shared (read only): a copy from host memory on every call would
    wait for the GPU's stream (a pageable host-to-device copy synchronizes it), once per site and step."""
    if dim % 16:
        raise ValueError(f"FP8's rotation takes channels in groups of 16: the head dim must be a multiple of 16; "
                         f"got {dim}")
    h = torch.ones(1, 1)
    while h.shape[0] < 8:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    t = torch.arange(dim)
    g, j, e = t // 16, (t // 2) % 8, t % 2
    m = torch.zeros(dim, dim)
    for j_in in range(8):
        m[2 * g + e + dim // 8 * j_in, t] = h[j, j_in]
    return m.to(device)


def quantize_tiles(q, k, v, k_mean, v_amax, block_size: int) -> FP8Tiles:
    """`FP8Tiles` of q, k, v `[B, H, S, D]` (already in tile order) in torch: the pass of
    pool_triton.tile_quant_qkv_triton, the same fp32 arithmetic, for the CPU and as its reference."""
    B, H, S, D = q.shape
    nb = -(-S // block_size)

    def per_block(x):   # (e4m3 x / σ, σ) with σ = amax over each block of tokens / 448
        xb = F.pad(x, (0, 0, 0, nb * block_size - S)).view(B, H, nb, block_size * D)
        amax = xb.abs().amax(-1).clamp_min(TINY)
        inv = (E4M3_MAX / amax).repeat_interleave(block_size, -1)[..., :S, None]
        return saturated(x * inv), amax * INV_E4M3_MAX

    m = rotation(D, q.device).double()      # the pass's sums of 8, to fp32's rounding
    q8, q_scale = per_block((q.double() @ m).float())
    k8, k_scale = per_block(((k.float() - k_mean.float()[:, :, None, :]).double() @ m).float())
    amax = v_amax.float().clamp_min(TINY)
    v8 = saturated(v.float() * (E4M3_MAX / amax)[:, :, None, :])
    v_t = torch.empty(B, H, D, padded_rows(S), dtype=E4M3, device=v.device)
    v_t[..., :S] = v8.transpose(-1, -2)
    v_t[..., S:] = 0
    return FP8Tiles(q8, k8, v_t, q_scale / 8, k_scale, amax * INV_E4M3_MAX, k_mean.float().contiguous())


def dequantize(tiles: FP8Tiles, block_size: int, dtype=torch.float64):
    """(q·M/8, (k − μ)·M, v) as the FP8 kernel sees them, in `dtype`: the tiles times their scales
    (q and k rotated by `rotation`; their products are q·(k − μ)ᵀ, and ·Mᵀ/8 undoes M)."""
    S = tiles.q.shape[-2]

    def per_block(x8, scale):
        return x8.to(dtype) * scale.to(dtype).repeat_interleave(block_size, -1)[..., :S, None]

    v = tiles.v_t[..., :S].transpose(-1, -2).to(dtype) * tiles.v_scale.to(dtype)[:, :, None, :]
    return per_block(tiles.q, tiles.q_scale), per_block(tiles.k, tiles.k_scale), v


def dequantized_keys(tiles: FP8Tiles, start: int, block_size: int) -> torch.Tensor:
    """Keys from tiled row `start` on, fp32, rotated back and the mean added: the few text keys
    rectification's estimate reads one by one (to within e4m3's rounding of (k − μ)·M)."""
    k8 = tiles.k[:, :, start:]
    blocks = torch.arange(start, start + k8.shape[-2], device=k8.device) // block_size
    rotated = k8.float() * tiles.k_scale[..., blocks, None]
    return rotated @ rotation(k8.shape[-1], k8.device).T / 8 + tiles.k_mean[:, :, None, :]
