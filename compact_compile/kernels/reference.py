"""Float64 reference for block-sparse attention, written for clarity, not speed: expand the block
map to a token mask and run masked softmax attention on upcast inputs. O(S²) memory: tests only."""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F


def token_mask(blocks: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """bool `[..., S, S]`: query i may see key j iff block (i // bs, j // bs) is kept."""
    return blocks.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :seq_len, :seq_len]


def block_sparse_attention_reference(q, k, v, blocks, block_size: int, scale: float | None = None,
                                     key_valid=None):
    """softmax(q·kᵀ·scale masked to the kept blocks, and to the keys `key_valid` keeps)·v in float64;
    q, k, v `[B, H, S, D]`, blocks `[H or 1, n_blocks, n_blocks]` or `[B or 1, H or 1, …]`,
    key_valid bool `[B or 1, S]`. A query that keeps no key gets 0. Returns float64."""
    mask = token_mask(blocks.to(q.device), q.shape[-2], block_size)
    if key_valid is not None:
        mask = mask & key_valid.to(q.device, torch.bool)[:, None, None, :]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)


def rectified_attention_reference(q, k, v, *, n_video: int, block_size: int, static, dynamic: bool,
                                  rectify: bool, rows: bool = False, p_remain: float = 0.3, drop: float = 0.9,
                                  scale: float | None = None, keep=None, key_valid=None):
    """Rectified block-sparse attention (kernels/rectified.py) spelled out block by block in float64.
    Tokens at positions ≥ n_video are text. `keep` (bool `[B, H, nq, nk]`), if given, replaces the
    block selection. Keys where `key_valid` (bool `[B or 1, S]`) is False do not exist: not in any
    pooled mean or count, not among the text keys, not attended to. Returns (output, keep)."""
    given = keep
    q, k, v = q.double(), k.double(), v.double()
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    nb = -(-S // block_size)
    members = [list(range(n * block_size, min(S, (n + 1) * block_size))) for n in range(nb)]
    out = torch.empty(B, H, S, v.shape[-1], dtype=torch.float64)
    keep = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    valid = torch.ones(B, S, dtype=torch.bool) if key_valid is None else key_valid.cpu().bool().expand(B, S)
    for b in range(B):
        videos = [[j for j in m if j < n_video and valid[b, j]] for m in members]
        for h in range(H):
            def mean_mad(x, idx):
                if not idx:
                    return torch.zeros(x.shape[-1], dtype=x.dtype), torch.zeros(x.shape[-1], dtype=x.dtype)
                m = x[idx].mean(0)
                return m, (x[idx] - m).abs().mean(0)
            qs, ks, vs = q[b, h], k[b, h], v[b, h]
            q_stats = [mean_mad(qs, m) for m in members]
            k_stats = [mean_mad(ks, vid) for vid in videos]
            v_means = [mean_mad(vs, vid)[0] for vid in videos]

            def block_probs(qx):  # estimated full-attention mass of each key block for query vector qx
                logits, owner = [], []
                for m in range(nb):
                    if videos[m]:  # pooled video part: len·e^{q·k̄}
                        logits.append(qx @ k_stats[m][0] * scale + math.log(len(videos[m])))
                        owner.append(m)
                    for j in members[m]:
                        if j >= n_video and valid[b, j]:  # text tokens one by one
                            logits.append(qx @ ks[j] * scale)
                            owner.append(m)
                p = torch.softmax(torch.stack(logits), 0)
                return torch.zeros(nb, dtype=torch.float64).index_add(0, torch.tensor(owner), p)

            for n in range(nb):
                kept = static[min(h, static.shape[0] - 1), n].clone()
                if given is not None:
                    kept = given[b, h, n].clone()
                elif dynamic:
                    p = block_probs(q_stats[n][0])
                    ranked = sorted(range(nb), key=lambda m: -p[m].item())
                    covering, total = 1, 0.0
                    for m in ranked:
                        total += p[m].item()
                        if total <= p_remain:
                            covering += 1
                    for m in ranked[:max(covering, math.floor((1 - Fraction(str(drop))) * nb))]:   # exact
                        kept[m] = True
                keep[b, h, n] = kept
                cols = [j for m in range(nb) if kept[m] for j in members[m] if valid[b, j]]
                for i in members[n]:
                    a = torch.softmax(qs[i] @ ks[cols].T * scale, 0)
                    o = a @ vs[cols] if cols else torch.zeros(v.shape[-1], dtype=torch.float64)
                    if rectify:
                        qx = qs[i] if rows else q_stats[n][0]
                        p = block_probs(qx)
                        r, o_bar = 1.0, torch.zeros_like(o)
                        for m in range(nb):
                            if kept[m] or not videos[m]:
                                continue
                            km, kd = k_stats[m]
                            gain = abs(qx @ km)
                            error = abs(qx @ kd) if rows else abs(q_stats[n][1] @ km) + abs(qx @ kd)
                            if gain > error:
                                r -= p[m]
                                o_bar += p[m] * v_means[m]
                        o = r * o + o_bar
                    out[b, h, i] = o
    return out, keep


def fp8_attention_reference(tiles, blocks, block_size: int, scale: float | None = None, key_valid=None,
                            o_in_mma: bool = False):
    """(O, bound) for FP8 attention over `tiles` (kernels/fp8.py): O is block-sparse attention in
    float64 over the dequantized tiles — exactly the q, k − μ, v the kernel's e4m3 dots see (the
    shift μ changes no softmax) — and `bound` `[B, H, S, D]` the most the kernel may differ from O
    per element through quantizing P (448·p in e4m3, normaliser summed unrounded):
        |Õ − O|_id ≤ u·Σ_j a_ij·|ṽ_jd| + n_i·2^-10/448·max_j |ṽ_jd| + 2^-11·c_i·max_j |ṽ_jd|
    u = 2^-4 (rounding of a normal 448·p), n_i the keys row i keeps (each p below e4m3's normal range
    is off by at most half its 2^-9 step, /448), c_i = scale·max_j Σ_d |q̃_id·k̃_jd| bounding the
    score error of an fp32 accumulation as coarse as Hopper's e4m3 MMA (≥ 13 significand bits).
    `o_in_mma`: the kernel keeps O in the MMA accumulator across key tiles (FA4's), each k32 step
    adding at ~13 bits: + (n_i + 128)/32·2^-13·Σ_j a_ij·|ṽ_jd| (the Triton kernel adds each tile's
    P·V to O in fp32 registers instead).
    The output's own rounding to its dtype (and rectification's R·O + Ō) come on top."""
    from .fp8 import U, dequantize

    q, k, v = dequantize(tiles, block_size)
    S = q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = token_mask(blocks.to(q.device), S, block_size)
    if key_valid is not None:
        mask = mask & key_valid.to(q.device, torch.bool)[:, None, None, :]
    mask = mask.expand(q.shape[0], q.shape[1], S, S)
    a = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf).softmax(-1).nan_to_num(0.0)
    out = a @ v
    v_max = v.abs().amax(-2, keepdim=True)
    c = ((q.abs() @ k.abs().transpose(-1, -2)) * scale).masked_fill(~mask, 0).amax(-1, keepdim=True)
    n = mask.sum(-1, keepdim=True).double()
    a_v = a @ v.abs()
    bound = U * a_v + (n * 2.0 ** -10 / 448 + 2.0 ** -11 * c) * v_max
    if o_in_mma:
        bound = bound + (n + 128) / 32 * 2.0 ** -13 * a_v
    return out, bound
