"""`calibrate(model)`: run an unchanged model densely, record block attention mass, search a plan.

    with calibrate(pipe.transformer, recall=0.9, cost=0.011) as cal:
        pipe(prompts, num_inference_steps=50)          # or any calls of the model
    cal.plan.save("wan13b_480p.plan.safetensors")

Interception: for the duration of the `with`, the module's compiled-call slot (what
`nn.Module.compile` sets, and what `module(...)` runs when set) holds a small Python function that
(1) shows the call's `timestep` to the step clock (schedule.py), (2) runs the module compiled with
`backend="compact"`, `plan="dense"` and an `observer` that swaps every rewritten site's kernel for a
recording one, under `torch.no_grad()`. So a pipeline calling `pipe.transformer(...)` goes through
it unchanged. On exit the slot gets its old value back.

The recording kernel computes dense attention (the model's output is unchanged) and, when the step
is inside one of the step ranges to calibrate, the block mass A of every head
(stats.dense_attention_with_mass). Steps below `dense_steps` run plain dense attention and record
nothing: the plan computes them densely anyway. A model without a `timestep` input leaves the step
unknown; every call is then recorded into the first range.
"""
from __future__ import annotations

import inspect

import torch

from ..kernels.registry import sdpa_dense
from ..schedule import CLOCK, check_ranges
from .build import build_plan, check_settings
from .patterns import DEFAULT_GROUPS
from .stats import CalibrationStats, dense_attention_with_mass, save_stats


RECALL, COST = 0.9, 0.011          # τ and λ of Compact Attention's Wan setting
NO_RECALL_FLOOR = 1e-9             # with a density budget and no recall given: per head, no floor


def search_targets(recall: float | None, cost: float | None, density: float | None) -> tuple[float, float]:
    """(τ, λ) from what the caller gave: a density budget sets λ itself (a given cost contradicts
    it) and keeps τ only as a per-head floor if one is given."""
    if density is not None:
        if cost is not None:
            raise ValueError("give cost (λ) or density, not both: a density budget sets λ itself")
        return (NO_RECALL_FLOOR if recall is None else recall), COST
    return (RECALL if recall is None else recall), (COST if cost is None else cost)


class Calibration:
    def __init__(self, model: torch.nn.Module, *, recall: float | None = None, cost: float | None = None,
                 density: float | None = None, dense_steps: int = 15, dense_layers: int = 0, step_ranges=None,
                 groups=DEFAULT_GROUPS, merge: str = "union", inner: str = "inductor", options: dict | None = None):
        self.model = getattr(model, "_orig_mod", model)   # an OptimizedModule: calibrate what it wraps
        self.recall, self.cost = search_targets(recall, cost, density)
        check_settings(self.recall, self.cost, density, merge, groups, dense_layers)
        self.density, self.groups, self.merge = density, tuple(groups), merge
        self.dense_steps, self.dense_layers = dense_steps, dense_layers
        self.ranges = [(dense_steps, None)] if step_ranges is None else [tuple(r) for r in step_ranges]
        check_ranges(dense_steps, self.ranges)
        # the sites record dense attention in the inputs' dtype, whatever the options ask for inference
        self.options = dict(options or {}, plan="dense", dynamic=False, fp8_attention=False, observer=self._observe,
                            inner=inner)
        self.generations: list[list[CalibrationStats]] = [[] for _ in self.ranges]  # per range, per generation
        self._generation = None    # CLOCK.generation the last recorded call belonged to
        self._plan = None
        self._active = False
        self._step = None          # step of the call in progress (None: unknown)
        try:
            self._signature = inspect.signature(self.model.forward)
        except (TypeError, ValueError):
            self._signature = None

    # ---- interception ---------------------------------------------------------------------------
    def __enter__(self) -> "Calibration":
        compiled = torch.compile(self.model._call_impl, backend="compact", options=self.options, dynamic=False)
        self._previous = self.model._compiled_call_impl

        def call(*args, **kwargs):
            t = self._timestep(args, kwargs)
            if t is not None:
                CLOCK.observe(t)
            self._step = CLOCK.current if t is not None or CLOCK._pinned else None
            stats = self._stats_for(self._step)
            if stats is not None:
                stats.calls += 1
            with torch.no_grad():
                return compiled(*args, **kwargs)

        self.model._compiled_call_impl = call
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self.model._compiled_call_impl = self._previous
        self._active = False

    def _timestep(self, args, kwargs):
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if self._signature is None:
            return None
        try:
            return self._signature.bind_partial(*args, **kwargs).arguments.get("timestep")
        except TypeError:
            return None

    def _range_index(self, step: int | None) -> int | None:
        if step is None:
            return 0
        for i, (a, b) in enumerate(self.ranges):
            if a <= step and (b is None or step < b):
                return i
        return None

    def _stats_for(self, step: int | None) -> CalibrationStats | None:
        """The current generation's statistics of the range holding `step` (None: not calibrated)."""
        r = self._range_index(step)
        if r is None:
            return None
        gens = self.generations[r]
        if not gens or self._generation != CLOCK.generation:
            for i, rng in enumerate(self.ranges):   # a new generation: fresh statistics in every range
                self.generations[i].append(CalibrationStats(rng, generations=1))
            self._generation = CLOCK.generation
            self._plan = None
        return gens[-1]

    def _observe(self, spec, site):
        return _RecordingKernel(self, spec.name, spec.layout)

    def _attend(self, site, layout, q, k, v, scale, key_valid):
        stats = self._stats_for(self._step) if self._active else None
        if stats is None:
            return sdpa_dense(q, k, v, scale, key_valid)
        out, mass = dense_attention_with_mass(q, k, v, scale, layout.block_size, key_valid)
        stats.site(site, layout, q.shape[1], q.shape[3]).add(mass)
        self._plan = None
        return out

    # ---- results --------------------------------------------------------------------------------
    def _ranges_with_data(self) -> list[list[CalibrationStats]]:
        out = []
        for rng, gens in zip(self.ranges, self.generations):
            gens = [g for g in gens if g.sites]
            out.append(gens or [CalibrationStats(rng)])
        return out

    @property
    def plan(self):
        """The plan searched with this session's settings (computed once, after the last record)."""
        if self._plan is None:
            self._plan = self.search()
        return self._plan

    def search(self, recall: float | None = None, cost: float | None = None, density: float | None = None,
               progress=None):
        """Search the recorded statistics again, e.g. with another τ, λ or density budget (none given:
        this session's)."""
        if recall is None and cost is None and density is None:
            recall, cost, density = self.recall, self.cost, self.density
        tau, lam = search_targets(recall, cost if density is None else None, density)
        return build_plan(self._ranges_with_data(), recall_target=tau, cost=lam, density_target=density,
                          groups=self.groups, dense_steps=self.dense_steps, dense_layers=self.dense_layers,
                          merge=self.merge, progress=progress)

    def stats(self) -> list[CalibrationStats]:
        """Per step range, the statistics accumulated over every generation."""
        out = []
        for rng, gens in zip(self.ranges, self.generations):
            total = CalibrationStats(rng)
            for g in gens:
                total.merge(g)
            out.append(total)
        return out

    def save_stats(self, path) -> None:
        save_stats(self.stats(), path)


class _RecordingKernel:
    """A site runtime that computes dense attention and records its block mass (a dense plan's sites
    take no pooled statistics, so `__call__` is all the op needs)."""

    def __init__(self, session: Calibration, site: str, layout):
        self.session, self.site, self.layout = session, site, layout

    def __call__(self, q, k, v, scale=None, pools=None, key_valid=None):
        return self.session._attend(self.site, self.layout, q, k, v, scale, key_valid)


def calibrate(model: torch.nn.Module, *, recall: float | None = None, cost: float | None = None,
              density: float | None = None, dense_steps: int = 15, dense_layers: int = 0, step_ranges=None,
              groups=DEFAULT_GROUPS, merge: str = "union", inner: str = "inductor",
              options: dict | None = None) -> Calibration:
    """A context manager: inside it, calls of `model` (direct or from a pipeline) run dense attention
    and record statistics; `.plan` then searches them.

    recall (τ), cost (λ)   search targets (search.py), default 0.9 and 0.011; λ = float("inf") stops
                           on τ alone
    density                instead of λ: the fraction of blocks the plan may compute, over every head
                           of every site (build.py finds the λ that meets it, so each head gets the
                           share of the budget its attention needs); τ is then only a per-head floor,
                           none unless given
    dense_steps            denoising steps run dense at inference (and not recorded); default 15
    dense_layers           the first K attention sites (in call order) stay dense
    step_ranges            [(start, end), …] from dense_steps on (last end None = open): one mask per
                           range, reused over its steps; default one range [dense_steps, ∞)
    groups                 temporal-distance group edges in tile frames (patterns.py)
    merge                  "union" (per-input masks OR-ed, the paper's) or "mean" (one search on the
                           accumulated statistics)
    inner                  what compiles the rest of the graph ("inductor", "aot_eager", "eager")
    options                more backend options for the layout: grid, tile, block_size
    """
    return Calibration(model, recall=recall, cost=cost, density=density, dense_steps=dense_steps,
                       dense_layers=dense_layers, step_ranges=step_ranges, groups=groups, merge=merge, inner=inner,
                       options=options)
