"""Tiny random-weight instances of every video (spatio-temporal) denoising transformer that
diffusers 0.42.1 exports, for graph-level tests of the `compact` backend.

``FAMILY[name]()`` returns ``(model, inputs)``: a float32 model in ``.eval()`` (1-2 layers, 2 heads,
head dim 16-32, seeded with ``torch.manual_seed``) and the keyword arguments of one forward call
(``return_dict=False`` where the model takes it), so that ``model(**inputs)`` runs in under 2 s on a
CPU (the first flex_attention call of a process costs a few seconds more, once). Parameters that a class
initialises to exactly zero are re-drawn (see ``_finish``) so that every attention site moves the output.
``VIDEO_GRID[name]`` is the (T, H, W) grid of noisy-video tokens after patchify for that config (mostly
4x16x16); where the sequence also holds other tokens (history/reference frames, audio, text, image) the
grid still counts only the noisy video.

Text inputs are 10 tokens; where the model takes a text mask, the last 2 are padding (Wan-I2V and
Wan-Animate get 512 text tokens: their processors split the keys at a hard-coded 512). diffusers is
imported inside each builder, so importing this module is free. The list was made by reading
``diffusers/models/transformers/`` of 0.42.1; a few entries are second configs of one class that change
the attention path (``wan_i2v``: image tokens; ``skyreels_v2_df``: frame-causal mask; ``cogvideox15``:
Linear patch embedding; ``kandinsky5_nabla``: flex attention). ``EXCLUDED`` lists the 3D classes left
out and why.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

B, T, H, W = 1, 4, 16, 16          # video tokens after patchify
L_TEXT, N_PAD = 10, 2              # prompt tokens, of which the last N_PAD are padding
SEED = 0

FAMILY: dict[str, Callable[[], tuple[nn.Module, dict]]] = {}
VIDEO_GRID: dict[str, tuple[int, int, int]] = {}

EXCLUDED = {
    "TransformerTemporalModel": "a temporal-only block used inside UNet video models, not a denoiser by itself",
    "LTX2VideoDiffusionDecoderModel": "a VAE diffusion decoder (diffusers.models.autoencoders), not the denoiser",
}


def _register(name: str, grid: tuple[int, int, int]):
    def deco(fn):
        FAMILY[name] = fn
        VIDEO_GRID[name] = grid
        return fn
    return deco


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def _text(dim: int, length: int = L_TEXT):
    return _randn(B, length, dim)


def _text_mask(length: int = L_TEXT, pad: int = N_PAD, dtype=torch.bool):
    m = torch.ones(B, length, dtype=torch.bool)
    if pad:
        m[:, length - pad:] = False
    return m.to(dtype)


def _finish(model: nn.Module, inputs: dict):
    """float32, eval, and every parameter the class initialises to exactly zero (adaLN-Zero gates and
    modulations, zero-init output layers, SANA-WM's short convolutions) re-drawn from N(0, 0.1^2): with them at
    zero some models' outputs do not depend on attention at all (Kandinsky 5's gates), which would make
    dense-vs-sparse comparisons vacuous. Seeded, so still reproducible."""
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model.float().eval(), inputs


def _seed():
    torch.manual_seed(SEED)


# ---------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2 family: Conv3d patch embedding, video self-attention, text cross-attention


def _wan_kwargs(**over):
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    kw.update(over)
    return kw


def _wan_like(cls_name: str, **config):
    """A Wan-architecture class at the shared tiny config, called as Wan is."""
    import diffusers
    _seed()
    model = getattr(diffusers, cls_name)(**_wan_kwargs(**config))
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=_text(16), return_dict=False)
    return _finish(model, inputs)


@_register("wan", (T, H, W))
def wan():
    return _wan_like("WanTransformer3DModel")


@_register("wan_i2v", (T, H, W))
def wan_i2v():
    """Wan 2.1 I2V: CLIP image tokens concatenated before the text (cross-attention keys only)."""
    from diffusers import WanTransformer3DModel
    _seed()
    model = WanTransformer3DModel(**_wan_kwargs(in_channels=8, image_dim=16, added_kv_proj_dim=32))
    # WanAttnProcessor splits the keys as [image | last 512 = text] (hard-coded text length 512), so the text is
    # padded with zero rows to 512 tokens, as WanImageToVideoPipeline does.
    text = torch.cat([_text(16), torch.zeros(B, 512 - L_TEXT, 16)], dim=1)
    inputs = dict(hidden_states=_randn(B, 8, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=text, encoder_hidden_states_image=_randn(B, 6, 16), return_dict=False)
    return _finish(model, inputs)


@_register("wan_vace", (T, H, W))
def wan_vace():
    from diffusers import WanVACETransformer3DModel
    _seed()
    model = WanVACETransformer3DModel(**_wan_kwargs(vace_layers=[0], vace_in_channels=8))
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=_text(16), control_hidden_states=_randn(B, 8, T, 2 * H, 2 * W),
                  return_dict=False)
    return _finish(model, inputs)


@_register("chronoedit", (T, H, W))
def chronoedit():
    return _wan_like("ChronoEditTransformer3DModel")


@_register("skyreels_v2", (T, H, W))
def skyreels_v2():
    return _wan_like("SkyReelsV2Transformer3DModel")


@_register("skyreels_v2_df", (T, H, W))
def skyreels_v2_df():
    """SkyReels-V2 diffusion forcing: per-frame timesteps, frame-block causal mask (num_frame_per_block=2)."""
    from diffusers import SkyReelsV2Transformer3DModel
    _seed()
    model = SkyReelsV2Transformer3DModel(**_wan_kwargs(num_frame_per_block=2))
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([[900, 900, 500, 500]]),
                  encoder_hidden_states=_text(16), enable_diffusion_forcing=True, return_dict=False)
    return _finish(model, inputs)


@_register("wan_animate", (T, H, W))
def wan_animate():
    from diffusers import WanAnimateTransformer3DModel
    _seed()
    model = WanAnimateTransformer3DModel(**_wan_kwargs(
        in_channels=12, latent_channels=4, image_dim=16, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=2))
    text = torch.cat([_text(16), torch.zeros(B, 512 - L_TEXT, 16)], dim=1)   # 512 text tokens, as for wan_i2v
    inputs = dict(hidden_states=_randn(B, 12, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=text, encoder_hidden_states_image=_randn(B, 6, 16),
                  pose_hidden_states=_randn(B, 4, T - 1, 2 * H, 2 * W),
                  face_pixel_values=_randn(B, 3, 4 * (T - 1) - 3, 16, 16), return_dict=False)
    return _finish(model, inputs)


@_register("helios", (T, H, W))
def helios():
    """Helios: the noisy frames plus short/mid/long history latents in one self-attention sequence."""
    from diffusers import HeliosTransformer3DModel
    _seed()
    kw = _wan_kwargs(rope_dim=(4, 6, 6), has_multi_term_memory_patch=True,
                     guidance_cross_attn=True, zero_history_timestep=True)
    del kw["rope_max_seq_len"]
    model = HeliosTransformer3DModel(**kw)
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=_text(16),
                  indices_hidden_states=torch.arange(3, 3 + T)[None].float(),
                  indices_latents_history_short=torch.tensor([[2.0]]),
                  indices_latents_history_mid=torch.tensor([[1.0]]),
                  indices_latents_history_long=torch.tensor([[0.0] * 4]),
                  latents_history_short=_randn(B, 4, 1, 2 * H, 2 * W),
                  latents_history_mid=_randn(B, 4, 1, 2 * H, 2 * W),
                  latents_history_long=_randn(B, 4, 4, 2 * H, 2 * W), return_dict=False)
    return _finish(model, inputs)


@_register("anyflow", (T, H, W))
def anyflow():
    from diffusers import AnyFlowTransformer3DModel
    _seed()
    model = AnyFlowTransformer3DModel(**_wan_kwargs())
    inputs = dict(hidden_states=_randn(B, T, 4, 2 * H, 2 * W), timestep=torch.full((B, T), 500.0),
                  r_timestep=torch.full((B, T), 250.0), encoder_hidden_states=_text(16), return_dict=False)
    return _finish(model, inputs)


# ---------------------------------------------------------------------------------------------
# CogVideoX family: joint text+video attention, text first


def _cog_kwargs(**over):
    kw = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
              text_embed_dim=16, num_layers=2, sample_width=2 * W, sample_height=2 * H, sample_frames=4 * (T - 1) + 1,
              patch_size=2, temporal_compression_ratio=4, max_text_seq_length=L_TEXT)
    kw.update(over)
    return kw


@_register("cogvideox", (T, H, W))
def cogvideox():
    """CogVideoX 1.0 (2B-style): Conv2d patch embedding per frame, sincos positions."""
    from diffusers import CogVideoXTransformer3DModel
    _seed()
    model = CogVideoXTransformer3DModel(**_cog_kwargs())
    inputs = dict(hidden_states=_randn(B, T, 4, 2 * H, 2 * W), encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500]), return_dict=False)
    return _finish(model, inputs)


@_register("cogvideox15", (T // 2, H, W))
def cogvideox15():
    """CogVideoX 1.5: patch_size_t=2 (Linear patch embedding over a reshaped latent), 3D RoPE."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    _seed()
    model = CogVideoXTransformer3DModel(**_cog_kwargs(patch_size_t=2, use_rotary_positional_embeddings=True,
                                                      ofs_embed_dim=None))
    rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=None, grid_size=(H, W), temporal_size=T // 2,
                                   grid_type="slice", max_size=(H, W))
    inputs = dict(hidden_states=_randn(B, T, 4, 2 * H, 2 * W), encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500]), image_rotary_emb=rope, return_dict=False)
    return _finish(model, inputs)


@_register("consisid", (T, H, W))
def consisid():
    from diffusers import ConsisIDTransformer3DModel
    _seed()
    model = ConsisIDTransformer3DModel(**_cog_kwargs(is_train_face=False))
    inputs = dict(hidden_states=_randn(B, T, 4, 2 * H, 2 * W), encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500]), return_dict=False)
    return _finish(model, inputs)


# ---------------------------------------------------------------------------------------------
# HunyuanVideo family: dual-stream + single-stream blocks, joint attention, text last, key padding


@_register("hunyuan_video", (T, H, W))
def hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel
    _seed()
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), guidance_embeds=True)
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=_text(16), encoder_attention_mask=_text_mask(dtype=torch.float32),
                  pooled_projections=_randn(B, 8), guidance=torch.tensor([6000.0]), return_dict=False)
    return _finish(model, inputs)


@_register("hunyuan_video15", (T, H, W))
def hunyuan_video15():
    from diffusers import HunyuanVideo15Transformer3DModel
    _seed()
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v")
    inputs = dict(hidden_states=_randn(B, 4, T, H, W), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=_text(16), encoder_attention_mask=_text_mask(dtype=torch.float32),
                  encoder_hidden_states_2=_text(8, 6), encoder_attention_mask_2=_text_mask(6, 1, torch.float32),
                  image_embeds=torch.zeros(B, 3, 12), return_dict=False)
    return _finish(model, inputs)


@_register("hunyuan_video_framepack", (T, H, W))
def hunyuan_video_framepack():
    """FramePack: noisy section + clean/2x/4x-compressed history tokens + image tokens in one sequence."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    _seed()
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), guidance_embeds=True, image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True)
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=_text(16), encoder_attention_mask=_text_mask(dtype=torch.float32),
                  pooled_projections=_randn(B, 8), guidance=torch.tensor([6000.0]),
                  image_embeds=_randn(B, 6, 16), indices_latents=torch.arange(3, 3 + T),
                  latents_clean=_randn(B, 4, 2, 2 * H, 2 * W), indices_latents_clean=torch.tensor([0, 7]),
                  latents_history_2x=_randn(B, 4, 2, 2 * H, 2 * W), indices_latents_history_2x=torch.tensor([8, 9]),
                  latents_history_4x=_randn(B, 4, 4, 2 * H, 2 * W),
                  indices_latents_history_4x=torch.arange(10, 14), return_dict=False)
    return _finish(model, inputs)


@_register("motif_video", (T, H, W))
def motif_video():
    from diffusers import MotifVideoTransformer3DModel
    _seed()
    model = MotifVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_decoder_layers=0, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16, image_embed_dim=None,
        rope_axes_dim=(4, 6, 6))
    inputs = dict(hidden_states=_randn(B, 9, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=_text(16), encoder_attention_mask=_text_mask(dtype=torch.float32),
                  return_dict=False)
    return _finish(model, inputs)


# ---------------------------------------------------------------------------------------------
# LTX family: tokens come in already patchified ([B, N, C]); the grid is Python ints


@_register("ltx_video", (T, H, W))
def ltx_video():
    from diffusers import LTXVideoTransformer3DModel
    _seed()
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                       cross_attention_dim=32, num_layers=2, caption_channels=16)
    inputs = dict(hidden_states=_randn(B, T * H * W, 8), encoder_hidden_states=_text(16), timestep=torch.tensor([500]),
                  encoder_attention_mask=_text_mask(dtype=torch.float32), num_frames=T, height=H, width=W,
                  rope_interpolation_scale=(20 / 25, 32, 32), return_dict=False)
    return _finish(model, inputs)


# ---------------------------------------------------------------------------------------------
# Others


@_register("mochi", (T, H, W))
def mochi():
    from diffusers import MochiTransformer3DModel
    _seed()
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                    max_sequence_length=L_TEXT)
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500]), encoder_attention_mask=_text_mask(), return_dict=False)
    return _finish(model, inputs)


@_register("allegro", (T, H, W))
def allegro():
    from diffusers import AllegroTransformer3DModel
    _seed()
    model = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
                                      in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=32,
                                      sample_height=2 * H, sample_width=2 * W, sample_frames=T, caption_channels=16)
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500]), encoder_attention_mask=_text_mask(dtype=torch.float32),
                  return_dict=False)
    return _finish(model, inputs)


@_register("latte", (T, H, W))
def latte():
    """Latte: factorised attention — spatial (per frame, B*T sequences of H*W) and temporal (per patch)."""
    from diffusers import LatteTransformer3DModel
    _seed()
    model = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=32, sample_size=2 * H, patch_size=2,
                                    norm_type="ada_norm_single", caption_channels=16, video_length=T)
    # The Latte pipeline passes no text mask: the model's spatial blocks see B*T sequences and a [B, L] mask
    # would not broadcast (the processor's view(batch, heads, ...) fails).
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=_text(16), return_dict=False)
    return _finish(model, inputs)


@_register("easyanimate", (T, H, W))
def easyanimate():
    from diffusers import EasyAnimateTransformer3DModel
    _seed()
    model = EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                          patch_size=2, sample_width=2 * W, sample_height=2 * H, num_layers=2,
                                          mmdit_layers=2, time_embed_dim=16, text_embed_dim=16)
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                  encoder_hidden_states=_text(16), return_dict=False)
    return _finish(model, inputs)


@_register("cosmos", (T, H, W))
def cosmos():
    from diffusers import CosmosTransformer3DModel
    _seed()
    model = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                     num_layers=2, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=4,
                                     max_size=(T, 2 * H, 2 * W), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
                                     concat_padding_mask=False, extra_pos_embed_type="learnable")
    # concat_padding_mask=True (the Cosmos 1.0 checkpoints) resizes the mask with torchvision, which this
    # environment does not have; it only adds one input channel to the Linear patch embedding.
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=_text(16), fps=24, return_dict=False)
    return _finish(model, inputs)


@_register("sana_video", (T, H, W))
def sana_video():
    from diffusers import SanaVideoTransformer3DModel
    _seed()
    model = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                        cross_attention_dim=32, caption_channels=16, sample_size=2 * H,
                                        patch_size=(1, 2, 2))
    inputs = dict(hidden_states=_randn(B, 4, T, 2 * H, 2 * W), encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500]), encoder_attention_mask=_text_mask(dtype=torch.float32),
                  return_dict=False)
    return _finish(model, inputs)


@_register("kandinsky5", (T, H, W))
def kandinsky5():
    from diffusers import Kandinsky5Transformer3DModel
    _seed()
    model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                                         out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64,
                                         num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6))
    inputs = dict(hidden_states=_randn(B, T, 2 * H, 2 * W, 4), encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500.0]), pooled_projections=_randn(B, 8),
                  visual_rope_pos=[torch.arange(T), torch.arange(H), torch.arange(W)],
                  text_rope_pos=torch.arange(L_TEXT), return_dict=False)
    return _finish(model, inputs)


@_register("kandinsky6", (T, H, W))
def kandinsky6():
    """Kandinsky 6 (TI2VA): video and audio streams, each with its own self-attention, text cross-attention
    (key-padding mask) and audio<->video cross-attention."""
    from diffusers import Kandinsky6Transformer3DModel
    _seed()
    model = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8,
                                         time_dim=16, patch_size=(1, 2, 2), model_dim=32, ff_dim=64,
                                         num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
                                         visual_cond=True, in_audio_dim=4, out_audio_dim=4)
    inputs = dict(hidden_states=_randn(B, T, 2 * H, 2 * W, 2 * 4 + 1), encoder_hidden_states=_text(16),
                  pooled_projections=_randn(B, 8), timestep=torch.tensor([500.0]), audio_hidden_states=_randn(B, 12, 4),
                  encoder_attention_mask=_text_mask(), return_dict=False)
    return _finish(model, inputs)


@_register("kandinsky6_sr", (T, H, W))
def kandinsky6_sr():
    """Kandinsky 6 video super-resolution: NABLA block-sparse attention on flex_attention (8x8 token blocks)."""
    from diffusers import Kandinsky6SRTransformer3DModel
    _seed()
    model = Kandinsky6SRTransformer3DModel(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 2, 2),
                                           model_dim=32, ff_dim=64, num_visual_blocks=2, axes_dims=(4, 6, 6))
    inputs = dict(hidden_states=_randn(B, T, 2 * H, 2 * W, 2 * 4 + 1), timestep=torch.tensor([500.0]),
                  return_dict=False)
    return _finish(model, inputs)


@_register("ltx2", (T, H, W))
def ltx2():
    """LTX-2 audio+video: pre-patchified video tokens ([B, N, C]) with the grid as Python ints, audio tokens,
    video<->audio cross-attention, text cross-attention with key padding."""
    from diffusers import LTX2VideoTransformer3DModel
    _seed()
    model = LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                        num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                                        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2,
                                        caption_channels=16, rope_double_precision=False)
    inputs = dict(hidden_states=_randn(B, T * H * W, 8), audio_hidden_states=_randn(B, 9, 4),
                  encoder_hidden_states=_text(16), audio_encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500.0]), encoder_attention_mask=_text_mask(),
                  audio_encoder_attention_mask=_text_mask(), num_frames=T, height=H, width=W, audio_num_frames=9,
                  fps=25.0, return_dict=False)
    return _finish(model, inputs)


@_register("sana_wm", (T, H, W))
def sana_wm():
    """SANA-WM (world model, camera-controlled): Gated-DeltaNet linear-attention blocks with a softmax block every
    `softmax_every_n` layers, camera (UCPE) conditioning, text cross-attention with padding."""
    from diffusers import SanaWMTransformer3DModel
    _seed()
    model = SanaWMTransformer3DModel(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
                                     patch_size=(1, 1, 1), softmax_every_n=2, linear_head_dim=16, t_kernel_size=3,
                                     conv_kernel_size=4, caption_channels=16, mlp_ratio=2.0,
                                     chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2)
    c2w = torch.eye(4).repeat(B, T, 1, 1)
    c2w[..., 2, 3] = torch.arange(T, dtype=torch.float32) * 0.1
    intr = torch.tensor([float(W), float(H), W / 2, H / 2]).expand(B, T, 4)
    inputs = dict(hidden_states=_randn(B, 4, T, H, W), timestep=torch.full((B, 1, T), 500.0),
                  encoder_hidden_states=_randn(B, 1, L_TEXT, 16), encoder_attention_mask=_text_mask(dtype=torch.long),
                  camera_conditions=torch.cat([c2w.flatten(-2), intr], dim=-1),
                  chunk_plucker=_randn(B, 8, T, H, W), return_dict=False)
    return _finish(model, inputs)


@_register("sana_wm_refiner", (T, H, W))
def sana_wm_refiner():
    """SANA-WM stage-2 refiner (LTX-2 based, video only): pre-patchified tokens, caller-supplied video RoPE."""
    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    _seed()
    model = SanaWMLTX2RefinerTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                                num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                                audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                                                audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2,
                                                caption_channels=16, rope_double_precision=False)
    rope = model.build_rotary_emb_for_absolute_positions(batch_size=B, frame_positions=list(range(T)), height=H,
                                                         width=W, device=torch.device("cpu"), fps=24.0)
    inputs = dict(hidden_states=_randn(B, T * H * W, 8), encoder_hidden_states=_text(16),
                  timestep=torch.full((B, T * H * W), 500.0), video_rotary_emb=rope,
                  encoder_attention_mask=_text_mask(dtype=torch.float32), return_dict=False)
    return _finish(model, inputs)


@_register("joyimage_edit", (2, H, W))
def joyimage_edit():
    """JoyImage-Edit (image editing on a 3D latent): the reference and target images are two 'frames'."""
    from diffusers import JoyImageEditTransformer3DModel
    _seed()
    model = JoyImageEditTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2,
                                           text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6])
    inputs = dict(hidden_states=_randn(B, 2, 4, 1, 2 * H, 2 * W), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=_text(16), return_dict=False)
    return _finish(model, inputs)


@_register("joyimage_edit_plus", (2, H, W))
def joyimage_edit_plus():
    """JoyImage-Edit-Plus: packed pre-patchified sequences ([B, N, C, 1, 2, 2]) with per-sample shape lists; the
    Conv3d runs per patch, so its output is [B*N, D, 1, 1, 1]; joint mask = image valid tokens + text padding."""
    from diffusers import JoyImageEditPlusTransformer3DModel
    _seed()
    model = JoyImageEditPlusTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, hidden_size=32,
                                               num_attention_heads=2, text_dim=16, num_layers=2,
                                               rope_dim_list=[4, 6, 6])
    inputs = dict(hidden_states=_randn(B, 2 * H * W, 4, 1, 2, 2), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=_text(16), encoder_hidden_states_mask=_text_mask(dtype=torch.float32),
                  shape_list=[[(1, H, W), (1, H, W)]], return_dict=False)
    return _finish(model, inputs)


@_register("minimax_h3", (T, H, W))
def minimax_h3():
    """MiniMax-H3 (audio+video): one packed joint sequence [text | audio | video] built with index_copy from
    pre-patchified video tokens; the grid only appears in position_ids."""
    from diffusers import MiniMaxH3Transformer3DModel
    _seed()
    model = MiniMaxH3Transformer3DModel(num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2,
                                        num_refiner_layers=1, ffn_dim=64, in_channels=4, audio_in_channels=6,
                                        patch_size=(1, 2, 2), text_dim=16, freq_dim=16, time_embed_hidden_dim=32,
                                        time_embed_dim=16, rope_freq_dim=2)
    n_audio, n_video = 12, T * H * W
    n = L_TEXT + n_audio + n_video
    text_idx = torch.arange(L_TEXT)
    audio_idx = torch.arange(L_TEXT, L_TEXT + n_audio)
    video_idx = torch.arange(L_TEXT + n_audio, n)
    tags = torch.empty(n, dtype=torch.long)
    tags[text_idx], tags[audio_idx], tags[video_idx] = 1, 2, 0
    ts_idx = torch.zeros(n, dtype=torch.long)
    ts_idx[audio_idx] = 1
    pos = torch.zeros(n, 3)
    pos[:, 0] = torch.arange(n, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"), -1)
    pos[video_idx] = grid.reshape(-1, 3).float() + torch.tensor([float(L_TEXT + n_audio), 0.0, 0.0])
    inputs = dict(hidden_states=_randn(B, n_video, 16), audio_hidden_states=_randn(B, n_audio, 6),
                  encoder_hidden_states=_text(16), timestep=torch.tensor([0.7, 0.3]), timestep_indices=ts_idx,
                  token_tags=tags, position_ids=pos, video_indices=video_idx, audio_indices=audio_idx,
                  text_indices=text_idx, return_dict=False)
    return _finish(model, inputs)


@_register("cosmos3_omni", (T, H, W))
def cosmos3_omni():
    """Cosmos 3 Omni: a packed mixture-of-transformers sequence [text (causal 'und' stream) | vision ('gen'
    stream)]; the vision queries attend to text+vision keys; GQA (2 query heads, 1 kv head)."""
    from diffusers import Cosmos3OmniTransformer
    _seed()
    model = Cosmos3OmniTransformer(head_dim=16, hidden_act="relu2", hidden_size=32, intermediate_size=64,
                                   latent_channel=4, latent_patch_size=2, num_attention_heads=2, num_hidden_layers=2,
                                   num_key_value_heads=1, patch_latent_dim=16, qk_norm_for_text=False,
                                   rms_norm_eps=1e-5, rope_axes_dim=[2, 3, 3], vocab_size=64,
                                   enable_fps_modulation=False)
    n_vision = T * H * W
    text_ids = torch.arange(L_TEXT).unsqueeze(0).expand(3, -1)
    off = L_TEXT + 15000
    g = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"), 0)
    vision_ids = g.reshape(3, -1) + torch.tensor([off, 0, 0])[:, None]
    vis_idx = torch.arange(L_TEXT, L_TEXT + n_vision)
    inputs = dict(input_ids=torch.randint(0, 64, (L_TEXT,)), text_indexes=torch.arange(L_TEXT),
                  position_ids=torch.cat([text_ids, vision_ids], 1), und_len=L_TEXT,
                  sequence_length=L_TEXT + n_vision, vision_tokens=[_randn(1, 4, T, 2 * H, 2 * W)],
                  vision_token_shapes=[(T, H, W)], vision_sequence_indexes=vis_idx, vision_mse_loss_indexes=vis_idx,
                  vision_timesteps=torch.full((n_vision,), 500.0), vision_noisy_frame_indexes=[torch.arange(T)],
                  return_dict=False)
    return _finish(model, inputs)


@_register("anyflow_far", (T, H, W))
def anyflow_far():
    """AnyFlow FAR (frame-autoregressive) inference step, as the pipeline calls it: the current chunk's queries
    attend to [cached compressed | cached full | current] keys through the *flex* attention backend (no mask)."""
    from diffusers import AnyFlowFARTransformer3DModel
    _seed()
    model = AnyFlowFARTransformer3DModel(**_wan_kwargs(compressed_patch_size=(1, 4, 4), full_chunk_limit=3))
    heads, hd = 2, 16
    chunks = [T, T]                              # one cached chunk, then the current one
    full_tok, comp_tok = H * W, (H // 2) * (W // 2)
    kv_cache = {i: {"full_cache": _randn(2, B, heads, 3 * max(chunks) * full_tok, hd),
                    "compressed_cache": _randn(2, B, heads, (len(chunks) - 3 + 1) * max(chunks) * comp_tok, hd)}
                for i in range(2)}
    inputs = dict(hidden_states=_randn(B, T, 4, 2 * H, 2 * W), timestep=torch.full((B, T), 500.0),
                  r_timestep=torch.full((B, T), 500.0), encoder_hidden_states=_text(16), chunk_partition=chunks,
                  kv_cache=kv_cache, kv_cache_flag={"num_cached_chunks": 1, "is_cache_step": False},
                  return_dict=False)
    return _finish(model, inputs)


@_register("wan_animate2", (T, H, W))
def wan_animate2():
    """Wan-Animate 2 denoising pass (kv_cache_mode='cached'): the video queries attend to their own keys plus the
    reference (driving video) K/V cached by an 'extract' pass, which the builder runs once."""
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    _seed()
    model = WanAnimate2Transformer3DModel(patch_size=(1, 2, 2), text_len=L_TEXT, in_dim=4 + 8, dim=32, ffn_dim=64,
                                          freq_dim=32, text_dim=16, out_dim=4, num_heads=2, num_layers=2,
                                          use_img_emb=True)
    model, _ = _finish(model, {})                # re-draw zero-init parameters before filling the cache
    ref_t = T - 1
    cache = WanAnimate2KVCache(2)
    with torch.no_grad():
        model(hidden_states=[_randn(4, ref_t, 2 * H, 2 * W)], timestep=torch.tensor([1.0]),
              encoder_hidden_states=[_randn(L_TEXT, 16)], condition_latents=[_randn(8, ref_t, 2 * H, 2 * W)],
              encoder_hidden_states_image=_randn(1, 4, 1280), kv_cache=cache, kv_cache_mode="extract",
              seq_len=ref_t * H * W, offset_grid_sizes=torch.tensor([[ref_t, H, W]]))
    inputs = dict(hidden_states=[_randn(4, T, 2 * H, 2 * W)], timestep=torch.tensor([500.0]),
                  encoder_hidden_states=[_randn(L_TEXT, 16)], condition_latents=[_randn(8, T, 2 * H, 2 * W)],
                  encoder_hidden_states_image=_randn(1, 4, 1280), kv_cache=cache, kv_cache_mode="cached",
                  seq_len=T * H * W, reference_grid_sizes=torch.tensor([[ref_t, H, W]]),
                  origin_len=4 * (ref_t - 1) + 1, origin_area=[16 * H, 16 * W], return_dict=False)
    return _finish(model, inputs)


@_register("kandinsky5_nabla", (T, H, W))
def kandinsky5_nabla():
    """Kandinsky 5 with NABLA sparse attention (the Pro configs): tokens reordered into 8x8 'fractal' blocks, a
    per-call flex BlockMask from pooled q/k (top-CDF) united with a sliding-tile mask; diffusers' flex backend."""
    from diffusers import Kandinsky5Transformer3DModel
    _seed()
    model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                                         out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64,
                                         num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
                                         attention_type="nabla", attention_causal=False, attention_local=False,
                                         attention_glob=False, attention_window=3, attention_P=0.9, attention_wT=11,
                                         attention_wW=3, attention_wH=3, attention_add_sta=True,
                                         attention_method="topcdf")
    # set_attention_backend also sets diffusers' process-wide default: every other model keeps its own
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    default = _AttentionBackendRegistry._active_backend
    model.set_attention_backend("flex")
    _AttentionBackendRegistry.set_active_backend(default)
    # Kandinsky5T2VPipeline.fast_sta_nabla / get_sparse_params, inlined (the pipeline module needs transformers)
    t, h, w = T, H // 8, W // 8
    r = torch.arange(max(t, h, w))
    mat = (r[:, None] - r[None]).abs()
    sta_t, sta_h, sta_w = (mat[:t, :t].flatten() <= 11 // 2, mat[:h, :h].flatten() <= 3 // 2,
                           mat[:w, :w].flatten() <= 3 // 2)
    sta_hw = (sta_h[:, None] * sta_w[None]).reshape(h, h, w, w).transpose(1, 2).flatten()
    sta = (sta_t[:, None] * sta_hw[None]).reshape(t, t, h * w, h * w).transpose(1, 2).reshape(t * h * w, t * h * w)
    sparse_params = {"sta_mask": sta[None, None], "attention_type": "nabla", "to_fractal": True, "P": 0.9,
                     "wT": 11, "wW": 3, "wH": 3, "add_sta": True, "visual_shape": (T, H, W), "method": "topcdf"}
    inputs = dict(hidden_states=_randn(B, T, 2 * H, 2 * W, 4), encoder_hidden_states=_text(16),
                  timestep=torch.tensor([500.0]), pooled_projections=_randn(B, 8),
                  visual_rope_pos=[torch.arange(T), torch.arange(H), torch.arange(W)],
                  text_rope_pos=torch.arange(L_TEXT), sparse_params=sparse_params, return_dict=False)
    return _finish(model, inputs)
