"""benchmarks/fidelity.py measures FP8 modes: each FP8 point beside its bf16 counterpart at the same plan
(run first, recorded under its own mode), its videos against the bf16 sparse ones, and per site the FP8
output against the site's output in the inputs' dtype on the same q, k, v. On the CPU the FP8 kernel
runs in Triton's interpreter, so the clip is cut to 4 frames (1024 tokens) to keep this fast."""
import dataclasses
import json
import math

import pytest

import benchmarks.fidelity as fidelity
from benchmarks.fidelity import FP8, MODES
from compact_compile.kernels.fp8 import fp8_unsupported
from examples.video_dit.model import TINY, build_model, from_name, save_model

WINDOW = "window (STA-like)"


def test_every_fp8_mode_is_its_counterpart_with_fp8_attention():
    fp8_modes = [name for name in MODES if name.endswith(FP8)]
    assert fp8_modes
    for name in fp8_modes:
        options, swept, _ = MODES[name]
        bf16_options, bf16_swept, _ = MODES[name.removesuffix(FP8)]
        assert options == dict(bf16_options, fp8_attention=True) and swept == bf16_swept


@pytest.mark.skipif(bool(fp8_unsupported("cpu")), reason="FP8 on the CPU needs Triton's interpreter "
                                                         "(TRITON_INTERPRET=1, set on CPU-only machines)")
def test_fp8_mode_is_measured_against_its_bf16_counterpart(tmp_path, monkeypatch):
    checkpoint = tmp_path / "short.safetensors"
    save_model(build_model("short", 0, **dict(TINY, attention_head_dim=32)), checkpoint)   # e4m3 dots: D ≥ 32
    monkeypatch.setattr(fidelity, "from_name", lambda name: dataclasses.replace(from_name(name), frames=4))
    monkeypatch.setenv("OUT", str(tmp_path))
    fidelity.main(["--device", "cpu", "--videos", "1", "--steps", "2", "--dense-steps", "1", "--no-gif",
                   "--checkpoint", str(checkpoint), "--modes", WINDOW + FP8, "--points", "1"])
    result = json.loads((tmp_path / "short" / "fidelity.json").read_text())
    assert list(result["modes"]) == [WINDOW, WINDOW + FP8] and result["skipped"] == []
    (bf16,), (fp8,) = result["modes"].values()
    assert bf16["window"] == fp8["window"] == [1, 3, 3] and bf16["density"] == fp8["density"]
    assert "psnr_vs_bf16_sparse" not in bf16 and "layer_error_vs_bf16_sparse" not in bf16
    # fp32 on the CPU: the FP8 videos are far closer to the bf16 sparse ones than either is to dense
    assert 40 < fp8["psnr_vs_bf16_sparse"] < math.inf and fp8["psnr_min_vs_bf16_sparse"] <= fp8["psnr_vs_bf16_sparse"]
    assert 0 < fp8["ssim_vs_bf16_sparse"] <= 1 and len(fp8["per_video_vs_bf16_sparse"]) == 1
    assert list(fp8["layer_error_vs_bf16_sparse"]) == list(fp8["layer_error"]) == ["blocks.0.attn1"]
    assert all(0 < e < 0.1 for e in fp8["layer_error_vs_bf16_sparse"].values())   # e4m3 rounding: a few %
    assert all(math.isfinite(fp8[k]) for k in ("psnr", "ssim", "density", "density_sparse_steps"))
