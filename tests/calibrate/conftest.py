"""Calibration tests share the process-wide step clock: each starts and ends with a fresh one."""
import pytest

from compact_compile.schedule import CLOCK, reset_warnings


@pytest.fixture(autouse=True)
def fresh_clock():
    CLOCK.reset()
    reset_warnings()
    yield
    CLOCK.reset()
