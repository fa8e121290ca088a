"""The README's example, as a newcomer runs it: it finishes, prints what it promises, and warns about
nothing on a clean install."""
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "wan_compact.py"


def test_example_prints_the_comparison_without_warnings():
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("a generation", "the last step", "speed-up", "attention work", "skipped", "output vs dense",
                 "relative L2 difference"):
        assert line in proc.stdout, proc.stdout
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
