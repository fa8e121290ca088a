"""compact_compile: block-sparse attention for video diffusion transformers, as a torch.compile backend.

    torch.compile(model, backend="compact", options={"plan": "window"})
"""
from .balance import balance_heads
from .calibrate import calibrate
from .errors import CompactError
from .layout import TokenLayout
from .options import CompactOptions, OptionsError
from .plan import Plan, PlanError, SitePlan
from .report import report
from .schedule import follow_steps

__version__ = "0.1.0"


def load_plan(path) -> Plan:
    """Read and validate a plan file."""
    return Plan.load(path)


__all__ = ["balance_heads", "calibrate", "CompactError", "CompactOptions", "follow_steps", "OptionsError", "Plan",
           "PlanError", "SitePlan", "TokenLayout", "load_plan", "report"]
