"""Train a video DiT from scratch with rectified flow on procedural clips made on the device each step.

    python -m examples.video_dit.train --model short|long --minutes 7 [--out DIR] [--batch B] [--seed 0]
                                       [--compile] [--resume CHECKPOINT] [--schedule-minutes S]

Rectified flow: x_t = (1 − t)·x0 + t·ε, the model predicts v = ε − x0 from (x_t, timestep = 1000·t,
caption(label)); the loss is the MSE to v. t ~ logit-normal(0, 1) (as in SD3): it puts most samples
at mid t, where the velocity is hardest to predict, and few at the ends, where it is nearly given.
The caption is replaced by the NULL caption for 10% of the clips, for classifier-free guidance.

AdamW with fp32 master weights, bf16 autocast on CUDA, gradient clipping at 1. The learning rate
warms up linearly over 200 steps, then follows a cosine over the WALL-CLOCK budget down to 10%: the
run stops by time (`--minutes`, counted from start-up, so a job limit never loses it), so the number
of steps is not known in advance. The same command therefore reproduces the run up to the steps the
machine manages in the time, not bit for bit. On CUDA, attention may only use SDPA's fused kernels
(flash, cuDNN, memory-efficient): at 16K tokens the math fallback would hold the S×S scores (4 GiB
per clip and layer), so it is an error rather than a crawl.

Batch: 16 clips of 4096 tokens (short), 4 of 16,384 (long): 65,536 tokens per step for both. For
long on an H200, by counting (not yet measured): attention is ~5.8 TFLOP per clip and step (fwd +
bwd, 6 layers, S² = 2.7e8; ~23 ms at flash's ~250 TFLOP/s), the rest ~11 ms per clip (scaled from
the short model's measured 12.4 steps/s on an H100); expect ~0.14 s per step, ~2,500–3,000 steps
in `--minutes 7`, and ~9 GiB of GPU memory (as the short run's 8.6 GiB: the same tokens per step,
and flash attention keeps activations linear in S). `--compile` would fuse only the non-attention
third and costs about a minute of compilation: not worth it within one 7-minute run.

Resuming (`--resume CHECKPOINT`): the weights come from the bf16 checkpoint (back to fp32 masters),
the step count, training seconds and LR schedule from its metadata (for a checkpoint from before
resuming existed, from the train_log.json beside it), and the log so far from that train_log.json
when there is one. The optimiser starts afresh (its moments would be twice the fp32 weights, more
than a GPU call brings back), so the LR warms up again over REWARMUP_STEPS. The schedule is a cosine
over `--schedule-minutes` of training time in all runs together; by default it is stretched to
cover the runs so far plus this one, i.e. the LR jumps back to where the longer cosine would be
(a warm restart) and decays to 10% by the end of this run. Plan two runs ahead with
`--schedule-minutes 14` (the runs' `--minutes` added up) on the first run: it then ends at
mid-cosine, and the second, without the option, continues the same cosine to its floor.
New clips are drawn (the data seed moves on by the steps already trained).

Writes to DIR (default: the model's checkpoint folder): the checkpoint (bf16, every ~60 s and at the
end, with the training state in its metadata), train_log.json, loss.png and CARD.md (config, sizes,
the eval loss of the trained model and of the same seed's random init; card.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .card import plot_loss, write_card
from .clips import make_clips
from .model import MODEL_NAMES, NULL, TINY, build_model, caption, checkpoint_metadata, from_name, save_model

LR = 3e-4
MIN_LR_FRACTION = 0.1
WARMUP_STEPS = 200
REWARMUP_STEPS = 100            # a resumed run's fresh AdamW: ~1/(1 − β2) steps to estimate its moments
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0
P_UNCOND = 0.1
EMA_DECAY = 0.98                # of the logged loss
LOG_EVERY_STEPS = 50
PRINT_EVERY_S = 20
SAVE_EVERY_S = 60
EVAL_SEED = 1234
EVAL_T = tuple(round(0.1 * i, 1) for i in range(1, 10))   # 0.1 … 0.9
TOKENS_PER_STEP = 65_536        # the default batch: 16 short clips, 4 long ones


def flow_loss(model, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss: MSE between the model's velocity at x_t and ε − x0 (fp32)."""
    tt = t.view(-1, 1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x0.is_cuda), fused_attention_only(x0.device):
        v = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=caption(labels), return_dict=False)[0]
    return F.mse_loss(v.float(), noise - x0)


def fused_attention_only(device: torch.device):
    """On CUDA, let SDPA pick among its fused kernels only (no math fallback: see the docstring)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


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
def evaluate(model, *, batch: int, device, frames: int, size: int) -> dict[str, float]:
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


def learning_rate(run_step: int, progress: float, warmup_steps: int = WARMUP_STEPS) -> float:
    """Linear warm-up over the run's first `warmup_steps`, then cosine from LR to MIN_LR_FRACTION·LR
    over `progress` (the fraction of the schedule's training time spent, all runs together)."""
    cosine = MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return LR * min(1.0, (run_step + 1) / warmup_steps) * cosine


@dataclass
class Progress:
    """Where training stands: what a resumed run continues from (all zero for a fresh one)."""
    steps: int = 0
    trained_s: float = 0.0          # training-loop seconds, all runs together
    schedule_s: float = 0.0         # the cosine's length in training seconds (0: none yet)
    log: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)

    def state(self) -> dict:
        """What the checkpoint's metadata keeps (the log and runs live in train_log.json)."""
        return {"steps": self.steps, "trained_s": round(self.trained_s, 2), "schedule_s": round(self.schedule_s, 2)}


def schedule_seconds(prior: Progress, budget_s: float, schedule_minutes: float | None) -> float:
    """The cosine's length in training seconds: `schedule_minutes` when planned, else the schedule so
    far stretched to cover this run's budget too (at least 1 s: a start-up may pass the deadline)."""
    if schedule_minutes:
        return schedule_minutes * 60
    return max(prior.schedule_s, prior.trained_s + budget_s, 1.0)


def resume_progress(path: Path, model_name: str) -> Progress:
    """The Progress saved with the checkpoint at `path`, and the log of the train_log.json beside it."""
    meta = checkpoint_metadata(path)
    if meta.get("model", model_name) != model_name:
        raise ValueError(f"{path} holds the {meta['model']!r} model, not {model_name!r}")
    beside = path.parent / "train_log.json"
    record = json.loads(beside.read_text()) if beside.is_file() else None
    if "training" in meta:
        progress = Progress(**meta["training"])
    elif record is not None:    # a checkpoint from before resuming existed: one run, one whole cosine
        progress = Progress(steps=record["steps"], trained_s=record["train_wall_s"], schedule_s=record["train_wall_s"])
    else:
        raise ValueError(f"{path} has no training state in its metadata and no train_log.json beside it")
    if record is not None:      # a periodic save of a later run may be newer than the log
        progress.log = [e for e in record["log"] if e["step"] <= progress.steps]
        progress.runs = [r for r in record.get("runs", [_first_run(record)]) if r["end_step"] <= progress.steps]
    return progress


def _first_run(record: dict) -> dict:
    return {"command": record["command"], "device": record["device"], "start_step": 0, "end_step": record["steps"],
            "train_wall_s": record["train_wall_s"], "steps_per_s": record["steps_per_s"], "batch": record["batch"]}


def train(args) -> dict:
    start = time.time()
    config = from_name(args.model)
    overrides = TINY if args.tiny else {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out) if args.out else config.checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / config.checkpoint.name
    model = build_model(config, args.seed, **overrides)
    prior = Progress()
    if args.resume:
        # bf16 on disk, copied into the model's fp32 parameters: the resumed run's master weights
        model.load_state_dict(load_file(args.resume), strict=True)
        prior = resume_progress(Path(args.resume), config.name)
    model = model.to(device).train()
    print(f"training {config.name} ({config.frames}×{config.size}², {config.tokens} tokens) on {device} for "
          f"{args.minutes} min, batch {args.batch}, {sum(p.numel() for p in model.parameters()):,} parameters"
          + (f", resuming at step {prior.steps}" if args.resume else ""), flush=True)

    progress, loop_s = train_loop(model, args, config, checkpoint, prior, deadline=start + args.minutes * 60)
    run_steps = progress.steps - prior.steps
    save_model(model, checkpoint, {"model": config.name, "training": progress.state()})
    print(f"trained {run_steps} steps (to step {progress.steps}) in {time.time() - start:.0f} s; evaluating",
          flush=True)
    frames_size = dict(frames=config.frames, size=config.size)
    eval_trained = evaluate(model, batch=args.eval_batch, device=device, **frames_size)
    eval_init = evaluate(build_model(config, args.seed, **overrides).to(device), batch=args.eval_batch,
                         device=device, **frames_size)
    print(f"eval loss: trained {eval_trained['mean']:.4f}, random init {eval_init['mean']:.4f}", flush=True)

    cuda = device.type == "cuda"
    command = "python -m examples.video_dit.train " + shlex.join(args.argv)
    device_name = (torch.cuda.get_device_name() if cuda
                   else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    runs = progress.runs + [{"command": command, "device": device_name, "start_step": prior.steps,
                             "end_step": progress.steps, "train_wall_s": round(loop_s, 2),
                             "steps_per_s": round(run_steps / loop_s, 2), "batch": args.batch,
                             "resumed_from": args.resume}]
    record = {
        "command": command, "model": config.name, "frames": config.frames, "size": config.size,
        "grid": config.grid, "tokens": config.tokens, "tiny": args.tiny,
        "config": {k: model.config[k] for k in config.transformer}, "seed": args.seed, "batch": args.batch,
        "compile": args.compile, "steps": progress.steps, "train_wall_s": round(progress.trained_s, 2),
        "schedule_s": round(progress.schedule_s, 2), "steps_per_s": round(run_steps / loop_s, 2),
        "device": device_name,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint": checkpoint.name, "checkpoint_bytes": checkpoint.stat().st_size,
        "final_loss_ema": progress.log[-1]["loss_ema"],
        "eval": {"seed": EVAL_SEED, "batch": args.eval_batch, "t": list(EVAL_T),
                 "trained": eval_trained, "random_init": eval_init},
        "runs": runs, "log": progress.log,
    }
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    plot_loss(progress.log, out / "loss.png", title=f"video DiT ({config.name}) training loss", ema_decay=EMA_DECAY)
    write_card(record, out)
    print(f"wrote {checkpoint}, train_log.json, loss.png, CARD.md in {out} ({time.time() - start:.0f} s in all)",
          flush=True)
    return record


def train_loop(model, args, config, checkpoint: Path, prior: Progress, deadline: float) -> tuple[Progress, float]:
    """Train until `deadline` or `args.max_steps` (at least one step), saving every SAVE_EVERY_S; returns
    the Progress after it (its log's last entry is the last step) and the loop's wall time. Losses are
    read back (a host sync) only to log."""
    device = next(model.parameters()).device
    net = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=WEIGHT_DECAY,
                            fused=device.type == "cuda")
    # a resumed run draws new clips rather than the first run's again
    g = torch.Generator(device).manual_seed(args.seed + prior.steps)
    warmup = WARMUP_STEPS if prior.steps == 0 else REWARMUP_STEPS
    start = last_print = last_save = time.time()
    budget = deadline - start
    schedule_s = schedule_seconds(prior, budget, args.schedule_minutes)
    progress = Progress(prior.steps, prior.trained_s, schedule_s, list(prior.log), list(prior.runs))
    step, steps_at_print, ema = 0, 0, None

    def advance(now):       # progress after `step` steps of this run
        progress.steps, progress.trained_s = prior.steps + step, prior.trained_s + now - start

    def entry():
        return {"step": progress.steps, "loss": loss.item(), "loss_ema": ema.item(), "lr": lr,
                "elapsed_s": round(progress.trained_s, 2)}

    while step == 0 or (time.time() < deadline and step < args.max_steps):
        lr = learning_rate(step, (prior.trained_s + time.time() - start) / schedule_s, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        clips, labels = make_clips(args.batch, frames=config.frames, size=config.size, generator=g, device=device)
        loss = train_step(net, opt, clips, labels, g)
        ema = loss if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * loss
        step += 1
        now = time.time()
        advance(now)
        printing = now - last_print >= PRINT_EVERY_S
        if progress.steps % LOG_EVERY_STEPS == 0 or printing or step == 1:
            progress.log.append(entry())
        if printing:
            print(f"step {progress.steps:6d}  loss {loss.item():.4f}  ema {ema.item():.4f}  lr {lr:.2e}  "
                  f"{(step - steps_at_print) / (now - last_print):.2f} steps/s  {now - start:.0f} s", flush=True)
            last_print, steps_at_print = now, step
        if now - last_save >= SAVE_EVERY_S:
            save_model(model, checkpoint, {"model": config.name, "training": progress.state()})
            last_save = now
    if progress.log[-1]["step"] != progress.steps:
        progress.log.append(entry())
    return progress, time.time() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODEL_NAMES, default="short", help="which video DiT (model.py)")
    ap.add_argument("--minutes", type=float, required=True, help="wall-clock budget, from start-up")
    ap.add_argument("--out", help="directory for the checkpoint, log, plot and card "
                                  "(default: the model's checkpoint folder)")
    ap.add_argument("--batch", type=int, help=f"clips per step (default: {TOKENS_PER_STEP:,} tokens' worth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batch", type=int, default=32, help="clips in the final evaluation")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    ap.add_argument("--resume", help="continue from this checkpoint (see the docstring)")
    ap.add_argument("--schedule-minutes", type=float,
                    help="length of the LR cosine in training minutes, all runs together "
                         "(default: the runs so far plus this one)")
    ap.add_argument("--max-steps", type=int, default=sys.maxsize, help="stop this run after this many steps")
    ap.add_argument("--tiny", action="store_true", help="a tiny architecture (model.TINY): CPU smoke runs")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.argv = argv
    args.batch = args.batch or max(1, TOKENS_PER_STEP // from_name(args.model).tokens)
    return train(args)


if __name__ == "__main__":
    main()
