"""Synthetic attention with planted per-head patterns, for the calibration tests.

For a planted tile mask M (a parameter set of the mask family), queries and keys are built so that
scale·q_i·k_j = β·M[tile(i), tile(j)] + small noise: factor M = U·Vᵀ (SVD), give each token its
tile's row of U (queries) or V (keys), times √β. Keys in the planted region then get e^β times the
weight of the others, so the planted mask holds nearly all of every query's attention mass.
"""
import torch

from compact_compile.calibrate.patterns import Family


def token_tiles(layout) -> torch.Tensor:
    """Tile id of every token of the tiled sequence (video tokens only)."""
    T, H, W = layout.grid
    raster = layout.source_index()[:layout.n_video]
    t, h, w = raster // (H * W), raster // W % H, raster % W
    _, nth, ntw = layout.tile_grid
    return (t // layout.tile[0] * nth + h // layout.tile[1]) * ntw + w // layout.tile[2]


def planted_qk(family: Family, params: torch.Tensor, beta: float = 8.0, noise: float = 0.05, seed: int = 0):
    """q, k `[1, H, S, n_tiles]` (use scale 1) with head h's attention concentrated on params[h]'s mask."""
    g = torch.Generator().manual_seed(seed)
    mask = family.tile_mask(params).double()                  # [H, nt, nt]
    u, s, vh = torch.linalg.svd(mask)
    qf, kf = u * s.sqrt()[:, None, :], vh.transpose(-1, -2) * s.sqrt()[:, None, :]
    tiles = token_tiles(family.layout)
    q = qf[:, tiles] * beta ** 0.5
    k = kf[:, tiles] * beta ** 0.5
    q = q + noise * torch.randn(q.shape, generator=g, dtype=q.dtype)
    k = k + noise * torch.randn(k.shape, generator=g, dtype=k.dtype)
    return q[None].float(), k[None].float()


def planted_params(family: Family) -> dict[str, torch.Tensor]:
    """One head of each kind, in the family's parameters `[G, 4]`."""
    _, nth, ntw = family.layout.tile_grid
    G = family.n_groups
    empty = torch.full((G, 4), -1)
    local = empty.clone()
    local[:2] = torch.tensor([1, 1, 1, 1])                        # 3×3 tiles, this and the next tile frame
    cross = torch.tensor([ntw - 1, 0, 0, nth - 1]).repeat(G, 1)   # own tile row ∪ own tile column, all frames
    stripe = torch.zeros(G, 4, dtype=torch.long)                  # own tile position in every frame
    full = family.full_params(1)[0]                               # uniform attention
    return dict(local=local, cross=cross, temporal=stripe, **{"global": full})
