"""Graph-break-free joint attention for diffusers' Mochi transformer.

diffusers' `MochiAttnProcessor2_0` loops over the batch and picks each sample's valid prompt tokens
with `torch.nonzero`, a data-dependent shape, so Dynamo breaks the graph there and the joint
video+text SDPA never reaches the compact backend. `joint_attention_masked` computes the same
result with static shapes: one SDPA over [video ++ text] with a boolean key-padding mask, then the
text rows are compacted (valid first, zeros after) the way the original lays them out.

`install()` routes the processor to it only while Dynamo traces; eager calls keep running
diffusers' own code, bit for bit.
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

__all__ = ["joint_attention_masked", "install"]

_PROCESSOR_MODULE = "diffusers.models.attention_processor"
_MARKER = "_compact_compile_mochi_fix"


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic (and float32 upcast) as diffusers' nested helper, so results match exactly.
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def joint_attention_masked(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MochiAttnProcessor2_0.__call__` with one masked SDPA for the whole batch.

    Keys are [video ++ text] (text last); `attn_mask` is bool `[B, 1, 1, S_video + S_text]`, True
    for every video key and for text keys where `attention_mask != 0`. Rows of padded text queries
    are computed and then discarded: the text outputs are reordered so that valid tokens come first
    (in increasing index order) and the rest are zero, exactly as diffusers pads its output.
    """
    query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
    key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
    value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))

    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))

    if attn.norm_added_q is not None:
        encoder_query = attn.norm_added_q(encoder_query)
    if attn.norm_added_k is not None:
        encoder_key = attn.norm_added_k(encoder_key)

    if image_rotary_emb is not None:
        query = _apply_rotary_emb(query, *image_rotary_emb)
        key = _apply_rotary_emb(key, *image_rotary_emb)

    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    encoder_query = encoder_query.transpose(1, 2)
    encoder_key = encoder_key.transpose(1, 2)
    encoder_value = encoder_value.transpose(1, 2)

    batch_size, heads, sequence_length, dim = query.shape
    encoder_sequence_length = encoder_query.size(2)

    # diffusers flattens each sample's mask and indexes text tokens with it: same reading here.
    valid = attention_mask.reshape(batch_size, -1) != 0
    key_mask = torch.cat([valid.new_ones(batch_size, sequence_length), valid], dim=1)[:, None, None, :]

    out = F.scaled_dot_product_attention(
        query=torch.cat([query, encoder_query], dim=2),
        key=torch.cat([key, encoder_key], dim=2),
        value=torch.cat([value, encoder_value], dim=2),
        attn_mask=key_mask,
    )
    video_out, text_out = out.split_with_sizes((sequence_length, encoder_sequence_length), dim=2)

    # The original writes valid text rows compacted after the video rows, zeros after them. A
    # stable sort of "is padding" puts valid indices first in increasing order, for any mask.
    order = torch.argsort((~valid).to(torch.int32), dim=1, stable=True)
    text_out = text_out.gather(2, order[:, None, :, None].expand(-1, heads, -1, dim))
    n_valid = valid.sum(dim=1, keepdim=True)
    keep = torch.arange(encoder_sequence_length, device=valid.device)[None, :] < n_valid
    # where, not a multiply: exact +0 rows, and no NaN * 0 should a padded row ever be non-finite.
    text_out = torch.where(keep[:, None, :, None], text_out, text_out.new_zeros(()))

    hidden_states = torch.cat([video_out, text_out], dim=2).transpose(1, 2).flatten(2, 3)
    hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
        (sequence_length, encoder_sequence_length), dim=1
    )

    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)  # dropout

    if hasattr(attn, "to_add_out"):
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

    return hidden_states, encoder_hidden_states


def install() -> bool:
    """Route `MochiAttnProcessor2_0` to `joint_attention_masked` while Dynamo traces.

    Does nothing unless diffusers is already imported (importing it here would cost every user
    of the backend), and leaves a `__call__` alone that someone else has already replaced.
    Idempotent. Returns True when the fix is in place after the call.
    """
    module = sys.modules.get(_PROCESSOR_MODULE)
    cls = getattr(module, "MochiAttnProcessor2_0", None) if module is not None else None
    if cls is None:
        return False
    original = cls.__dict__.get("__call__")
    if getattr(original, _MARKER, False):
        return True
    if original is None or getattr(original, "__module__", None) != _PROCESSOR_MODULE:
        return False

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        # is_compiling() is a constant to Dynamo, so the eager branch never enters the graph and
        # eager users keep diffusers' exact numerics.
        if torch.compiler.is_compiling():
            return joint_attention_masked(*args, **kwargs)
        return original(self, *args, **kwargs)

    setattr(__call__, _MARKER, True)
    cls.__call__ = __call__
    return True
