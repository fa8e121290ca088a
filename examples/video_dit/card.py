"""What a training run leaves beside its checkpoint for people: the loss plot and the model card."""
from __future__ import annotations

import json
from pathlib import Path


def plot_loss(log: list[dict], path: Path, *, title: str, ema_decay: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [e["step"] for e in log]
    ax.plot(steps, [e["loss"] for e in log], ".", ms=2, alpha=0.4, label="batch loss")
    ax.plot(steps, [e["loss_ema"] for e in log], label=f"EMA ({ema_decay})")
    ax.set(xlabel="step", ylabel="rectified-flow loss", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_card(r: dict, out: Path) -> None:
    """CARD.md in `out` from a train.py record (train_log.json)."""
    ev = r["eval"]
    per_t = "\n".join(f"| {t} | {ev['trained']['per_t'][str(t)]:.4f} | {ev['random_init']['per_t'][str(t)]:.4f} |"
                      for t in ev["t"])
    grid = "×".join(str(n) for n in r["grid"])
    runs = r["runs"]
    steps = " + ".join(str(run["end_step"] - run["start_step"]) for run in runs)
    commands = "\n".join(run["command"] for run in runs)
    tiny = "\n**A tiny smoke-test architecture (`--tiny`), not the published model.**\n" if r["tiny"] else ""
    (out / "CARD.md").write_text(f"""# video DiT ({r['model']}): model card
{tiny}
A diffusers `WanTransformer3DModel` trained from scratch with rectified flow on procedural clips
(`examples/video_dit/clips.py`: panning background, 1–3 bouncing shapes, one moving digit; the
class label is the digit). Pixel space, {r['frames']} frames × {r['size']}×{r['size']}, patch 1×4×4 →
a {grid} grid of {r['tokens']:,} tokens.

| | |
|---|---|
| config | `{json.dumps(r['config'])}` |
| parameters | {r['parameters']:,} |
| checkpoint | `{r['checkpoint']}`, bf16, {r['checkpoint_bytes'] / 2**20:.2f} MiB |
| steps × batch | {r['steps']} × {r['batch']} ({len(runs)} run{'s' if len(runs) > 1 else ''}: {steps} steps) |
| training wall time | {r['train_wall_s']} s (last run: {r['steps_per_s']} steps/s) |
| LR schedule | cosine over {r['schedule_s']} s of training time |
| device | {r['device']} |
| peak GPU memory | {'—' if r['peak_gpu_memory_gib'] is None else f"{r['peak_gpu_memory_gib']} GiB"} |
| torch | {r['torch']} |
| seed | {r['seed']} |
| torch.compile | {r['compile']} |
| final training loss (EMA) | {r['final_loss_ema']:.4f} |
| eval loss, trained | **{ev['trained']['mean']:.4f}** |
| eval loss, random init (same seed) | {ev['random_init']['mean']:.4f} |
| loss curve | `loss.png` |

Eval: denoising loss on fresh clips (batch {ev['batch']}, seed {ev['seed']}, conditional captions) at
fixed values of t:

| t | trained | random init |
|---|---|---|
{per_t}

Reproduce, one command per run (the learning-rate schedule follows the wall clock, so the step count
depends on the machine):

```bash
{commands}
```
""")
