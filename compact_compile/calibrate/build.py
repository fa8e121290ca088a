"""Statistics → searched masks → a `Plan` with its schedule and provenance.

The plan holds one block map per site (and, for extra step ranges, one per `site@start` entry:
schedule.py); `plan.info` records how it was made, so a plan file explains itself:

    info["calibration"]  τ, λ, frame groups, dense layers, merge rule, inputs (calls, generations,
                         samples), step ranges, library and torch versions, model fingerprint
    info["schedule"]     dense steps and step ranges (the runtime follows it: schedule.py)
    info["heads"][entry] per head: recall and density of the stored mask on the calibration
                         statistics, pattern class, window params, and the greedy path (density,
                         recall) from full attention, for `compact-compile inspect | plot`

Merge over calibration inputs (`merge="union"`, the paper's): every generation's statistics are
searched on their own and the masks are OR-ed together with the mask searched on the statistics
accumulated over all of them; `merge="mean"` keeps only the latter. A union keeps every block any
input needed, so the stored recall (on the accumulated statistics) is ≥ τ either way.

A density budget (`density=0.1`: a tenth of all blocks, over every head of every site) replaces λ
by the price that meets it. λ is the recall a head may lose per unit of density it saves; one λ
for all heads stops each head where its next shrink costs more than λ, which is how a budget is
best shared (a head with concentrated attention gives up most of its blocks, a near-uniform head
few). Each head's greedy path is fixed and a larger λ only lets it go further, so the mean density
falls monotonically with λ: a bisection on log λ finds the densest plan within the budget, per
step range, union over inputs included.
"""
from __future__ import annotations

import hashlib
import json

import torch

from ..plan import Plan, SitePlan
from ..schedule import make_schedule, range_site_name
from .patterns import DEFAULT_GROUPS, Family
from .search import SiteSearch, density, recall, search_sites, union
from .stats import CalibrationStats

MERGES = ("union", "mean")


def fingerprint(stats: CalibrationStats) -> dict:
    """What identifies the model for this plan: site count, and each site's heads/head dim/tokens."""
    shapes = [[name, s.heads, s.head_dim, s.layout.seq_len] for name, s in stats.sites.items()]
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    kinds: dict[str, int] = {}
    for _, h, d, n in shapes:
        kinds[f"H{h} D{d} S{n}"] = kinds.get(f"H{h} D{d} S{n}", 0) + 1
    return dict(sites=len(shapes), shapes=kinds, digest=digest)


def search_stats(stats: CalibrationStats, tau: float, lam: float, groups=DEFAULT_GROUPS, dense_layers: int = 0,
                 progress=None) -> dict[str, SiteSearch]:
    """Search every site of one step range; the first `dense_layers` sites (in call order) stay full."""
    by_layout: dict = {}
    for i, (name, s) in enumerate(stats.sites.items()):
        if i >= dense_layers:
            by_layout.setdefault(s.layout, {})[name] = s.mass
    found = {}
    for layout, masses in by_layout.items():
        found.update(search_sites(masses, Family(layout, tuple(groups)), tau, lam, progress))
    out = {}
    for i, (name, s) in enumerate(stats.sites.items()):
        if name in found:
            out[name] = found[name]
        else:  # a dense layer
            fam = Family(s.layout, tuple(groups))
            p = fam.full_params(s.heads)
            blocks = fam.block_map(p)
            out[name] = SiteSearch(p, blocks, recall(blocks, s.mass, s.layout), density(blocks),
                                   [[(1.0, 1.0)] for _ in range(s.heads)])
    return out


def _search_range(total: CalibrationStats, gens: list[CalibrationStats], tau: float, lam: float, groups,
                  dense_layers: int, merge: str, progress=None) -> dict[str, SiteSearch]:
    """One step range's masks: searched on the accumulated statistics, OR-ed with each input's."""
    result = search_stats(total, tau, lam, groups, dense_layers, progress)
    if merge == "union" and len(gens) > 1:
        for g in gens:
            for name, res in search_stats(g, tau, lam, groups, dense_layers, progress).items():
                result[name].blocks = union(result[name].blocks, res.blocks)
    return result


def mean_density(result: dict[str, SiteSearch]) -> float:
    """Fraction of blocks computed over every head of every site, each head counted once."""
    return torch.cat([density(r.blocks) for r in result.values()]).mean().item()


LAMBDA_RANGE = (1e-8, 1e4)
BISECTIONS = 24   # λ to within a factor of 1e12 ** (1 / 2 ** 24) of the densest plan in budget


def price_for_density(target: float, search) -> tuple[float, dict[str, SiteSearch]]:
    """(λ, `search(λ)`) for the smallest λ whose plan computes at most `target` of the blocks; the
    sparsest reachable plan (largest λ) when the budget is below it."""
    lo, hi = LAMBDA_RANGE
    best = search(hi)
    if mean_density(best) > target:
        return hi, best
    for _ in range(BISECTIONS):
        mid = (lo * hi) ** 0.5
        found = search(mid)
        if mean_density(found) <= target:
            hi, best = mid, found
        else:
            lo = mid
    return hi, best


def build_plan(ranges: list[list[CalibrationStats]], *, recall_target: float = 0.9, cost: float = 0.011,
               groups=DEFAULT_GROUPS, dense_steps: int = 15, dense_layers: int = 0, merge: str = "union",
               density_target: float | None = None, progress=None) -> Plan:
    """`ranges[r]` = the per-generation statistics recorded in step range r (in schedule order).
    With `density_target`, each range's λ is the price that meets it (`cost` is not used) and
    `recall_target` is a per-head floor."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, not {merge!r}")
    if density_target is not None and not 0.0 < density_target <= 1.0:
        raise ValueError(f"density must be in (0, 1], not {density_target}")
    totals = []
    for r, gens in enumerate(ranges):
        total = CalibrationStats(gens[0].steps if gens else (0, None))
        for g in gens:
            total.merge(g)
        if not total.sites:
            raise ValueError(f"no attention statistics were recorded in step range {list(total.steps)}; "
                             f"the model was never called at those steps (check the step schedule: "
                             f"dense_steps / step_ranges, and that the model gets a `timestep` input)")
        totals.append(total)
    first = next(iter(totals[0].sites.values())).layout
    plan = Plan(first.grid, first.tile, first.block_size)
    heads_info, prices = {}, []
    for r, (total, gens) in enumerate(zip(totals, ranges)):
        if density_target is None:
            result = _search_range(total, gens, recall_target, cost, groups, dense_layers, merge, progress)
        else:
            lam, result = price_for_density(density_target, lambda lam, total=total, gens=gens: _search_range(
                total, gens, recall_target, lam, groups, dense_layers, merge))
            prices.append(dict(steps=list(total.steps), cost=lam, density=round(mean_density(result), 6)))
        for name, res in result.items():
            s = total.sites[name]
            if (s.layout.grid, s.layout.tile, s.layout.block_size) != (plan.grid, plan.tile, plan.block_size):
                raise ValueError(f"site {name!r} has layout {s.layout}, unlike the plan's first site {first}")
            res.recall, res.density = recall(res.blocks, s.mass, s.layout), density(res.blocks)
            entry = range_site_name(name, r, [t.steps for t in totals])
            plan.sites[entry] = SitePlan(s.heads, s.head_dim, s.layout.seq_len, s.layout.n_text,
                                         s.layout.n_before, res.blocks)
            fam = Family(s.layout, tuple(groups))
            heads_info[entry] = dict(
                recall=[round(float(x), 6) for x in res.recall],
                density=[round(float(x), 6) for x in res.density],
                pattern=[fam.classify(p) for p in res.params],
                params=res.params.tolist(),
                curve=[[[round(c, 5), round(v, 8)] for c, v in curve] for curve in res.curves])
    import compact_compile

    plan.info = dict(
        calibration=dict(
            recall=recall_target, cost=cost if density_target is None else None, density=density_target,
            prices=prices, groups=list(groups), dense_layers=dense_layers, merge=merge,
            inputs=dict(calls=sum(t.calls for t in totals), generations=max(t.generations for t in totals),
                        samples=max(s.samples for t in totals for s in t.sites.values())),
            steps=[list(t.steps) for t in totals], library=compact_compile.__version__,
            torch=torch.__version__.split("+")[0], fingerprint=fingerprint(totals[0])),
        schedule=make_schedule(dense_steps, [tuple(t.steps) for t in totals]),
        heads=heads_info)
    return plan
