"""Calibration tests share the process-wide step clock: each starts and ends with a fresh one."""
import pytest

from compact_compile.schedule import CLOCK, ScheduledKernel


@pytest.fixture(autouse=True)
def fresh_clock():
    CLOCK.reset()
    ScheduledKernel._warned_unknown = False
    yield
    CLOCK.reset()
