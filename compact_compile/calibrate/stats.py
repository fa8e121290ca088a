"""Block attention mass, the statistic the mask search runs on, without ever holding the S×S map.

For one head with softmax probabilities p_ij = exp(s_ij − lse_i), s_ij = scale·q_i·k_j, and blocks of
`block_size` consecutive tokens of the tiled sequence (the last one possibly partial):

    A[n, m] = (1 / |n|) · Σ_{i ∈ n} Σ_{j ∈ m} p_ij          mean over n's query rows of the mass in m

Each row of A sums to 1. The recall of a block mask M is Σ_n (|n| / S) Σ_m M[n,m]·A[n,m]: the mean
over queries of the probability mass the mask keeps.

CPU (and any device without Triton): query chunks of whole blocks, float64 by default (the recorder
uses fp32: twice as fast, ~1e-7 off), O(chunk·S) memory. CUDA: dense attention from the flash
kernel, which also returns lse, then one Triton pass that re-forms p from lse and sums it per block
(triton_mass.py); O(blocks²) memory.

`SiteStats` accumulates A over calls and batch items (a running sum and a sample count); a
`CalibrationStats` holds the sites of one step range; `save_stats`/`load_stats` write them to a
safetensors file (the CLI can search a saved file again with other settings).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..layout import TokenLayout

STATS_FORMAT = "compact_compile.stats"
STATS_VERSION = 2   # 2: n_before (other tokens on both sides of the video)
CHUNK_ELEMENTS = 1 << 22     # scores per CPU chunk (32 MiB in float64)


def row_counts(seq_len: int, block_size: int) -> torch.Tensor:
    """Tokens per block |n| (the last block may be partial)."""
    nb = -(-seq_len // block_size)
    counts = torch.full((nb,), block_size, dtype=torch.float64)
    counts[-1] = seq_len - (nb - 1) * block_size
    return counts


def block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None, *,
               dtype: torch.dtype = torch.float64, chunk_rows: int | None = None,
               key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """A `[B, H, nb, nb]` in `dtype`, from q, k `[B, H, S, D]`, computed in query chunks; keys that
    `key_valid` (bool `[B or 1, S]`) excludes carry no mass."""
    B, H, S, D = q.shape
    nb = -(-S // block_size)
    scale = D ** -0.5 if scale is None else scale
    kt = k.to(dtype).transpose(-1, -2)
    if chunk_rows is None:  # whole blocks per chunk, so a chunk's rows map onto its own query blocks
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, B * H * S * block_size)) * block_size
    out = torch.empty(B, H, nb, nb, dtype=dtype, device=q.device)
    pad_k = nb * block_size - S
    for r0 in range(0, S, chunk_rows):
        r1 = min(S, r0 + chunk_rows)
        p = _masked_softmax((q[:, :, r0:r1].to(dtype) @ kt) * scale, key_valid)    # [B, H, c, S]
        p = F.pad(p, (0, pad_k)).unflatten(-1, (nb, block_size)).sum(-1)          # Σ_{j∈m}: [B, H, c, nb]
        pad_q = -(r1 - r0) % block_size
        p = F.pad(p, (0, 0, 0, pad_q)).unflatten(-2, (-1, block_size)).sum(-2)   # Σ_{i∈n}: [B, H, c/bs, nb]
        out[:, :, r0 // block_size: r0 // block_size + p.shape[-2]] = p
    return out / row_counts(S, block_size).to(out)[:, None]


def _masked_softmax(logits: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    if key_valid is None:
        return torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(~key_valid.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)   # a query with no valid key has no mass


def block_mass_reference(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None,
                         key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, written differently for tests: full float64 softmax, then block indicator
    matrices E (token → block): A = diag(1/|n|)·Eᵀ·P·E. O(S²) memory."""
    S, D = q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    p = _masked_softmax(q.double() @ k.double().transpose(-1, -2) * scale, key_valid)
    e = F.one_hot(torch.arange(S, device=q.device) // block_size).double()
    return (e.T @ p @ e) / e.sum(0)[:, None]


# ---- dense attention + its block mass, for the calibration kernel ---------------------------------

def _flash_with_lse(q, k, v, scale):
    """(output, natural-log lse `[B, H, S]` fp32) from cuDNN's attention (the fastest on Hopper, and
    what SDPA itself picks there) or else the flash kernel; None when neither takes these inputs
    (fp32, head dim, old GPU)."""
    B, H, S, _ = q.shape
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                      scale=scale)[:2]
        if lse.numel() == B * H * S:
            return out, lse.reshape(B, H, S).float()
    except (RuntimeError, AttributeError):
        pass
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    except RuntimeError:
        return None
    return out, lse


def dense_attention_with_mass(q, k, v, scale: float | None, block_size: int,
                              key_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(full attention output in q's dtype, A `[B, H, nb, nb]`), keys that `key_valid` excludes left
    out of both. The output is the same dense attention the model computes; the statistic costs one
    extra pass (CUDA) or a chunked fp32 recomputation (elsewhere)."""
    mask = None if key_valid is None else key_valid.bool()[:, None, None, :]
    if q.is_cuda:
        from . import triton_mass

        if triton_mass.supported(q):
            got = _flash_with_lse(q, k, v, scale) if key_valid is None else None
            if got is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
                lse = triton_mass.row_lse(q, k, scale, key_valid=key_valid)
            else:
                out, lse = got
            return out, triton_mass.block_mass(q, k, lse, block_size, scale, key_valid=key_valid)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out, block_mass(q, k, block_size, scale, dtype=torch.float32, key_valid=key_valid)   # fp32: 2× faster


# ---- accumulation -------------------------------------------------------------------------------

@dataclass
class SiteStats:
    """Running sum of A over samples (calls × batch items) for one attention site."""
    layout: TokenLayout
    heads: int
    head_dim: int
    mass_sum: torch.Tensor          # float64 [H, nb, nb], on the CPU
    samples: int = 0

    @classmethod
    def empty(cls, layout: TokenLayout, heads: int, head_dim: int) -> "SiteStats":
        nb = layout.n_blocks
        return cls(layout, heads, head_dim, torch.zeros(heads, nb, nb, dtype=torch.float64))

    def add(self, mass: torch.Tensor) -> None:
        """mass `[B, H, nb, nb]` (or `[H, nb, nb]`): one sample per batch item."""
        mass = mass if mass.dim() == 4 else mass[None]
        self.mass_sum += mass.detach().to("cpu", torch.float64).sum(0)
        self.samples += mass.shape[0]

    def merge(self, other: "SiteStats") -> None:
        if (other.layout, other.heads) != (self.layout, self.heads):
            raise ValueError("cannot merge statistics of different layouts or head counts")
        self.mass_sum += other.mass_sum
        self.samples += other.samples

    @property
    def mass(self) -> torch.Tensor:
        """Mean A over the samples, `[H, nb, nb]` float64."""
        if not self.samples:
            raise ValueError("no samples recorded")
        return self.mass_sum / self.samples


@dataclass
class CalibrationStats:
    """The sites' statistics over one step range, sites in the order they were first called."""
    steps: tuple[int, int | None] = (0, None)
    sites: dict[str, SiteStats] = field(default_factory=dict)
    calls: int = 0                  # model forward calls recorded
    generations: int = 0            # distinct generations (timestep sequences) among them

    def site(self, name: str, layout: TokenLayout, heads: int, head_dim: int) -> SiteStats:
        if name not in self.sites:
            self.sites[name] = SiteStats.empty(layout, heads, head_dim)
        return self.sites[name]

    def merge(self, other: "CalibrationStats") -> None:
        for name, s in other.sites.items():
            if name in self.sites:
                self.sites[name].merge(s)
            else:
                self.sites[name] = SiteStats(s.layout, s.heads, s.head_dim, s.mass_sum.clone(), s.samples)
        self.calls += other.calls
        self.generations += other.generations


def save_stats(ranges: list[CalibrationStats], path: str | Path) -> None:
    tensors, meta = {}, []
    for r, st in enumerate(ranges):
        sites = {}
        for i, (name, s) in enumerate(st.sites.items()):
            tensors[f"r{r}.s{i}"] = s.mass_sum.contiguous()
            L = s.layout
            sites[name] = dict(tensor=f"r{r}.s{i}", heads=s.heads, head_dim=s.head_dim, samples=s.samples,
                               grid=list(L.grid), tile=list(L.tile), block_size=L.block_size, n_text=L.n_text,
                               n_before=L.n_before)
        meta.append(dict(steps=list(st.steps), calls=st.calls, generations=st.generations, sites=sites))
    save_file(tensors, str(path), metadata={STATS_FORMAT: json.dumps(dict(version=STATS_VERSION, ranges=meta))})


def load_stats(path: str | Path) -> list[CalibrationStats]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            header = json.loads((f.metadata() or {})[STATS_FORMAT])
        tensors = load_file(str(path))
        if header.get("version") != STATS_VERSION:
            raise ValueError(f"stats format version {header.get('version')!r}, expected {STATS_VERSION}")
        out = []
        for r in header["ranges"]:
            st = CalibrationStats(tuple(r["steps"]), calls=r["calls"], generations=r["generations"])
            for name, s in r["sites"].items():
                layout = TokenLayout(tuple(s["grid"]), tuple(s["tile"]), s["block_size"], s["n_text"], s["n_before"])
                mass = tensors[s["tensor"]].to(torch.float64)
                if mass.shape != (s["heads"], layout.n_blocks, layout.n_blocks):
                    raise ValueError(f"site {name!r}: tensor shape {tuple(mass.shape)} does not match its layout")
                st.sites[name] = SiteStats(layout, s["heads"], s["head_dim"], mass, s["samples"])
            out.append(st)
        return out
    except Exception as e:  # one error type for every way a stats file can be unusable
        raise ValueError(f"{str(path)!r} is not a readable compact_compile statistics file ({e})") from None


def tokens_per_block_weight(layout: TokenLayout) -> torch.Tensor:
    """|n| / S per query block: the weight of block n's rows in a recall."""
    return row_counts(layout.seq_len, layout.block_size) / layout.seq_len


__all__ = ["CalibrationStats", "SiteStats", "block_mass", "block_mass_reference", "dense_attention_with_mass",
           "load_stats", "row_counts", "save_stats", "tokens_per_block_weight"]
