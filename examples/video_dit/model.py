"""The video DiTs: small diffusers WanTransformer3DModels in pixel space, their checkpoints and captions.

One architecture, two clip sizes (gpt-fast style: `transformer_configs`, `from_name`):

| name  | clips                 | grid (patch 1×4×4) | tokens | checkpoint                                      |
|-------|-----------------------|--------------------|--------|-------------------------------------------------|
| short | 16 frames × 64×64     | 16 × 16 × 16       |  4,096 | checkpoint/video_dit.safetensors (committed)    |
| long  | 16 frames × 128×128   | 16 × 32 × 32       | 16,384 | checkpoint_long/video_dit_long.safetensors (committed) |

Both: 6 layers of width 256 (4 heads × 64), FFN 1024, 6,964,016 parameters, 13.3 MiB in bf16 — the
same kind of 3D video self-attention the compact backend rewrites in the real Wan models. The long
model sees the same scenes (clips.py draws positions and speeds as fractions of the frame) at twice
the resolution: each token covers a quarter of the area, so objects span 4× the tokens and move up
to ~1.3 tokens per frame, closer to the token counts of real video models (Wan 480p: 32,760).

There is no text encoder: a class caption is a FIXED random embedding per digit class (seeded, never
trained), and the label NULL is the empty caption (zeros) used for classifier-free guidance.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .clips import NUM_CLASSES

HERE = Path(__file__).parent
CAPTION_LEN = 4
CAPTION_DIM = 64
CAPTION_SEED = 20261123
NULL = NUM_CLASSES      # the label of the empty caption

WAN_6x256 = dict(
    patch_size=(1, 4, 4), in_channels=3, out_channels=3,
    num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=6,
    qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6,
    text_dim=CAPTION_DIM, freq_dim=256,
    rope_max_seq_len=64,    # rotary table per axis: covers axes up to 64 tokens (frames up to 256×256)
)
# a tiny model of the same family for CPU tests and smoke runs (text_dim stays: the captions are fixed)
TINY = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=1, freq_dim=32)


@dataclass(frozen=True)
class VideoDiTConfig:
    """One model of this example: the clips it is trained on, its transformer, its checkpoint."""
    name: str
    frames: int
    size: int                   # frames are size × size pixels
    checkpoint: Path
    transformer: dict           # WanTransformer3DModel(**transformer)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T, H, W) video tokens after patchify."""
        pt, ph, pw = self.transformer["patch_size"]
        return self.frames // pt, self.size // ph, self.size // pw

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


transformer_configs = {
    "short": VideoDiTConfig("short", frames=16, size=64, transformer=WAN_6x256,
                            checkpoint=HERE / "checkpoint" / "video_dit.safetensors"),
    "long": VideoDiTConfig("long", frames=16, size=128, transformer=WAN_6x256,
                           checkpoint=HERE / "checkpoint_long" / "video_dit_long.safetensors"),
}
MODEL_NAMES = tuple(transformer_configs)


def from_name(name: str) -> VideoDiTConfig:
    if name not in transformer_configs:
        raise ValueError(f"unknown video DiT {name!r}; the models are {MODEL_NAMES}")
    return transformer_configs[name]


def build_model(config: VideoDiTConfig | str, seed: int = 0, **overrides) -> WanTransformer3DModel:
    """The transformer of `config` (or its name), with `overrides` (e.g. TINY), at the random init of
    `seed`, on the CPU (so a seed gives the same weights on every machine). The global RNG is left as
    it was."""
    config = from_name(config) if isinstance(config, str) else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**{**config.transformer, **overrides})


def save_model(model: WanTransformer3DModel, path: str | Path, metadata: dict | None = None) -> None:
    """bf16 safetensors with the model's config in the metadata, and each entry of `metadata` as JSON
    (the trainer stores the model's name and its training state). Written to a temporary file and renamed,
    so a run killed mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    config = {k: model.config[k] for k in WAN_6x256}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"config": json.dumps(config),
                                      **{k: json.dumps(v) for k, v in (metadata or {}).items()}})
    os.replace(tmp, path)


def checkpoint_metadata(path: str | Path) -> dict:
    """Everything save_model wrote beside the tensors, decoded ("config", and e.g. "training")."""
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def load_model(path: str | Path = transformer_configs["short"].checkpoint, device="cpu",
               dtype=torch.float32) -> WanTransformer3DModel:
    """The model saved at `path` (its own config from the file), in eval mode on `device`, in `dtype`
    except the modules Wan keeps in float32."""
    config = checkpoint_metadata(path)["config"]
    config["patch_size"] = tuple(config["patch_size"])
    model = WanTransformer3DModel(**config)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.to(device)
    # like diffusers' from_pretrained(torch_dtype=...): Wan's _keep_in_fp32_modules (rotary tables, time
    # embedder, norms, modulation tables) keep their precision, as they had in training under autocast
    keep = set(model._keep_in_fp32_modules)
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if keep.isdisjoint(f"{module_name}.{name}".split(".")):
                tensor.data = tensor.data.to(dtype)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _caption_table(device: torch.device) -> torch.Tensor:
    """[NUM_CLASSES + 1, CAPTION_LEN, CAPTION_DIM]: one fixed N(0, 1) caption per class, then zeros (NULL)."""
    g = torch.Generator().manual_seed(CAPTION_SEED)
    table = torch.randn(NUM_CLASSES, CAPTION_LEN, CAPTION_DIM, generator=g)
    return torch.cat([table, torch.zeros(1, CAPTION_LEN, CAPTION_DIM)]).to(device)


def caption(labels: torch.Tensor) -> torch.Tensor:
    """encoder_hidden_states float32 [B, CAPTION_LEN, CAPTION_DIM] for labels [B] in range(NUM_CLASSES)
    or NULL, on the labels' device."""
    return _caption_table(labels.device)[labels]
