"""Train the video DiT from scratch with rectified flow on procedural clips made on the device each step.

    python -m examples.video_dit.train --minutes 7 --out DIR [--batch 16] [--seed 0] [--compile]

Rectified flow: x_t = (1 − t)·x0 + t·ε, the model predicts v = ε − x0 from (x_t, timestep = 1000·t,
caption(label)); the loss is the MSE to v. t ~ logit-normal(0, 1) (as in SD3): it puts most samples
at mid t, where the velocity is hardest to predict, and few at the ends, where it is nearly given.
The caption is replaced by the NULL caption for 10% of the clips, for classifier-free guidance.

AdamW with fp32 master weights, bf16 autocast on CUDA, gradient clipping at 1. The learning rate
warms up linearly over 200 steps, then follows a cosine over the WALL-CLOCK budget down to 10%: the
run stops by time (`--minutes`, counted from start-up, so a job limit never loses it), so the number
of steps is not known in advance. The same command therefore reproduces the run up to the steps the
machine manages in the time, not bit for bit.

Writes to DIR: video_dit.safetensors (bf16, every ~60 s and at the end), train_log.json, loss.png
and CARD.md (config, sizes, the eval loss of the trained model and of the same seed's random init).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .clips import make_clips
from .model import CONFIG, FRAMES, NULL, SIZE, build_model, caption, save_model

LR = 3e-4
MIN_LR_FRACTION = 0.1
WARMUP_STEPS = 200
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0
P_UNCOND = 0.1
EMA_DECAY = 0.98                # of the logged loss
LOG_EVERY_STEPS = 50
PRINT_EVERY_S = 20
SAVE_EVERY_S = 60
EVAL_SEED = 1234
EVAL_T = tuple(round(0.1 * i, 1) for i in range(1, 10))   # 0.1 … 0.9


def flow_loss(model, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss: MSE between the model's velocity at x_t and ε − x0 (fp32)."""
    tt = t.view(-1, 1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x0.is_cuda):
        v = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=caption(labels), return_dict=False)[0]
    return F.mse_loss(v.float(), noise - x0)


def train_step(model, opt: torch.optim.Optimizer, clips: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """One optimiser step on a batch; t, ε and the caption dropout are drawn from `generator` (on the
    clips' device). Returns the loss as a detached tensor (no host sync)."""
    batch, device = clips.shape[0], clips.device
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    noise = torch.randn(clips.shape, generator=generator, device=device)
    dropped = torch.rand(batch, generator=generator, device=device) < P_UNCOND
    loss = flow_loss(model, clips, torch.where(dropped, NULL, labels), t, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, *, batch: int, device, frames: int = FRAMES, size: int = SIZE) -> dict[str, float]:
    """Denoising loss on fresh clips fixed by EVAL_SEED (conditional captions), at each t of EVAL_T;
    the same clips and noise for every model evaluated on the same device."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device).manual_seed(EVAL_SEED)
    clips, labels = make_clips(batch, frames=frames, size=size, generator=g, device=device)
    per_t = {}
    for t in EVAL_T:
        noise = torch.randn(clips.shape, generator=g, device=device)
        per_t[str(t)] = flow_loss(model, clips, labels, torch.full((batch,), t, device=device), noise).item()
    model.train(was_training)
    return {"mean": sum(per_t.values()) / len(per_t), "per_t": per_t}


def learning_rate(step: int, progress: float) -> float:
    """Linear warm-up over WARMUP_STEPS, then cosine from LR to MIN_LR_FRACTION·LR over `progress`
    (the fraction of the time budget spent)."""
    cosine = MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return LR * min(1.0, (step + 1) / WARMUP_STEPS) * cosine


def train(args) -> dict:
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.seed).to(device).train()
    print(f"training on {device} for {args.minutes} min, batch {args.batch}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)

    log, loop_s = train_loop(model, args, out, deadline=start + args.minutes * 60)
    steps = log[-1]["step"]
    save_model(model, out / "video_dit.safetensors")
    print(f"trained {steps} steps in {time.time() - start:.0f} s; evaluating", flush=True)
    eval_trained = evaluate(model, batch=args.eval_batch, device=device)
    eval_init = evaluate(build_model(args.seed).to(device), batch=args.eval_batch, device=device)
    print(f"eval loss: trained {eval_trained['mean']:.4f}, random init {eval_init['mean']:.4f}", flush=True)

    cuda = device.type == "cuda"
    record = {
        "command": "python -m examples.video_dit.train " + shlex.join(args.argv),
        "config": CONFIG, "frames": FRAMES, "size": SIZE, "seed": args.seed, "batch": args.batch,
        "compile": args.compile, "steps": steps, "train_wall_s": log[-1]["elapsed_s"],
        "steps_per_s": round(steps / loop_s, 2),
        "device": (torch.cuda.get_device_name() if cuda
                   else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": (out / "video_dit.safetensors").stat().st_size,
        "final_loss_ema": log[-1]["loss_ema"],
        "eval": {"seed": EVAL_SEED, "batch": args.eval_batch, "t": list(EVAL_T),
                 "trained": eval_trained, "random_init": eval_init},
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    plot_loss(log, out / "loss.png")
    write_card(record, out)
    print(f"wrote {out}/video_dit.safetensors, train_log.json, loss.png, CARD.md "
          f"({time.time() - start:.0f} s in all)", flush=True)
    return record


def train_loop(model, args, out: Path, deadline: float) -> tuple[list[dict], float]:
    """Train until `deadline` (at least one step), saving every SAVE_EVERY_S; returns the log (the last
    entry is the last step) and the loop's wall time. Losses are read back (a host sync) only to log."""
    device = next(model.parameters()).device
    net = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=WEIGHT_DECAY,
                            fused=device.type == "cuda")
    g = torch.Generator(device).manual_seed(args.seed)
    start = last_print = last_save = time.time()
    budget = deadline - start
    log, step, steps_at_print, ema = [], 0, 0, None

    def entry(now):
        return {"step": step, "loss": loss.item(), "loss_ema": ema.item(), "lr": lr, "elapsed_s": round(now - start, 2)}

    while step == 0 or time.time() < deadline:
        lr = learning_rate(step, (time.time() - start) / budget)
        for group in opt.param_groups:
            group["lr"] = lr
        clips, labels = make_clips(args.batch, frames=FRAMES, size=SIZE, generator=g, device=device)
        loss = train_step(net, opt, clips, labels, g)
        ema = loss if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * loss
        step += 1
        now = time.time()
        printing = now - last_print >= PRINT_EVERY_S
        if step % LOG_EVERY_STEPS == 0 or printing or step == 1:
            log.append(entry(now))
        if printing:
            print(f"step {step:6d}  loss {loss.item():.4f}  ema {ema.item():.4f}  lr {lr:.2e}  "
                  f"{(step - steps_at_print) / (now - last_print):.2f} steps/s  {now - start:.0f} s", flush=True)
            last_print, steps_at_print = now, step
        if now - last_save >= SAVE_EVERY_S:
            save_model(model, out / "video_dit.safetensors")
            last_save = now
    if log[-1]["step"] != step:
        log.append(entry(time.time()))
    return log, time.time() - start


def plot_loss(log: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [e["step"] for e in log]
    ax.plot(steps, [e["loss"] for e in log], ".", ms=2, alpha=0.4, label="batch loss")
    ax.plot(steps, [e["loss_ema"] for e in log], label=f"EMA ({EMA_DECAY})")
    ax.set(xlabel="step", ylabel="rectified-flow loss", yscale="log", title="video DiT training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_card(r: dict, out: Path) -> None:
    ev = r["eval"]
    per_t = "\n".join(f"| {t} | {ev['trained']['per_t'][str(t)]:.4f} | {ev['random_init']['per_t'][str(t)]:.4f} |"
                      for t in ev["t"])
    (out / "CARD.md").write_text(f"""# video DiT: model card

A diffusers `WanTransformer3DModel` trained from scratch with rectified flow on procedural clips
(`examples/video_dit/clips.py`: panning background, 1–3 bouncing shapes, one moving digit; the
class label is the digit). Pixel space, {r['frames']} frames × {r['size']}×{r['size']}, patch 1×4×4 →
a 16×16×16 grid of 4096 tokens.

| | |
|---|---|
| config | `{json.dumps(r['config'])}` |
| parameters | {r['parameters']:,} |
| checkpoint | `video_dit.safetensors`, bf16, {r['checkpoint_bytes'] / 2**20:.2f} MiB |
| steps × batch | {r['steps']} × {r['batch']} |
| training wall time | {r['train_wall_s']} s ({r['steps_per_s']} steps/s) |
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

Reproduce (the learning-rate schedule follows the wall clock, so the step count depends on the machine):

```bash
{r['command']}
```
""")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, required=True, help="wall-clock budget, from start-up")
    ap.add_argument("--out", required=True, help="directory for the checkpoint, log, plot and card")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batch", type=int, default=32, help="clips in the final evaluation")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.argv = argv
    return train(args)


if __name__ == "__main__":
    main()
