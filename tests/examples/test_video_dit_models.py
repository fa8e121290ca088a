"""examples/video_dit's model table (short: the committed checkpoint; long: ≥ 16K tokens) and resuming
a training run (CPU, tiny architectures)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from examples.video_dit.clips import make_clips
from examples.video_dit.model import (MODEL_NAMES, TINY, build_model, checkpoint_metadata, from_name, load_model,
                                      transformer_configs)
from examples.video_dit.train import (LR, MIN_LR_FRACTION, REWARMUP_STEPS, Progress, learning_rate, main,
                                      resume_progress, schedule_seconds, train_step)

SHORT, LONG = from_name("short"), from_name("long")


# ----------------------------------------------------------------------------------------------
# the model table


def test_the_table_names_short_and_long_and_rejects_others():
    assert MODEL_NAMES == ("short", "long") and transformer_configs["long"] is LONG
    with pytest.raises(ValueError, match="short"):
        from_name("medium")


@pytest.mark.parametrize("name, folder, shape", [("short", "checkpoint", (16, 64, (16, 16, 16), 4096)),
                                                 ("long", "checkpoint_long", (16, 128, (16, 32, 32), 16384))])
def test_each_model_is_its_committed_checkpoint_exactly(name, folder, shape):
    config = from_name(name)
    assert (config.frames, config.size, config.grid, config.tokens) == shape
    assert config.checkpoint.is_file() and config.checkpoint.parent.name == folder
    assert config.checkpoint.stat().st_size <= 16 * 2**20
    on_disk = load_file(str(config.checkpoint))
    model = load_model(config.checkpoint)
    assert {k: model.config[k] for k in config.transformer} == config.transformer
    assert checkpoint_metadata(config.checkpoint)["config"] == json.loads(json.dumps(config.transformer))
    state = model.state_dict()
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k].to(torch.bfloat16), v) for k, v in on_disk.items())   # bf16 → fp32 exact
    fresh = build_model(name).state_dict()             # the table builds the same architecture
    assert all(fresh[k].shape == v.shape for k, v in on_disk.items())


def test_long_has_at_least_16k_tokens_and_the_rotary_table_covers_its_axes():
    assert LONG.grid == (16, 32, 32) and LONG.tokens == 16384
    assert LONG.checkpoint.parent.name == "checkpoint_long" and LONG.checkpoint != SHORT.checkpoint
    model = build_model("long")
    short_params = sum(p.numel() for p in build_model("short").parameters())
    assert sum(p.numel() for p in model.parameters()) == short_params
    assert sum(2 * t.numel() for t in model.state_dict().values()) <= 16 * 2**20     # bf16 checkpoint
    cos, sin = model.rope(torch.zeros(1, 3, LONG.frames, LONG.size, LONG.size))
    head_dim = LONG.transformer["attention_head_dim"]
    assert cos.shape == sin.shape == (1, LONG.tokens, 1, head_dim)
    assert max(LONG.grid) <= LONG.transformer["rope_max_seq_len"]


def test_a_tiny_long_model_trains_on_16k_token_clips():
    model = build_model("long", 0, **TINY).train()
    clips, labels = make_clips(1, frames=LONG.frames, size=LONG.size, generator=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = train_step(model, opt, clips, labels, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and clips.shape == (1, 3, 16, 128, 128)


# ----------------------------------------------------------------------------------------------
# resuming


def _train(out, *extra):
    return main(["--model", "short", "--tiny", "--minutes", "5", "--batch", "1", "--eval-batch", "1",
                 "--out", str(out), *extra])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A first run of 1 step whose 0.6 s budget is spent at start-up (so its cosine is as short as can
    be; a run makes one step whatever the time), and a second of 3 steps resumed from its checkpoint."""
    root = tmp_path_factory.mktemp("video_dit_runs")
    first = _train(root / "a", "--max-steps", "1", "--minutes", "0.01")
    second = _train(root / "b", "--max-steps", "3", "--resume", str(root / "a" / SHORT.checkpoint.name))
    return root, first, second


def test_resume_continues_the_step_count_log_and_runs(two_runs):
    root, first, second = two_runs
    checkpoint = root / "a" / SHORT.checkpoint.name
    state = checkpoint_metadata(checkpoint)
    assert state["model"] == "short" and state["training"]["steps"] == first["steps"] == 1
    assert second["steps"] == 4 and checkpoint_metadata(root / "b" / checkpoint.name)["training"]["steps"] == 4
    assert [r["start_step"] for r in second["runs"]] == [0, 1] and second["runs"][1]["resumed_from"] == str(checkpoint)
    assert [e["step"] for e in second["log"]] == [1, 2, 4]      # first and last step of each run
    assert second["train_wall_s"] > first["train_wall_s"]
    assert (root / "b" / "CARD.md").read_text().count("--resume") == 1     # both commands, one resumed


def test_resume_stretches_the_schedule_and_warms_the_fresh_optimiser_up(two_runs):
    _, first, second = two_runs
    assert first["schedule_s"] == 1.0                                   # budget gone before the first step
    assert second["schedule_s"] >= first["train_wall_s"] + 60           # this run's 5 minutes (less start-up)
    resumed = second["log"][1]
    assert resumed["lr"] == pytest.approx(learning_rate(0, resumed["elapsed_s"] / second["schedule_s"],
                                                        REWARMUP_STEPS), rel=0.05)


def test_the_schedule_is_planned_carried_or_stretched():
    fresh = Progress()
    assert schedule_seconds(fresh, 400, None) == 400                     # one run: one whole cosine
    assert schedule_seconds(fresh, 400, 14) == 840                       # planned for two runs
    planned = Progress(steps=2000, trained_s=400, schedule_s=840)
    assert schedule_seconds(planned, 400, None) == 840                   # the second run carries it on
    finished = Progress(steps=2000, trained_s=400, schedule_s=400)
    assert schedule_seconds(finished, 400, None) == 800                  # a warm restart over both runs
    assert learning_rate(10**6, 400 / 800) == pytest.approx(LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) / 2))


def test_resume_reads_a_checkpoint_from_before_resuming_existed():
    """The committed short checkpoint has no training state in its metadata: its train_log.json has."""
    progress = resume_progress(SHORT.checkpoint, "short")
    record = json.loads((SHORT.checkpoint.parent / "train_log.json").read_text())
    assert progress.steps == record["steps"] > 0 and progress.trained_s == progress.schedule_s == record["train_wall_s"]
    assert progress.log[-1]["step"] == progress.steps and len(progress.runs) == 1
    assert progress.runs[0]["end_step"] == progress.steps


def test_resume_refuses_another_models_checkpoint(two_runs):
    root, _, _ = two_runs
    with pytest.raises(ValueError, match="'short' model, not 'long'"):
        resume_progress(root / "a" / SHORT.checkpoint.name, "long")
