"""CompactOptions: everything `torch.compile(m, backend="compact", options={...})` understands.

    plan        "window" (default: a 3D local window, no calibration), "dense" (every block: the model
                is unchanged up to rounding), a path to a plan file, or a `Plan`. Without `plan` in
                options, the environment variable COMPACT_PLAN is used when set.
    window      window extent in tiles (t, h, w) for plan="window"; odd numbers, default (3, 3, 3).
    grid        (T, H, W) video tokens; default: inferred from the graph (patch-embedding conv).
    tile        (tt, th, tw) tokens per tile, tt·th·tw = block_size; default "auto".
    block_size  64 or 128 tokens per attention block; default: the plan file's, else 128.
    kernel      "flex" (FlexAttention) or "auto" (the fastest available; today Flex).
    strict      True: a plan that does not fit a site is an error. False: that site stays dense,
                with a warning and a report entry.
    inner       what compiles the rewritten graph: "inductor" (default), "aot_eager" or "eager".
    observer    advanced: a callable `(site_name, layout, kernel) -> kernel` that wraps every
                rewritten site's kernel (calibration uses it to record attention statistics).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from .plan import Plan

BUILTIN_PLANS = ("dense", "window")
KERNELS = ("flex", "auto")
INNER_BACKENDS = ("inductor", "aot_eager", "eager")


class OptionsError(ValueError):
    pass


@dataclass(frozen=True)
class CompactOptions:
    plan: str | Path | Plan = "window"
    window: tuple[int, int, int] = (3, 3, 3)
    grid: tuple[int, int, int] | None = None
    tile: tuple[int, int, int] | str = "auto"
    block_size: int | None = None
    kernel: str = "flex"
    strict: bool = True
    inner: str = "inductor"
    observer: Callable | None = None

    def __post_init__(self):
        plan = self.plan
        if isinstance(plan, Path):
            plan = str(plan)
        if not isinstance(plan, (str, Plan)):
            raise OptionsError(f"option 'plan' must be one of {BUILTIN_PLANS}, a plan file path or a Plan, "
                               f"not {type(plan).__name__}")
        if isinstance(plan, str) and plan not in BUILTIN_PLANS and not Path(plan).is_file():
            raise OptionsError(f"option 'plan': {plan!r} is neither a built-in plan {BUILTIN_PLANS} "
                               f"nor an existing plan file")
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "window", _triple("window", self.window, odd=True))
        if self.grid is not None:
            object.__setattr__(self, "grid", _triple("grid", self.grid))
        if self.tile != "auto":
            object.__setattr__(self, "tile", _triple("tile", self.tile))
        if self.block_size not in (None, 64, 128):
            raise OptionsError(f"option 'block_size' must be 64 or 128, not {self.block_size!r}")
        if self.tile != "auto" and self.tile[0] * self.tile[1] * self.tile[2] != (self.block_size or 128):
            raise OptionsError(f"option 'tile' {self.tile} holds {self.tile[0] * self.tile[1] * self.tile[2]} "
                               f"tokens; it must hold block_size = {self.block_size or 128}")
        for name, allowed in (("kernel", KERNELS), ("inner", INNER_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise OptionsError(f"option {name!r} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.observer is not None and not callable(self.observer):
            raise OptionsError(f"option 'observer' must be callable, not {type(self.observer).__name__}")
        if not isinstance(self.strict, bool):
            raise OptionsError(f"option 'strict' must be True or False, not {self.strict!r}")

    @classmethod
    def from_dict(cls, options: dict | None) -> "CompactOptions":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionsError(f"unknown compact option {unknown[0]!r}; known options: {sorted(known)}")
        if "plan" not in options and os.environ.get("COMPACT_PLAN"):
            options["plan"] = os.environ["COMPACT_PLAN"]
        return cls(**options)

    def replace(self, **changes) -> "CompactOptions":
        return dataclasses.replace(self, **changes)


def _triple(name: str, value, odd: bool = False) -> tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in value)
        ok = len(t) == 3 and all(v >= 1 and v == w for v, w in zip(t, value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise OptionsError(f"option {name!r} must be three positive integers (t, h, w), not {value!r}")
    if odd and not all(v % 2 for v in t):
        raise OptionsError(f"option {name!r} must hold odd extents (a window centred on the query tile), not {t}")
    return t
