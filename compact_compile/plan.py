"""Plan: which key blocks every query block of every head of every attention site computes.

Plain data, like FlexAttention's `BlockMask`: a token layout shared by the model (grid, tile, block
size) and, per site (named by its module path, e.g. `blocks.3.attn1`), a bool block map
`[heads or 1, n_blocks, n_blocks]` over the tiled sequence. On disk: one safetensors file, block maps
bit-packed along the key axis, everything else in JSON metadata. Loading checks all of it.

Integrity: each site's metadata holds `sha256`, the SHA-256 of its packed block-map bytes, checked
on load, so a bit flipped inside the block data (which safetensors alone would load without a
word: any byte is a valid uint8) is a PlanError saying the file is corrupt. Files written before
the checksum existed have no `sha256` and still load, unchecked. The format version stays 1: the
key is optional and additive, so files stay readable both ways (an older compact_compile ignores
it), where a version bump would make older installs refuse every newly calibrated plan.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import PlanError
from .layout import Grid, TokenLayout
from .schedule import check_ranges, range_site_name

FORMAT = "compact_compile.plan"
FORMAT_VERSION = 2   # 2: a site's other tokens may sit on both sides of the video (n_before)
READS_VERSIONS = (1, 2)


@dataclass
class SitePlan:
    heads: int
    head_dim: int
    seq_len: int
    n_text: int
    n_before: int        # of the n_text other tokens, how many come before the video's
    blocks: torch.Tensor  # bool [heads or 1, n_blocks, n_blocks]

    @property
    def density(self) -> float:
        return self.blocks.float().mean().item()


@dataclass
class Plan:
    grid: Grid
    tile: Grid
    block_size: int
    sites: dict[str, SitePlan] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # free-form provenance (search settings, inputs, …)

    def check(self, where: str = "plan") -> "Plan":
        """One PlanError naming the problem if the plan is not well formed (what loading a file checks,
        for a plan made in memory): the layout, each site's block map (bool [1 or heads, nb, nb], every
        query block attending to something), and a schedule in `info` (ranges that follow each other,
        an entry `name@start` for every later range of every site). Returns the plan."""
        if not (_positive_ints(list(self.grid), 3) and _positive_ints(list(self.tile), 3)
                and _positive_ints([self.block_size], 1) and math.prod(self.tile) == self.block_size):
            raise PlanError(f"{where}: grid {self.grid!r}, tile {self.tile!r}, block_size {self.block_size!r}: want "
                            f"3 + 3 positive ints and a tile of block_size tokens")
        if not isinstance(self.info, dict):
            raise PlanError(f"{where}: info must be a dict, not {type(self.info).__name__}")
        for name, s in self.sites.items():
            try:
                nb = TokenLayout(self.grid, self.tile, self.block_size, s.n_text, s.n_before).n_blocks
            except ValueError as e:
                raise PlanError(f"{where}: site {name!r}: {e}") from None
            b = s.blocks
            if not (isinstance(b, torch.Tensor) and b.dtype == torch.bool and b.dim() == 3
                    and b.shape[0] in (1, s.heads) and tuple(b.shape[1:]) == (nb, nb)):
                raise PlanError(f"{where}: site {name!r} block map is {getattr(b, 'dtype', type(b).__name__)} "
                                f"{tuple(getattr(b, 'shape', ()))}, expected bool (1 or {s.heads}, {nb}, {nb})")
            if not b.any(-1).all():
                raise PlanError(f"{where}: site {name!r} has a query block that attends to nothing")
        schedule = self.info.get("schedule")
        if schedule is not None:
            try:
                ranges = [tuple(r) for r in schedule["ranges"]]
                check_ranges(int(schedule["dense_steps"]), ranges)
            except (KeyError, TypeError, ValueError) as e:
                raise PlanError(f"{where}: its schedule {schedule!r} is malformed ({e})") from None
            for name in [n for n in self.sites if "@" not in n]:
                missing = [range_site_name(name, i, ranges) for i in range(1, len(ranges))
                           if range_site_name(name, i, ranges) not in self.sites]
                if missing:
                    raise PlanError(f"{where}: its schedule has step ranges {ranges} but no entry {missing[0]!r} "
                                    f"for site {name!r}'s")
        return self

    def layout(self, site: str) -> TokenLayout:
        s = self.sites[site]
        return TokenLayout(self.grid, self.tile, self.block_size, s.n_text, s.n_before)

    def save(self, path: str | Path) -> None:
        tensors, sites = {}, {}
        for i, (name, s) in enumerate(self.sites.items()):
            packed = _pack_bits(s.blocks.bool().cpu())
            tensors[f"site{i}"] = packed
            sites[name] = dict(tensor=f"site{i}", heads=s.heads, head_dim=s.head_dim, seq_len=s.seq_len,
                               n_text=s.n_text, n_before=s.n_before, mask_heads=s.blocks.shape[0],
                               sha256=_sha256(packed))
        meta = dict(format=FORMAT, version=FORMAT_VERSION, grid=list(self.grid), tile=list(self.tile),
                    block_size=self.block_size, sites=sites, info=self.info)
        save_file(tensors, str(path), metadata={"compact_compile": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist")
        try:
            tensors = load_file(str(path))
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            meta = json.loads(header["__metadata__"]["compact_compile"])
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise PlanError(f"{str(path)!r} is not a readable compact_compile plan file ({e})") from None
        return cls._from_parts(meta, tensors, str(path))

    @classmethod
    def _from_parts(cls, meta: dict, tensors: dict, where: str) -> "Plan":
        if not isinstance(meta, dict):
            raise PlanError(f"{where!r}: plan metadata is incomplete or malformed (not a JSON object)")
        if meta.get("format") != FORMAT:
            raise PlanError(f"{where!r}: not a compact_compile plan (format {meta.get('format')!r})")
        if meta.get("version") not in READS_VERSIONS:
            raise PlanError(f"{where!r}: plan format version {meta.get('version')!r}; "
                            f"this compact_compile reads versions {READS_VERSIONS}")
        try:
            grid, tile, block_size = meta["grid"], meta["tile"], meta["block_size"]
            if not (_positive_ints(grid, 3) and _positive_ints(tile, 3) and _positive_ints([block_size], 1)
                    and math.prod(tile) == block_size and isinstance(meta["sites"], dict)):
                raise ValueError(f"grid {grid!r}, tile {tile!r}, block_size {block_size!r}, sites of type "
                                 f"{type(meta['sites']).__name__}: want 3 + 3 positive ints, tile of block_size "
                                 f"tokens, and a dict of sites")
            plan = cls(tuple(grid), tuple(tile), block_size, info=meta.get("info", {}))
            for name, s in meta["sites"].items():
                layout = TokenLayout(plan.grid, plan.tile, plan.block_size, int(s["n_text"]), _n_before(s))
                nb = layout.n_blocks
                packed = tensors[s["tensor"]]
                if packed.dtype != torch.uint8 or packed.shape != (s["mask_heads"], nb, math.ceil(nb / 8)):
                    raise PlanError(f"{where!r}: site {name!r} block map has shape {tuple(packed.shape)} "
                                    f"{packed.dtype}, expected ({s['mask_heads']}, {nb}, {math.ceil(nb / 8)}) uint8")
                if "sha256" in s and _sha256(packed) != s["sha256"]:   # files from before the checksum: none
                    raise PlanError(f"{where!r} is corrupt: the block map of site {name!r} (tensor {s['tensor']!r}) "
                                    f"does not match the SHA-256 it was saved with; the file was damaged after it "
                                    f"was written: copy it again or recalibrate")
                if s["mask_heads"] not in (1, s["heads"]) or layout.seq_len != s["seq_len"]:
                    raise PlanError(f"{where!r}: site {name!r} metadata is inconsistent")
                blocks = _unpack_bits(packed, nb)
                plan.sites[name] = SitePlan(int(s["heads"]), int(s["head_dim"]), int(s["seq_len"]),
                                            int(s["n_text"]), _n_before(s), blocks)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, PlanError):
                raise
            raise PlanError(f"{where!r}: plan metadata is incomplete or malformed ({e!r})") from None
        return plan.check(repr(where))


def _positive_ints(x, n: int) -> bool:
    return (isinstance(x, list) and len(x) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in x))


def _sha256(packed: torch.Tensor) -> str:
    return hashlib.sha256(packed.contiguous().numpy().tobytes()).hexdigest()


def _pack_bits(x: torch.Tensor) -> torch.Tensor:
    pad = (-x.shape[-1]) % 8
    x = torch.nn.functional.pad(x.to(torch.uint8), (0, pad)).unflatten(-1, (-1, 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (x * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(x: torch.Tensor, n: int) -> torch.Tensor:
    bits = (x[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten(-2)[..., :n].bool()


def _n_before(site: dict) -> int:
    """Of a site's other tokens, how many come before the video's: `n_before` (version 2), or all or
    none of them as `text_first` said (version 1)."""
    if "n_before" in site:
        return int(site["n_before"])
    return int(site["n_text"]) if site["text_first"] else 0
