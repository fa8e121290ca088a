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
falls monotonically with λ, changing only at the prices where some head steps: a binary search over
those prices finds the densest plan within the budget, per step range, union over inputs included;
each path is searched once (search.GreedyPath).
"""
from __future__ import annotations

import hashlib
import json

import torch

from ..plan import Plan, SitePlan
from ..schedule import make_schedule, range_site_name
from .patterns import DEFAULT_GROUPS, Family, checked_groups
from .search import SiteSearch, density, recall, search_paths, union
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


class StatsSearch:
    """Every site of one set of statistics searched once (greedy paths to their end, search.py); the
    masks at any λ are read off the paths. The first `dense_layers` sites (in call order) stay full."""

    def __init__(self, stats: CalibrationStats, tau: float, groups=DEFAULT_GROUPS, dense_layers: int = 0,
                 progress=None):
        by_layout: dict = {}
        for i, (name, s) in enumerate(stats.sites.items()):
            if i >= dense_layers:
                by_layout.setdefault(s.layout, {})[name] = s.mass
        self.stats, self.groups = stats, tuple(groups)
        self.paths = [search_paths(masses, Family(layout, self.groups), tau, progress)
                      for layout, masses in by_layout.items()]
        self.path_of = {name: paths for paths in self.paths for name in paths.masses}

    def at(self, lam: float) -> dict[str, SiteSearch]:
        found = {}
        for paths in self.paths:
            found.update(paths.at(lam))
        return {name: found[name] if name in found else self._full(name) for name in self.stats.sites}

    def steps_at(self, lam: float) -> dict[str, torch.Tensor]:
        """Per site, the steps each head takes at λ (none for a dense layer)."""
        out = {}
        for name, s in self.stats.sites.items():
            paths = self.path_of.get(name)
            if paths is None:
                out[name] = torch.zeros(s.heads, dtype=torch.long)
            else:
                start = paths.first_head(name)
                out[name] = paths.path.steps(lam)[start:start + s.heads]
        return out

    def head_blocks(self, name: str, heads: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        paths = self.path_of.get(name)
        if paths is None:
            return self._full(name).blocks[heads]
        return paths.head_blocks(name, heads, steps)

    def searched_density_at(self, lam: float) -> float:
        """Mean over every head of the searched masks' density at λ: at most the realised density, up
        to rounding (a realised map keeps every block its representative tiles keep, and maybe more)."""
        parts = [paths.path.density[paths.path.steps(lam), torch.arange(paths.path.density.shape[1])]
                 for paths in self.paths]
        dense = sum(s.heads for name, s in self.stats.sites.items() if name not in self.path_of)
        return (torch.cat(parts).sum().item() + dense) / sum(s.heads for s in self.stats.sites.values())

    def prices(self) -> torch.Tensor:
        """Every λ at which some head takes a step (a step of ratio 0 costs no recall: any λ takes it)."""
        ratios = torch.cat([paths.path.ratios.flatten() for paths in self.paths] or [torch.empty(0)])
        return ratios[ratios.isfinite() & (ratios > 0)]

    def _full(self, name: str) -> SiteSearch:   # a dense layer
        s = self.stats.sites[name]
        fam = Family(s.layout, self.groups)
        params = fam.full_params(s.heads)
        blocks = fam.block_map(params)
        return SiteSearch(params, blocks, recall(blocks, s.mass, s.layout), density(blocks),
                          [[(1.0, 1.0)] for _ in range(s.heads)])


def search_stats(stats: CalibrationStats, tau: float, lam: float, groups=DEFAULT_GROUPS, dense_layers: int = 0,
                 progress=None) -> dict[str, SiteSearch]:
    """Search every site of one step range at (τ, λ)."""
    return StatsSearch(stats, tau, groups, dense_layers, progress).at(lam)


class RangeSearch:
    """One step range's masks: searched on the accumulated statistics, OR-ed (merge "union") with each
    input's. Every search runs once; a λ then reads the masks off the greedy paths. The realised
    density of each head is kept per state (its steps in each search), so a bisection over λ
    realises only the heads whose state it has not seen."""

    def __init__(self, total: CalibrationStats, gens: list[CalibrationStats], tau: float, groups,
                 dense_layers: int, merge: str, progress=None):
        inputs = [total] + (gens if merge == "union" and len(gens) > 1 else [])
        self.searches = [StatsSearch(s, tau, groups, dense_layers, progress) for s in inputs]
        self.sites = total.sites
        self._density: dict = {}     # (site, head, steps in each search) → realised density

    def at(self, lam: float) -> dict[str, SiteSearch]:
        result = self.searches[0].at(lam)
        for search in self.searches[1:]:   # an input without some site (not called at its steps) adds nothing there
            for name, steps in search.steps_at(lam).items():
                result[name].blocks = union(result[name].blocks,
                                            search.head_blocks(name, torch.arange(len(steps)), steps))
        return result

    def density_at(self, lam: float) -> float:
        """Fraction of blocks computed at λ over every head of every site, each head counted once."""
        steps = [search.steps_at(lam) for search in self.searches]
        found = []
        for name, s in self.sites.items():
            having = [(search, st[name]) for search, st in zip(self.searches, steps) if name in st]
            keys = [(name, h, *(int(st[name][h]) if name in st else -1 for st in steps)) for h in range(s.heads)]
            missing = torch.tensor([h for h, key in enumerate(keys) if key not in self._density], dtype=torch.long)
            if len(missing):
                maps = union(*(search.head_blocks(name, missing, st[missing]) for search, st in having))
                for h, d in zip(missing.tolist(), density(maps).tolist()):
                    self._density[keys[h]] = d
            found += [self._density[key] for key in keys]
        return sum(found) / len(found)

    def searched_density_at(self, lam: float) -> float:
        return self.searches[0].searched_density_at(lam)

    def prices(self) -> torch.Tensor:
        """Every λ at which the plan can change, sorted: the smallest λ there is (before any step
        that costs recall, however little), then each price at which some head steps."""
        steps = torch.unique(torch.cat([search.prices().double() for search in self.searches]))
        before = steps[0].item() / 2 if len(steps) else 1.0
        return torch.cat([torch.tensor([before], dtype=torch.float64), steps])


def price_for_density(target: float, search: RangeSearch) -> float:
    """The smallest λ whose plan computes at most `target` of the blocks (the largest step price, the
    sparsest reachable plan, when the budget is below it). The density only changes at the prices
    where some head takes a step, so λ is one of them: a binary search over them. It starts where
    the searched density (free to read, a lower bound of the realised one up to rounding) meets the
    target, and widens upward from there, so it realises few heads beyond one plan's worth; a start
    past the answer (rounding) is caught and searched below."""
    prices = search.prices().tolist()
    if search.density_at(prices[-1]) > target:
        return prices[-1]
    meets = lambda i: search.density_at(prices[i]) <= target  # noqa: E731
    hi = len(prices) - 1                       # prices[hi] meets the budget; below lo, none does
    a, b = 0, hi
    while a < b:                               # where the searched density first meets it
        mid = (a + b) // 2
        if search.searched_density_at(prices[mid]) <= target:
            b = mid
        else:
            a = mid + 1
    lo, step, i = a, 1, a
    while not meets(i):                        # gallop up to a price that meets it
        lo, i, step = i + 1, min(i + step, hi), 2 * step
    hi = i
    if lo > 0 and meets(lo - 1):               # the lower bound failed (it should not): search all below
        lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid + 1
    return prices[hi]


def check_settings(recall: float, cost: float, density: float | None, merge: str, groups, dense_layers: int) -> None:
    """The search's settings, one ValueError naming a bad one: calibrate() checks them before it
    records anything (a bad one used to surface at .plan, after minutes of recording)."""
    if not 0.0 < recall < 1.0:
        raise ValueError(f"recall target τ must be in (0, 1), not {recall}")
    if not cost > 0:
        raise ValueError(f"cost limit λ must be > 0 (inf disables it), not {cost}")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], not {density}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, not {merge!r}")
    if isinstance(dense_layers, bool) or not isinstance(dense_layers, int) or dense_layers < 0:
        raise ValueError(f"dense_layers must be an int ≥ 0, not {dense_layers!r}")
    checked_groups(groups)


def build_plan(ranges: list[list[CalibrationStats]], *, recall_target: float = 0.9, cost: float = 0.011,
               groups=DEFAULT_GROUPS, dense_steps: int = 15, dense_layers: int = 0, merge: str = "union",
               density_target: float | None = None, progress=None) -> Plan:
    """`ranges[r]` = the per-generation statistics recorded in step range r (in schedule order).
    With `density_target`, each range's λ is the price that meets it (`cost` is not used) and
    `recall_target` is a per-head floor."""
    check_settings(recall_target, cost, density_target, merge, groups, dense_layers)
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
        search = RangeSearch(total, gens, recall_target, groups, dense_layers, merge, progress)
        lam = cost if density_target is None else price_for_density(density_target, search)
        result = search.at(lam)
        if density_target is not None:
            prices.append(dict(steps=list(total.steps), cost=lam, density=round(search.density_at(lam), 6)))
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
