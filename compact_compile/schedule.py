"""Step schedule: dense attention for the first denoising steps, the plan's sparse masks after, with
no user code telling the runtime which step it is in.

Where the step comes from: the model's `timestep` input. Within one generation a sampler feeds the
transformer strictly decreasing timesteps (noise level goes down), so the process-wide `CLOCK`
derives the step from the sequence of timestep values it is shown:

    value < previous    → next step            (step += 1)
    value == previous   → same step            (classifier-free guidance as two calls per step —
                                                cond and uncond share the timestep — or a second
                                                compiled graph of the same forward)
    value > previous    → a new generation     (step = 0)
    first value ever    → step 0

CFG as a batch of two is one call with a `[2]` timestep of equal values: one step per call. The
value used is the batch maximum (Wan 2.2 TI2V passes per-token timesteps `[B, S]`, whose maximum is
the noise level of the generated frames).

Who feeds the clock: the backend wraps a compiled graph that has a `timestep` input (Dynamo names
it `l_kwargs_timestep_` / `l_timestep_`) whenever its plan carries a schedule (`with_step_clock`),
reading the value before the graph runs (one host sync per forward; incompatible with CUDA graphs).
Calibration feeds it from the model call it intercepts. A graph without a timestep input (e.g.
regional compilation of the repeated blocks only) leaves the clock unfed; scheduled sites then
warn once and use their sparse masks at every step. Two pipelines interleaving their steps in one
process would confuse the one clock; Wan 2.2's two experts are fine (one shared timestep sequence).

Known trap: calling the model again and again with one constant timestep (a benchmark loop) is
"step 0" forever, hence dense under a schedule with dense steps. Pin the step for that:
`with compact_compile.schedule.at_step(30): model(...)`.

In a plan the schedule is `plan.info["schedule"]`; the `dense_steps` option gives built-in plans
(and plan files without one) the schedule "dense below step N, the masks after":
    {"dense_steps": 15, "ranges": [[15, 30], [30, null]], "step_source": "timestep"}
Steps below `dense_steps` are dense; range i (start ≤ step < end, end null = open) uses the site's
block map `name` for i = 0 and the extra plan entry `f"{name}@{start}"` for i > 0 (one mask reused
over neighbouring steps). The first K layers being dense is baked into the block maps (all ones).
The planner turns this into each site's step ranges (spec.py); a site's runtime (kernels/site.py)
reads the CLOCK on every call.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
import weakref

import torch

log = logging.getLogger("compact_compile")

STEP_SOURCE = "timestep"
_TIMESTEP_PLACEHOLDER = re.compile(r"^l_(kwargs_)?timestep_$")   # model(timestep=…) / forward frame
_POSITIONAL_PLACEHOLDER = re.compile(r"^l_args_(\d+)_$")           # model(x, t, …) through *args


class StepClock:
    """The current denoising step, derived from the timestep values shown to `observe`."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.step: int | None = None     # None: never fed (step unknown)
        self.generation = 0              # generations seen so far (a new one starts at step 0)
        self._last: float | None = None
        self._repeats = 0                # calls in a row at the current timestep
        self._pinned: list[int] = []
        self._followers = weakref.WeakSet()   # models whose calls feed it (follow_steps)
        self.last_tells_step = True      # the last timestep seen had one value per sample

    @property
    def followed(self) -> bool:
        """Some model's calls feed the clock: follow_steps' hook is in place (not removed)."""
        return any(m._compact_step_hook.id in m._forward_pre_hooks for m in self._followers)

    def observe(self, timestep) -> int:
        self.last_tells_step = tells_step(timestep)
        value = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last is None or value > self._last:
            self.step, self.generation = 0, self.generation + 1
            log.debug("compact: generation %d starts (timestep %g)", self.generation, value)
        elif value < self._last:
            self.step += 1
        self._repeats = self._repeats + 1 if value == self._last else 1
        self._last = value
        if self._repeats == SAME_TIMESTEP_CALLS and not self._pinned and _dense_steps_scheduled:
            warn_same_timestep(value, self.step)
        return self.step

    @property
    def current(self) -> int | None:
        """The step sites should act on: a pinned step if any, else the observed one."""
        return self._pinned[-1] if self._pinned else self.step


CLOCK = StepClock()
# a sampler feeds the clock a few times per timestep (classifier-free guidance as separate calls, a graph
# break that gives the timestep to two graphs); a benchmark loop, many more
SAME_TIMESTEP_CALLS = 16
_dense_steps_scheduled = False   # some site built in this process has dense warm-up steps


@contextlib.contextmanager
def at_step(step: int):
    """Act as if in denoising step `step`, whatever the timestep input says (benchmarks, tests)."""
    CLOCK._pinned.append(int(step))
    try:
        yield
    finally:
        CLOCK._pinned.pop()


# ---- the schedule as plan data -----------------------------------------------------------------

def make_schedule(dense_steps: int, ranges: list[tuple[int, int | None]] | None = None) -> dict:
    """Plan.info["schedule"]; `ranges` default to one open range from `dense_steps`."""
    ranges = [(dense_steps, None)] if not ranges else [tuple(r) for r in ranges]
    check_ranges(dense_steps, ranges)
    return dict(dense_steps=int(dense_steps), ranges=[[int(a), None if b is None else int(b)] for a, b in ranges],
                step_source=STEP_SOURCE)


def check_ranges(dense_steps: int, ranges) -> None:
    """Ranges must tile [dense_steps, end) without gaps; only the last may be open."""
    if dense_steps < 0:
        raise ValueError(f"dense_steps must be ≥ 0, not {dense_steps}")
    expect = dense_steps
    for i, (a, b) in enumerate(ranges):
        if a != expect or (b is not None and b <= a) or (b is None and i != len(ranges) - 1):
            raise ValueError(f"step ranges {list(ranges)} must follow each other from step {dense_steps} "
                             f"(start = previous end), non-empty, only the last open-ended")
        expect = b


def range_site_name(site: str, index: int, ranges) -> str:
    """Plan entry holding `site`'s block map for step range `index`."""
    return site if index == 0 else f"{site}@{ranges[index][0]}"


# ---- runtime -----------------------------------------------------------------------------------

_warned_unknown_step = False


def warn_unknown_step() -> None:
    """Once per process: a scheduled site ran without ever seeing a timestep."""
    global _warned_unknown_step
    if not _warned_unknown_step:
        _warned_unknown_step = True
        warnings.warn("compact: the plan has a step schedule (dense warm-up steps) but no timestep was seen (no "
                      "`timestep` input in the compiled graph, e.g. compile_repeated_blocks): sparse masks are used "
                      "at every step. compact_compile.follow_steps(model) feeds the model's timestep to the "
                      "schedule (with a built-in plan, dense_steps=0 turns the warm-up off).", stacklevel=3)


_warned_same_timestep = False


def warn_same_timestep(value: float, step: int) -> None:
    """Once per process: many calls at one timestep, as a benchmark loop makes, all count as one step."""
    global _warned_same_timestep
    if not _warned_same_timestep:
        _warned_same_timestep = True
        warnings.warn(f"compact: {SAME_TIMESTEP_CALLS} calls in a row at timestep {value:g} all count as denoising "
                      f"step {step}, and sites here run dense warm-up steps (the default dense_steps, or a plan's "
                      f"schedule): the early steps run dense attention. To time sparse attention, call with "
                      f"decreasing timesteps as a sampler does, or pin a step with "
                      f"compact_compile.schedule.at_step(n); with a built-in plan, dense_steps=0 turns the "
                      f"warm-up off.", stacklevel=3)


def reset_warnings() -> None:
    global _warned_unknown_step, _warned_same_timestep
    _warned_unknown_step = _warned_same_timestep = False


def site_schedule(plan, dense_steps: int) -> dict | None:
    """The schedule sites follow: the plan's own, else `dense_steps` dense steps then the masks
    (the `dense_steps` option; 0 = none)."""
    global _dense_steps_scheduled
    schedule = getattr(plan, "info", {}).get("schedule") if plan is not None else None
    schedule = schedule or (make_schedule(dense_steps) if dense_steps else None)
    _dense_steps_scheduled |= bool(schedule and schedule["dense_steps"])
    return schedule


def tells_step(timestep) -> bool:
    """A timestep with one value per sample tells the step. More values per sample (`[B, F]` per frame
    in diffusion forcing, `[B, S]` per token) do not: their maximum need not fall step after step (a
    frame starting from noise raises it)."""
    return not (isinstance(timestep, torch.Tensor) and timestep.dim() > 1 and timestep[0].numel() > 1)


def steps_readable(gm: torch.fx.GraphModule, example_inputs) -> bool:
    """Whether this graph's calls can know their denoising step, as the default warm-up needs: the graph
    has a timestep input that tells the step, or (no timestep input: e.g. a block graph of
    compile_repeated_blocks) follow_steps feeds the clock, and the model's call that is compiling this
    graph passed a timestep that tells it."""
    index = timestep_input(gm)
    if index is None:
        return CLOCK.followed and CLOCK.last_tells_step
    return index >= len(example_inputs) or tells_step(example_inputs[index])


def follow_steps(model: torch.nn.Module):
    """Feed the CLOCK from `model`'s `timestep` argument on every call, for compiled graphs that do not
    see it (compile_repeated_blocks compiles the blocks, whose inputs are the timestep's embedding).
    Returns the hook's handle (`.remove()` undoes it); a model already followed keeps its one hook."""
    import inspect

    handle = getattr(model, "_compact_step_hook", None)
    if handle is not None and handle.id in model._forward_pre_hooks:
        return handle

    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "timestep" not in params:
        raise TypeError(f"follow_steps: {type(model).__name__}.forward has no `timestep` argument "
                        f"(its arguments: {params})")
    position = params.index("timestep")

    def observe(module, args, kwargs):
        if torch.compiler.is_compiling():   # a whole-model graph reads its timestep input itself
            return
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[position] if position < len(args) else None
        if timestep is not None:
            CLOCK.observe(timestep)

    model._compact_step_hook = model.register_forward_pre_hook(observe, with_kwargs=True)
    CLOCK._followers.add(model)
    return model._compact_step_hook


def timestep_input(gm: torch.fx.GraphModule) -> int | None:
    """Position of the graph's `timestep` placeholder, if it has one.

    By name when the timestep was passed by keyword (`l_kwargs_timestep_`) or the compiled frame is
    the model's forward (`l_timestep_`). Otherwise the frame's `self` (read from Dynamo's current
    translator, a private API, hence the fallback to "not found") gives the forward signature: a
    wrapper's `forward(**kw)` passes it on as `l_kw_timestep_` (the name of its own **kwargs, so
    not an argument like prev_timestep), and a positional call through `Module.__call__(*args)`
    names it `l_args_1_`, which the signature maps to its name."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for i, name in enumerate(placeholders):
        if _TIMESTEP_PLACEHOLDER.match(name):
            return i
    try:
        import inspect

        from torch._dynamo.symbolic_convert import InstructionTranslator

        module = InstructionTranslator.current_tx().f_locals["self"]
        signature = inspect.signature(module.forward).parameters.values()
    except Exception:  # not inside Dynamo, or its internals moved: no mapping
        return None
    for p in signature:
        if p.kind is p.VAR_KEYWORD and f"l_{p.name}_timestep_" in placeholders:
            return placeholders.index(f"l_{p.name}_timestep_")
    params = [p for p in signature if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, name in enumerate(placeholders):
        m = _POSITIONAL_PLACEHOLDER.match(name)
        if m and int(m.group(1)) < len(params) and params[int(m.group(1))].name == "timestep":
            return i
    return None


def with_step_clock(gm: torch.fx.GraphModule, compiled, schedule: dict | None):
    """`compiled`, fed to the CLOCK from the graph's timestep input first when sites follow a
    schedule (else unchanged)."""
    if not schedule:
        return compiled
    index = timestep_input(gm)
    if index is None:
        return compiled

    def run(*args):
        CLOCK.observe(args[index])
        return compiled(*args)

    return run
