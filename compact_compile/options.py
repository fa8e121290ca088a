"""CompactOptions: everything `torch.compile(m, backend="compact", options={...})` understands.

Each option is documented on the class (`help(CompactOptions)`); a bad option is one OptionsError naming it.
"""
from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from .errors import OptionsError
from .kernels.registry import FP8_KERNELS
from .plan import Plan

BUILTIN_PLANS = ("dense", "window", "dynamic")
# The defaults below were chosen by measurement (README "Defaults", BENCHMARKS.md): the fastest setting
# that keeps ≥ 30 dB PSNR against dense sampling on both trained models with ≥ 60% of the blocks skipped.
DEFAULT_DENSE_STEPS = 4
SMALL_VIDEO_TOKENS = 64 * 128   # fewer video tokens than 64 blocks of 128: 64-token blocks by default
KERNELS = ("auto", "fa4", "triton", "flex")   # kernels/registry.py KERNEL_NAMES, and "auto"
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
QUANTIZE = (None, "fp8", "int8")
MODES = (None, "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompactOptions:
    """Options of the "compact" torch.compile backend, validated on construction.

    `torch.compile(model, backend="compact", options={...})` turns the dict into this with
    `CompactOptions.from_dict`; an unknown key or a bad value raises one OptionsError naming it.

    plan        "window" (default: a 3D local window, no calibration), "dense" (every block: the model
                is unchanged up to rounding), "dynamic" (blocks chosen online per call from pooled
                q/k, no calibration), a path to a plan file, or a `Plan`. Without `plan` in
                options, the environment variable COMPACT_PLAN is used when set.
    rectify     "auto" (default): True where the site supports it, off at flex_attention and frame-masked
                sites (their model masks are not in the pooled estimates); True: correct block-sparse
                attention for the blocks it skips (Rectified SpaAttn: R·O_sparse + Ō from pooled q/k/v, per
                query block), and such sites stay dense; "rows": the same estimated per query row; False.
    dynamic     also choose blocks online and add them to a static plan (always on for "dynamic").
    p_remain    online choice: the fewest top blocks holding this estimated mass, default 0.3 …
    drop        … but at least (1 − drop) of the key blocks; default 0.9.
    window      window extent in tiles (t, h, w) for plan="window"; odd numbers, default (3, 3, 3).
    grid        (T, H, W) video tokens; default: inferred from the graph (patch-embedding conv).
    tile        (tt, th, tw) tokens per tile, tt·th·tw = block_size (without block_size, it sets it);
                default "auto".
    block_size  64 or 128 tokens per attention block; default: the plan file's, else 128 (64 for a video
                of fewer than 8,192 tokens: with 128 it would have under 64 blocks, too coarse for a local
                window to skip much).
    kernel      "auto" (default: the fastest kernel that runs the site — FlashAttention-4 where it is
                installed on sm90, else our Triton kernel on CUDA GPUs, else FlexAttention), or one of
                "fa4", "triton", "flex" (a named kernel that cannot run a site is replaced by Flex, and
                the report says why).
    dense_steps the first N denoising steps run dense attention (the step is read from the model's
                `timestep` input), the plan's masks after; default: a plan file's own schedule, else 4
                (0 turns the warm-up off). A plan file's schedule and this option must agree. Compiling only
                the repeated blocks hides the timestep: `compact_compile.follow_steps(model)` feeds it.
    strict      True: a plan that does not fit a site is an error. False: that site stays dense,
                with a warning and a report entry.
    fp8_attention False (default); True: the rewritten sites' attention in FP8 — q·kᵀ and P·V as e4m3
                tensor-core dots with fp32 accumulation, q and k with one scale per block of tokens, k
                smoothed by its mean, v with per-channel scales (kernels/fp8.py), quantized in the pass
                that reorders q, k, v. FA4's Hopper kernel runs it where it can (kernels/fa4_fp8_sm90.py:
                flash-attn-4 4.0.0b36, head dim 128, key-padding masks too), our Triton kernel otherwise
                (FlexAttention cannot), for every plan, with rectification per block (not "rows"); needs
                a CUDA GPU of compute capability ≥ 8.9. Sites on FlexAttention with a model's own mask
                stay in their dtype.
    quantize    None (default), "fp8" or "int8": torchao-quantized linear layers (dynamic activation and
                weight quantization); fp8 needs compute capability ≥ 8.9.
    mode        Inductor's mode when `options` are given (torch.compile takes `mode` or `options`,
                not both): None or "max-autotune-no-cudagraphs". Modes with CUDA graphs are not
                offered: a graph replay would freeze the per-step kernel choice of a schedule.
    inductor    Inductor's config patches for the rewritten graph, the dict `torch.compile(options=…)`
                would hand Inductor (with backend="compact" that dict is these options), e.g.
                {"coordinate_descent_tuning": True}; over `mode`'s. Names
                Inductor does not have are refused, and so is "triton.cudagraphs" (as for `mode`);
                needs inner="inductor".
    inner       what compiles the rewritten graph: "inductor" (default), "aot_eager" or "eager".
    observer    advanced: a callable `(spec, site) -> site` that wraps every rewritten site's runtime
                (kernels/site.py; the wrapper keeps its `__call__`, `parts` and `fp8`): calibration records
                attention statistics with it, the fidelity harness measures each call.
    """
    plan: str | Path | Plan = "window"
    window: tuple[int, int, int] = (3, 3, 3)
    grid: tuple[int, int, int] | None = None
    tile: tuple[int, int, int] | str = "auto"
    block_size: int | None = None
    kernel: str = "auto"
    dense_steps: int | None = None
    strict: bool = True
    inner: str = "inductor"
    rectify: bool | str = "auto"
    dynamic: bool = False
    p_remain: float = 0.3
    drop: float = 0.9
    fp8_attention: bool = False
    quantize: str | None = None
    mode: str | None = None
    inductor: Mapping[str, object] | None = None
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
        if self.block_size is not None and (type(self.block_size) is not int or self.block_size not in (64, 128)):
            raise OptionsError(f"option 'block_size' must be 64 or 128, not {self.block_size!r}")
        # with a plan file and no block_size, the block size is the plan's: planner.load_plan checks the tile
        tile_checked_by_plan = self.block_size is None and not (isinstance(plan, str) and plan in BUILTIN_PLANS)
        if self.tile != "auto" and not tile_checked_by_plan:
            volume = self.tile[0] * self.tile[1] * self.tile[2]
            if self.block_size is None and volume not in (64, 128):
                raise OptionsError(f"option 'tile' {self.tile} holds {volume} tokens; a tile holds one attention "
                                   f"block: 64 or 128 tokens")
            if self.block_size is not None and volume != self.block_size:
                raise OptionsError(f"option 'tile' {self.tile} holds {volume} tokens; it must hold block_size = "
                                   f"{self.block_size}")
        for name, allowed in (("kernel", KERNELS), ("inner", INNER_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise OptionsError(f"option {name!r} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.rectify not in (False, True, "rows", "auto"):
            raise OptionsError(f"option 'rectify' must be \"auto\", False, True or \"rows\", not {self.rectify!r}")
        if self.dense_steps is not None and (isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int)
                                             or self.dense_steps < 0):
            raise OptionsError(f"option 'dense_steps' must be an integer ≥ 0 (or None: the default), "
                               f"not {self.dense_steps!r}")
        if self.mode not in MODES:
            raise OptionsError(f"option 'mode' must be one of {MODES}, not {self.mode!r}")
        if self.inductor is not None:
            _check_inductor_patches(self.inductor, self.inner)
        if self.quantize not in QUANTIZE:
            raise OptionsError(f"option 'quantize' must be one of {QUANTIZE}, not {self.quantize!r}")
        if not isinstance(self.dynamic, bool):
            raise OptionsError(f"option 'dynamic' must be True or False, not {self.dynamic!r}")
        if plan == "dynamic":
            object.__setattr__(self, "dynamic", True)
        if not isinstance(self.fp8_attention, bool):
            raise OptionsError(f"option 'fp8_attention' must be True or False, not {self.fp8_attention!r}")
        if self.fp8_attention and self.kernel not in ("auto", *FP8_KERNELS):
            raise OptionsError(f"option 'fp8_attention' runs on the {' or '.join(FP8_KERNELS)} kernel only; kernel="
                               f"{self.kernel!r} has no FP8 (e4m3) path on sm90: use kernel='auto', 'fa4' or 'triton'")
        if self.fp8_attention and self.rectify == "rows":
            raise OptionsError("option 'fp8_attention' rectifies per block (rectify=True); "
                               "rectify='rows' reads every query row unquantized")
        for name in ("p_remain", "drop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise OptionsError(f"option {name!r} must be a number in [0, 1], not {value!r}")
        if self.observer is not None and not callable(self.observer):
            raise OptionsError(f"option 'observer' must be callable, not {type(self.observer).__name__}")
        if not isinstance(self.strict, bool):
            raise OptionsError(f"option 'strict' must be True or False, not {self.strict!r}")

    @classmethod
    def from_dict(cls, options: Mapping | None) -> "CompactOptions":
        """Parse torch.compile's `options=` (a dict, or None for the defaults)."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            # without this, dict(["plan", "window"]) fails as "dictionary update sequence element #0 …"
            raise OptionsError(f"options must be a dict such as {{'plan': 'window'}}, not {type(options).__name__} "
                               f"{options!r}")
        options = dict(options)
        known = {f.name for f in fields(cls)}
        not_names = [k for k in options if not isinstance(k, str)]
        if not_names:
            raise OptionsError(f"compact option names are strings, not {not_names[0]!r}; "
                               f"known options: {sorted(known)}")
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionsError(f"unknown compact option {unknown[0]!r}; known options: {sorted(known)}")
        if "plan" not in options and os.environ.get("COMPACT_PLAN"):
            options["plan"] = os.environ["COMPACT_PLAN"]
        return cls(**options)

    def replace(self, **changes) -> "CompactOptions":
        return dataclasses.replace(self, **changes)

    @property
    def warmup_steps(self) -> int:
        """Dense steps a built-in plan (or a plan file without a schedule) starts with: the option, or by
        default DEFAULT_DENSE_STEPS (none for plan="dense", where every step is dense anyway)."""
        if self.dense_steps is not None:
            return self.dense_steps
        return 0 if self.plan == "dense" else DEFAULT_DENSE_STEPS

    def block_size_for(self, video_tokens: int) -> int:
        """The block size of a built-in plan's site: the option, else a given tile's token count, else 128
        (64 for a video of fewer than SMALL_VIDEO_TOKENS)."""
        if self.block_size is not None:
            return self.block_size
        if self.tile != "auto":
            return self.tile[0] * self.tile[1] * self.tile[2]
        return 64 if video_tokens < SMALL_VIDEO_TOKENS else 128


def _check_inductor_patches(patches, inner: str) -> None:
    if not isinstance(patches, Mapping):
        raise OptionsError(f"option 'inductor' must be a dict of Inductor config names to values, not "
                           f"{type(patches).__name__}")
    if inner != "inductor":
        raise OptionsError(f"option 'inductor' configures Inductor; inner={inner!r} does not use it")
    import difflib

    import torch._inductor.config

    names = torch._inductor.config.get_config_copy()
    for name, value in patches.items():
        if name not in names:
            near = difflib.get_close_matches(str(name), list(names), n=3)
            raise OptionsError(f"option 'inductor': Inductor has no config {name!r}"
                               + (f"; did you mean {' or '.join(map(repr, near))}?" if near else ""))
        if name == "triton.cudagraphs" and value:
            raise OptionsError("option 'inductor': CUDA graphs are not offered: a graph replay would freeze the "
                               "per-step kernel choice of a schedule")


def _triple(name: str, value, odd: bool = False) -> tuple[int, int, int]:
    t = _positive_ints(value)
    if t is None or len(t) != 3:
        raise OptionsError(f"option {name!r} must be three positive integers (t, h, w), not {value!r}")
    if odd and not all(v % 2 for v in t):
        raise OptionsError(f"option {name!r} must hold odd extents (a window centred on the query tile), not {t}")
    return t


def _positive_ints(value) -> tuple[int, ...] | None:
    """`value` as a tuple of ints ≥ 1, or None. Integer types only (int, numpy/torch integers):
    no floats, and no bools — True would otherwise pass as 1, so (True, True, True) was a (1, 1, 1)
    window."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return None
    out = []
    for v in value:
        if isinstance(v, bool):
            return None
        try:
            v = operator.index(v)
        except TypeError:
            return None
        if v < 1:
            return None
        out.append(v)
    return tuple(out)
