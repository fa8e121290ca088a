"""The `compact-compile` command line: calibrate a tiny random Wan model, search saved statistics
again, inspect and plot the plans, and report unusable files."""
import re
import subprocess
import sys

import matplotlib.image
import pytest

from compact_compile.cli import main
from compact_compile.plan import Plan

MODEL = ["--layers", "1", "--heads", "2", "--latent", "4,32,32", "--steps", "3", "--dense-steps", "1",
         "--inputs", "2", "--inner", "eager", "--tile", "1,8,8"]


@pytest.fixture(autouse=True)
def fresh_clock():
    from compact_compile.schedule import CLOCK

    CLOCK.reset()
    yield
    CLOCK.reset()


def test_calibrate_inspect_plot(tmp_path, capsys):
    plan_path, stats_path = tmp_path / "tiny.plan.safetensors", tmp_path / "tiny.stats.safetensors"
    assert main(["calibrate", *MODEL, "--cost", "inf", "--out", str(plan_path), "--save-stats", str(stats_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    plan = Plan.load(plan_path)
    assert list(plan.sites) == ["blocks.0.attn1"]
    cal = plan.info["calibration"]
    assert cal["inputs"]["generations"] == 2 and cal["inputs"]["calls"] == 8     # 2 inputs × 2 steps × CFG
    assert plan.info["schedule"]["dense_steps"] == 1 and min(plan.info["heads"]["blocks.0.attn1"]["recall"]) >= 0.9

    # the saved statistics searched again, with a stricter τ: denser masks that keep it
    strict_path = tmp_path / "strict.plan.safetensors"
    assert main(["calibrate", "--stats", str(stats_path), "--recall", "0.97", "--cost", "inf",
                 "--out", str(strict_path)]) == 0
    strict = Plan.load(strict_path)
    assert min(strict.info["heads"]["blocks.0.attn1"]["recall"]) >= 0.97
    assert strict.info["schedule"]["dense_steps"] == 1
    assert strict.sites["blocks.0.attn1"].density >= plan.sites["blocks.0.attn1"].density

    capsys.readouterr()
    assert main(["inspect", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "grid (4, 16, 16)  tile (1, 8, 8)  block size 64" in out
    assert "schedule: dense for steps < 1" in out and "2 generations, 8 calls" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("blocks.0.attn1")]
    assert [r[1] for r in rows] == ["0", "1"]
    for r, rec, dens in zip(rows, plan.info["heads"]["blocks.0.attn1"]["recall"],
                            plan.sites["blocks.0.attn1"].blocks.float().mean((-1, -2)).tolist()):
        assert float(r[2]) == pytest.approx(dens, abs=1e-3) and float(r[3]) == pytest.approx(rec, abs=1e-4)
        assert r[4] in ("local", "cross", "global", "temporal", "mixed")

    plots = tmp_path / "plots"
    assert main(["plot", str(plan_path), "--out", str(plots)]) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["curves_blocks.0.attn1.png", "masks_blocks.0.attn1.png", "overview.png",
                     "patterns_blocks.0.attn1.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01   # a picture, not a blank


def test_unusable_files_are_reported(tmp_path, capsys):
    bad = tmp_path / "bad.plan.safetensors"
    bad.write_bytes(b"not a plan at all")
    assert main(["inspect", str(bad)]) == 2
    assert re.search(r"compact-compile inspect: error: .*not a readable compact_compile plan", capsys.readouterr().err)
    assert main(["calibrate", "--stats", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "not a readable compact_compile statistics file" in capsys.readouterr().err


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "compact_compile.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and all(c in done.stdout for c in ("calibrate", "inspect", "plot"))
