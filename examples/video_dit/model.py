"""The video DiT: a small diffusers WanTransformer3DModel in pixel space, its checkpoint and captions.

16 frames × 64×64 RGB, patches of 1×4×4 pixels: a (16, 16, 16) grid of 4096 tokens, the same kind of
3D video self-attention the compact backend rewrites in the real Wan models. 6 layers of width 256
(4 heads × 64), FFN 1024: 6,964,016 parameters, 13.3 MiB in bf16.

There is no text encoder: a class caption is a FIXED random embedding per digit class (seeded, never
trained), and the label NULL is the empty caption (zeros) used for classifier-free guidance.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .clips import NUM_CLASSES

FRAMES = 16
SIZE = 64
CONFIG = dict(
    patch_size=(1, 4, 4), in_channels=3, out_channels=3,
    num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=6,
    qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6,
    text_dim=64, freq_dim=256,
    rope_max_seq_len=64,    # rotary table per axis: covers the 16-long axes, and up to 256×256 frames
)
CHECKPOINT = Path(__file__).parent / "checkpoint" / "video_dit.safetensors"

CAPTION_LEN = 4
CAPTION_SEED = 20261123
NULL = NUM_CLASSES      # the label of the empty caption


def build_model(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """CONFIG (with `overrides`, e.g. a tiny model for tests) at the random init of `seed`, on the CPU
    (so a seed gives the same weights on every machine). The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**{**CONFIG, **overrides})


def save_model(model: WanTransformer3DModel, path: str | Path) -> None:
    """bf16 safetensors with the model's config in the metadata. Written to a temporary file and
    renamed, so a run killed mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    config = {k: model.config[k] for k in CONFIG}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"config": json.dumps(config)})
    os.replace(tmp, path)


def load_model(path: str | Path = CHECKPOINT, device="cpu", dtype=torch.float32) -> WanTransformer3DModel:
    """The model saved at `path` (its own config from the file), in eval mode on `device`, in `dtype`
    except the modules Wan keeps in float32."""
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
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
    """[NUM_CLASSES + 1, CAPTION_LEN, text_dim]: one fixed N(0, 1) caption per class, then zeros (NULL)."""
    g = torch.Generator().manual_seed(CAPTION_SEED)
    table = torch.randn(NUM_CLASSES, CAPTION_LEN, CONFIG["text_dim"], generator=g)
    return torch.cat([table, torch.zeros(1, CAPTION_LEN, CONFIG["text_dim"])]).to(device)


def caption(labels: torch.Tensor) -> torch.Tensor:
    """encoder_hidden_states float32 [B, CAPTION_LEN, text_dim] for labels [B] in range(NUM_CLASSES)
    or NULL, on the labels' device."""
    return _caption_table(labels.device)[labels]
