"""benchmarks/fidelity.py measures several video DiTs in one invocation, each into its own folder, and
keeps within a time budget (CPU, tiny checkpoints of the short and long configurations)."""
import json

import pytest

from benchmarks.fidelity import MODES, main, sweep
from examples.video_dit.model import TINY, build_model, from_name, save_model

WINDOW, TOP_K = "window (STA-like)", "top-k, no rectification"


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    paths = {}
    for name in ("short", "long"):
        paths[name] = root / from_name(name).checkpoint.name
        save_model(build_model(name, 0, **TINY), paths[name])
    return paths


def _run(out, monkeypatch, *args):
    monkeypatch.setenv("OUT", str(out))
    main(["--device", "cpu", "--videos", "1", "--steps", "2", "--dense-steps", "1", "--no-gif", *args])


def test_points_keep_the_ends_of_each_sweep():
    modes = {WINDOW: MODES[WINDOW]}
    values = MODES[WINDOW][2]
    assert [v for *_, v in sweep(modes, None)] == values
    assert [v for *_, v in sweep(modes, 2)] == [values[0], values[-1]]
    assert [v for *_, v in sweep(modes, 3)] == [values[0], values[2], values[3]]
    assert [v for *_, v in sweep(modes, 1)] == [values[0]]


def test_both_models_in_one_invocation_each_in_its_folder(tmp_path, monkeypatch, tiny_checkpoints):
    _run(tmp_path, monkeypatch, "--models", "short,long", "--checkpoint", str(tiny_checkpoints["short"]),
         str(tiny_checkpoints["long"]), "--modes", WINDOW, TOP_K, "--points", "1")
    for name, tokens in (("short", 4096), ("long", 16384)):
        result = json.loads((tmp_path / name / "fidelity.json").read_text())
        assert result["model"] == name and result["tokens"] == tokens
        assert result["checkpoint"] == str(tiny_checkpoints[name]) and result["skipped"] == []
        assert result["floor"]["dense plan"]["psnr"] > 100                # fp32 on the CPU: rounding only
        assert list(result["modes"]) == [WINDOW, TOP_K]
        assert all(len(points) == 1 and 0 < points[0]["density"] < 1 for points in result["modes"].values())
        assert (tmp_path / name / "fidelity_pareto.png").is_file() and not (tmp_path / name / "fidelity.gif").exists()
    # the same window keeps a smaller share of the long model's blocks in the sparse steps
    short, long = (json.loads((tmp_path / name / "fidelity.json").read_text())["modes"][WINDOW][0]
                   for name in ("short", "long"))
    assert long["density_sparse_steps"] < short["density_sparse_steps"]


def test_out_of_time_points_are_skipped_and_listed(tmp_path, monkeypatch, tiny_checkpoints):
    _run(tmp_path, monkeypatch, "--checkpoint", str(tiny_checkpoints["short"]), "--modes", WINDOW, "calibrated",
         "--points", "2", "--minutes", "0")
    result = json.loads((tmp_path / "short" / "fidelity.json").read_text())
    assert result["model"] == "short" and "dense plan" in result["floor"] and result["modes"] == {}
    assert result["skipped"] == ["window (STA-like), window=(1, 1, 1)", "window (STA-like), window=(3, 5, 5)",
                                 "calibrated, recall=0.7", "calibrated, recall=0.95"]


def test_one_checkpoint_per_model(monkeypatch, tmp_path, tiny_checkpoints):
    with pytest.raises(SystemExit):
        _run(tmp_path, monkeypatch, "--models", "short,long", "--checkpoint", str(tiny_checkpoints["short"]))
    with pytest.raises(SystemExit):
        _run(tmp_path, monkeypatch, "--models", "short,medium")
    with pytest.raises(SystemExit):
        _run(tmp_path, monkeypatch, "--checkpoint", str(tmp_path / "nothing.safetensors"))
