"""Offline calibration (Compact Attention): record block attention mass on dense runs of the model,
search per-head masks from a mask family, and write a plan with its step schedule.

    from compact_compile.calibrate import calibrate
    with calibrate(model, recall=0.9, cost=0.011) as cal:
        pipe(prompts, num_inference_steps=50)
    cal.plan.save("model.plan.safetensors")

stats.py     block attention mass (chunked torch; Triton on the GPU: triton_mass.py)
patterns.py  the mask family (frame groups × dual windows) and its block maps
search.py    greedy contraction under recall τ and marginal cost λ, batched over heads
build.py     statistics → plan (schedule, provenance, per-head results)
session.py   the `calibrate` context manager
"""
from .build import build_plan
from .patterns import DEFAULT_GROUPS, Family
from .search import density, recall, search_sites, union
from .session import Calibration, calibrate
from .stats import CalibrationStats, SiteStats, block_mass, load_stats, save_stats

__all__ = ["Calibration", "CalibrationStats", "DEFAULT_GROUPS", "Family", "SiteStats", "block_mass", "build_plan",
           "calibrate", "density", "load_stats", "recall", "save_stats", "search_sites", "union"]
