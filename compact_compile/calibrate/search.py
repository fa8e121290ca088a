"""Greedy contraction of Compact Attention masks from full attention, every head at once.

Per head, start from full windows in every frame group; at each step evaluate every one-step shrink
of the head's parameters (patterns.py) and take the one with the least recall lost per compute saved,

    ratio = (R_before − R_after) / (C_before − C_after)      R: recall, C: density (fraction of blocks)

among the shrinks that keep R_after ≥ τ. Stop the head when no shrink keeps recall ≥ τ or the best
ratio exceeds λ. Both R and C are fractions of the whole, so ratio 1 means "as dense as uniform
attention": λ = 0.011 drops a region only while its attention is under 1.1% of uniform density.
(We read the paper's "stop when recall would fall below τ" as "take only shrinks that keep τ", which
can only go further while still guaranteeing it.)

Moves per frame group on (ω1, η1, ω2, η2): shrink one parameter; shrink both windows' ω (or η) —
the box move, needed while the windows are equal because one alone changes nothing; shrink η1 with
ω2 (or ω1 with η2) — carving a cross out of a box; drop the group (skip those frames). Group 0 (the
query's own frames) always keeps a window, so every query block keeps at least its own key block,
whatever τ, λ or a density budget allow.

Every candidate is evaluated in O(1) from 2D prefix sums. For a group g let
    Hm[g, dh, dw] = Σ (|n|/S)·A[n, m] over video block pairs (n, m) whose representative tiles are at
                    temporal group g and spatial offset (dh, dw),   Pm = its 2D prefix sum,
so one window (ω, η) keeps Pm[g, η+1, ω+1] (index 0 = empty) and the union of two keeps
    U(ω1, η1, ω2, η2) = Pm(ω1, η1) + Pm(ω2, η2) − Pm(min ω, min η)    (inclusion–exclusion).
Blocks holding text are always kept: their mass and count are constants. Recall of the head =
const + Σ_g U_g, density likewise with block counts. A 30-layer × 12-head model is one batched loop
of ~100 small tensor steps.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .patterns import Family
from .stats import tokens_per_block_weight

# one-step shrinks of (ω1, η1, ω2, η2); the last move (drop the group) is added separately
MOVES = torch.tensor([[-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 0], [0, 0, 0, -1],
                      [-1, 0, -1, 0], [0, -1, 0, -1], [0, -1, -1, 0], [-1, 0, 0, -1]])
RECALL_MARGIN = 1e-12   # keep a hair above τ so float summation order cannot put a mask under it


def recall(blocks: torch.Tensor, mass: torch.Tensor, layout) -> torch.Tensor:
    """Mean over queries of the attention mass a block map keeps: Σ_n (|n|/S) Σ_m M[n,m]·A[n,m].
    blocks `[H or 1, nb, nb]`, mass `[H, nb, nb]` → `[H]` float64."""
    w = tokens_per_block_weight(layout).to(mass.device)
    return (blocks.to(mass.dtype) * mass * w[:, None]).sum((-1, -2))


def density(blocks: torch.Tensor) -> torch.Tensor:
    """Fraction of (query block, key block) pairs kept, per head."""
    return blocks.double().mean((-1, -2))


def union(*block_maps: torch.Tensor) -> torch.Tensor:
    """Blocks kept by any of the masks (the conservative merge over calibration inputs)."""
    out = block_maps[0].clone()
    for b in block_maps[1:]:
        out |= b
    return out


@dataclass
class SiteSearch:
    params: torch.Tensor       # int64 [H, G, 4]
    blocks: torch.Tensor       # bool [H, nb, nb], realised (≥ the searched mask)
    recall: torch.Tensor       # float64 [H], of `blocks` on the statistics searched
    density: torch.Tensor      # float64 [H]
    curves: list               # per head [(density, recall), …] along the greedy path, from full


@dataclass
class _Tables:
    mass: torch.Tensor         # [N, G, F] prefix sums of weighted mass, F = (nth+1)·(ntw+1)
    count: torch.Tensor        # [G, F] prefix sums of block-pair counts / nb²
    const_mass: torch.Tensor   # [N] recall of the always-kept (text) blocks
    const_count: float         # their density


def _tables(mass: torch.Tensor, family: Family) -> _Tables:
    layout = family.layout
    _, nth, ntw = layout.tile_grid
    G, nb = family.n_groups, layout.n_blocks
    vb, bins, counts = _pair_bins(layout, family.groups)
    w = tokens_per_block_weight(layout)
    weighted = mass * w[None, :, None]
    video = weighted if len(vb) == nb else weighted[:, vb][:, :, vb]
    hm = torch.zeros(mass.shape[0], G * nth * ntw, dtype=torch.float64).index_add_(1, bins, video.flatten(1))
    hc = counts / nb ** 2
    return _Tables(_prefix(hm.view(-1, G, nth, ntw)), _prefix(hc.view(G, nth, ntw)),
                   weighted.sum((1, 2)) - hm.sum(1), 1.0 - hc.sum().item())


@functools.lru_cache(maxsize=64)
def _pair_bins(layout, groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Video blocks, the (group, |Δh|, |Δw|) bin of each pair of their representative tiles, and
    the number of pairs per bin."""
    family = Family(layout, groups)
    _, nth, ntw = layout.tile_grid
    rep, searchable = family.block_representatives()
    vb = searchable.nonzero().flatten()
    g, dh, dw = family.tile_offsets()
    r = rep[vb]
    bins = ((g[r][:, r] * nth + dh[r][:, r]) * ntw + dw[r][:, r]).flatten()
    return vb, bins, torch.bincount(bins, minlength=family.n_groups * nth * ntw).double()


def _prefix(h: torch.Tensor) -> torch.Tensor:
    """P[..., i, j] = Σ_{dh < i, dw < j} h, flattened over (i, j); row/column 0 are the empty window."""
    p = torch.nn.functional.pad(h.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    return p.flatten(-2)


def _union(prefix: torch.Tensor, params: torch.Tensor, ntw: int) -> torch.Tensor:
    """U of params `[..., 4]` from prefix sums `[..., F]` (broadcast over leading dims)."""
    def rect(w, h):
        return torch.gather(prefix, -1, ((h + 1) * (ntw + 1) + (w + 1)).clamp(min=0)[..., None])[..., 0]
    w1, h1, w2, h2 = params.unbind(-1)
    prefix = prefix.expand(*params.shape[:-1], prefix.shape[-1])
    return rect(w1, h1) + rect(w2, h2) - rect(torch.minimum(w1, w2), torch.minimum(h1, h2))


def _normalise(params: torch.Tensor) -> torch.Tensor:
    """A window with a negative extent is empty: write it (−1, −1)."""
    p = params.clone()
    for a in (0, 2):
        empty = (p[..., a] < 0) | (p[..., a + 1] < 0)
        p[..., a][empty] = -1
        p[..., a + 1][empty] = -1
    return p


def greedy(tables: _Tables, family: Family, tau: float, params: torch.Tensor) -> "GreedyPath":
    """Contract params `[N, G, 4]` for N heads at once, each head to the end of its path (no shrink
    keeps recall ≥ τ). λ is not needed here: it only says where along the path a head stops."""
    ntw = family.layout.tile_grid[2]
    N, G, _ = params.shape
    moves = torch.cat([MOVES, torch.zeros(1, 4, dtype=MOVES.dtype)])     # last row: drop, set below
    um, uc = _union(tables.mass, params, ntw), _union(tables.count[None], params, ntw)
    R, C = tables.const_mass + um.sum(1), tables.const_count + uc.sum(1)
    states, ratios, densities, recalls = [params.clone()], [], [C.clone()], [R.clone()]
    rows = torch.arange(N)
    while True:
        cand = params[:, :, None, :] + moves                               # [N, G, 9, 4]
        cand[:, :, -1] = -1                                                # drop the group
        valid = (cand >= -1).all(-1) & ~(params[:, :, None, :] == -1).all(-1)
        cand = _normalise(cand.clamp(min=-1))
        # group 0 holds each query block's own key block (temporal and spatial offset 0): keep one window
        # there, or a query block could end up attending to nothing (a zero output; Plan refuses it)
        valid[:, 0] &= ~(cand[:, 0] == -1).all(-1)
        new_m = _union(tables.mass[:, :, None, :], cand, ntw)
        new_c = _union(tables.count[None, :, None, :], cand, ntw)
        loss = (um[..., None] - new_m).clamp(min=0)
        saved = uc[..., None] - new_c
        ok = valid & (saved > 1e-15) & (R[:, None, None] - loss >= tau + RECALL_MARGIN)
        ratio = torch.where(ok, loss / saved.clamp(min=1e-30), torch.inf)
        # least recall lost per compute saved; among equal ratios (e.g. zero loss) the larger saving
        best = (ratio - 1e-9 * saved).flatten(1).argmin(1)
        g, j = best // moves.shape[0], best % moves.shape[0]
        best_ratio = ratio[rows, g, j]
        moving = torch.isfinite(best_ratio)
        if not moving.any():
            break
        i = rows[moving]
        params[i, g[moving]] = cand[i, g[moving], j[moving]]
        um[i, g[moving]] = new_m[i, g[moving], j[moving]]
        uc[i, g[moving]] = new_c[i, g[moving], j[moving]]
        R, C = tables.const_mass + um.sum(1), tables.const_count + uc.sum(1)
        states.append(params.clone())
        ratios.append(best_ratio)
        densities.append(C.clone())
        recalls.append(R.clone())
    return GreedyPath(torch.stack(states), torch.stack(ratios) if ratios else torch.empty(0, N, dtype=torch.float64),
                      torch.stack(densities), torch.stack(recalls))


@dataclass
class GreedyPath:
    """Every head's greedy path from full attention to its end. A head's path does not depend on λ
    (each step takes the least ratio there is); λ stops the head at its first step whose ratio exceeds
    λ. So one path serves every λ: a density budget's bisection over λ reads it, never searches again."""
    params: torch.Tensor       # int64 [T + 1, N, G, 4]: after t steps (a head at its end keeps its params)
    ratios: torch.Tensor       # float64 [T, N]: the ratio of each head's step t (inf: no step left)
    density: torch.Tensor      # float64 [T + 1, N], of the searched (not realised) masks
    recall: torch.Tensor       # float64 [T + 1, N]

    def steps(self, lam: float) -> torch.Tensor:
        """Steps each head takes under λ: those before its first ratio above λ."""
        if not lam > 0:
            raise ValueError(f"cost limit λ must be > 0 (inf disables it), not {lam}")
        return ((self.ratios <= lam) & self.ratios.isfinite()).long().cumprod(0).sum(0)

    def params_at(self, lam: float) -> torch.Tensor:
        return self.params[self.steps(lam), torch.arange(self.params.shape[1])]

    def curves_at(self, lam: float) -> list:
        """Per head [(density, recall), …] from full attention to where λ stops it."""
        return [[(float(self.density[t, h]), float(self.recall[t, h])) for t in range(int(n) + 1)]
                for h, n in enumerate(self.steps(lam))]


@dataclass
class SitePaths:
    """The greedy paths of every head of some sites of one layout, and what realises them at a λ."""
    family: Family
    masses: dict               # {site: A [H, nb, nb]} float64 on the CPU
    path: GreedyPath           # heads of all sites, in `masses` order

    def first_head(self, name: str) -> int:
        """Index in the path of site `name`'s head 0."""
        start = 0
        for other, mass in self.masses.items():
            if other == name:
                return start
            start += mass.shape[0]
        raise KeyError(name)

    def head_blocks(self, name: str, heads: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Realised block maps of some heads of site `name`, each after its given number of steps."""
        return self.family.block_map(self.path.params[steps, self.first_head(name) + heads])

    def blocks_at(self, lam: float) -> dict[str, torch.Tensor]:
        """Each site's realised block maps at λ (bool [H, nb, nb])."""
        params, out, start = self.path.params_at(lam), {}, 0
        for name, mass in self.masses.items():
            out[name] = self.family.block_map(params[start:start + mass.shape[0]])
            start += mass.shape[0]
        return out

    def at(self, lam: float) -> dict[str, SiteSearch]:
        """Each site's masks at λ, measured exactly on its statistics."""
        params, curves, start, out = self.path.params_at(lam), self.path.curves_at(lam), 0, {}
        for name, blocks in self.blocks_at(lam).items():
            h = blocks.shape[0]
            out[name] = SiteSearch(params[start:start + h], blocks, recall(blocks, self.masses[name], self.family.layout),
                                   density(blocks), curves[start:start + h])
            start += h
        return out


def search_paths(masses: dict[str, torch.Tensor], family: Family, tau: float = 0.9, progress=None) -> SitePaths:
    """The greedy paths of every head of every site (`{name: A [H, nb, nb]}`, all of `family`'s
    layout), in one batched loop."""
    if not 0.0 < tau < 1.0:
        raise ValueError(f"recall target τ must be in (0, 1), not {tau}")
    masses = {name: m.double().cpu() for name, m in masses.items()}
    parts = []
    for mass in masses.values():
        parts.append(_tables(mass, family))
        if progress is not None:
            progress.update(1)
    tables = _Tables(torch.cat([t.mass for t in parts]), parts[0].count,
                     torch.cat([t.const_mass for t in parts]), parts[0].const_count)
    heads = sum(m.shape[0] for m in masses.values())
    return SitePaths(family, masses, greedy(tables, family, tau, family.full_params(heads)))


def search_sites(masses: dict[str, torch.Tensor], family: Family, tau: float = 0.9, lam: float = 0.011,
                 progress=None) -> dict[str, SiteSearch]:
    """Search every head of every site at (τ, λ); realise each site's block maps and measure them exactly."""
    return search_paths(masses, family, tau, progress).at(lam)
