"""Helpers and tiny model builders shared by the tests.

Everything here is small on purpose: the suite runs on a 2-core CPU machine. Most tests compile with
`inner="eager"` or `"aot_eager"`; only a couple of integration tests pay for an Inductor compile.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compact_compile.kernels.reference import rectified_attention_reference, token_mask
from compact_compile.kernels.registry import kernel_class, kv_block_lists
from compact_compile.kernels.site import make_site
from compact_compile.layout import TokenLayout
from compact_compile.spec import Selection, SiteSpec, single_range

# The block-sparse path exactly as planned at every call: no rectification and no dense warm-up
# steps (both on by default), so a compiled model equals a float64 model using the plan's mask.
AS_PLANNED = {"rectify": False, "dense_steps": 0}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"    # Triton runs here (on the CPU, its interpreter)


def _fp8_here() -> bool:
    from compact_compile.kernels.fp8 import fp8_unsupported
    from compact_compile.kernels.triton_sparse import triton_available
    return not fp8_unsupported(DEVICE) and triton_available(DEVICE)


needs_fp8 = pytest.mark.skipif(not _fp8_here(), reason="needs e4m3 tensor cores or TRITON_INTERPRET=1")

# ----------------------------------------------------------------------------------------------
# errors raised inside a backend reach the caller wrapped in BackendCompilerFailed


def root_error(exc: BaseException) -> BaseException:
    """The exception a backend raised, unwrapped from Dynamo's BackendCompilerFailed."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


@contextlib.contextmanager
def raises_from_backend(exc_type, match: str | None = None):
    """Like pytest.raises, for an error raised by the backend (wrapped or not)."""
    import re

    with pytest.raises(Exception) as info:
        yield info
    err = root_error(info.value)
    assert isinstance(err, exc_type), f"expected {exc_type.__name__}, got {type(err).__name__}: {err}"
    if match is not None:
        assert re.search(match, str(err)), f"{match!r} not found in {str(err)!r}"
    info.root = err


# ----------------------------------------------------------------------------------------------
# kernels and site runtimes built the way the backend builds them


def flat_layout(seq_len: int, block_size: int) -> TokenLayout:
    """A layout whose tiled order is the model's order: for kernel tests on plain sequences."""
    return TokenLayout((1, 1, seq_len), (1, 1, block_size), block_size)


def kernel_attend(name: str, blocks, q, k, v, scale=None, key_valid=None, rectify=None, block_size: int = 64):
    """Kernel `name` over bool `blocks` `[B or H or 1, …, nb, nb]`, as a site runtime calls it."""
    kernel = kernel_class(name)(flat_layout(q.shape[-2], block_size))
    prepared = kernel.prepare(tuple(x.to(q.device) for x in kv_block_lists(blocks)))
    return kernel.attend(q, k, v, prepared, scale, key_valid, rectify)


def site_runtime(layout: TokenLayout, blocks, *, kernel: str = "flex", rectify=None, dynamic: bool = False,
                 p_remain: float = 0.3, drop: float = 0.9, key_mask: bool = False):
    """The runtime of one site with one static block map (`rectify`: None, "block", "rows")."""
    selection = Selection(p_remain, drop) if dynamic else None
    spec = SiteSpec("site", layout, single_range(blocks.bool()), selection=selection, rectify=rectify,
                    key_mask=key_mask, kernel=kernel)
    return make_site(spec)


def rectified_site(layout: TokenLayout, static, *, dynamic: bool, rectify: bool, rows: bool = False,
                   p_remain: float = 0.3, drop: float = 0.9, kernel: str = "flex"):
    """`site_runtime` in the options' terms: online choice if `dynamic`, rectification per block or
    per row (`rows`) if `rectify`."""
    return site_runtime(layout, static, kernel=kernel, rectify=("rows" if rows else "block") if rectify else None,
                        dynamic=dynamic, p_remain=p_remain, drop=drop)


# ----------------------------------------------------------------------------------------------
# reference: block-sparse attention as dense SDPA with the equivalent token mask, in model order


def model_order_mask(layout: TokenLayout, blocks: torch.Tensor) -> torch.Tensor:
    """bool `[H or 1, S, S]` in the MODEL's token order: token src[p] may see token src[p'] iff
    block (p // bs, p' // bs) of the tiled sequence is kept (src = layout.source_index())."""
    tiled = token_mask(blocks, layout.seq_len, layout.block_size)
    src = layout.source_index()
    out = torch.zeros_like(tiled)
    out[..., src[:, None], src[None, :]] = tiled
    return out


def key_valid_of(attn_mask, batch: int, seq_len: int):
    """bool `[B, S]` from a key-padding attn_mask `[B or 1, 1, 1, S]` (bool, or additive 0/−inf); None if None."""
    if attn_mask is None:
        return None
    assert attn_mask.shape[-3:-1] == (1, 1), "the reference takes key-padding masks only"
    keys = attn_mask.reshape(-1, seq_len)
    return (keys if keys.dtype == torch.bool else keys > float("-inf")).expand(batch, seq_len)


@contextlib.contextmanager
def _sdpa_for_self_attention(seq_lens, attention):
    """Patch F.scaled_dot_product_attention: self-attention over S tokens, S in `seq_lens`, runs
    `attention(q, k, v, scale, key_valid)` instead (no dropout or causality allowed there; a mask
    only if it is a key-padding mask, handed over as bool `[B, S]`); every other call runs the
    original. Yields a list that collects the sequence lengths of the calls replaced."""
    original = F.scaled_dot_product_attention
    replaced = []

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        S = query.shape[-2]
        if S == key.shape[-2] and S in seq_lens:
            assert not is_causal and dropout_p == 0.0
            replaced.append(S)
            return attention(query, key, value, scale, key_valid_of(attn_mask, query.shape[0], S))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield replaced
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def masked_sdpa(masks_by_len: dict[int, list[torch.Tensor]], ignore_key_mask: bool = False):
    """Self-attention calls over S tokens (S a key of `masks_by_len`) use the next mask of that list,
    in call order (one per site), and the call's own key-padding mask (unless `ignore_key_mask`), in
    float64 (`_sdpa_for_self_attention`)."""
    original = F.scaled_dot_product_attention
    counters = {s: 0 for s in masks_by_len}

    def masked(query, key, value, scale, key_valid):
        S = query.shape[-2]
        mask = masks_by_len[S][counters[S] % len(masks_by_len[S])].to(query.device)
        counters[S] += 1
        if key_valid is not None and not ignore_key_mask:
            mask = mask & key_valid[:, None, None, :].to(query.device)
        return original(query.double(), key.double(), value.double(), attn_mask=mask.to(query.device),
                        scale=scale).to(query.dtype)

    return _sdpa_for_self_attention(masks_by_len, masked)


def rectified_sdpa(layout: TokenLayout, static: torch.Tensor, **options):
    """Self-attention over layout.seq_len tokens becomes the float64 rectified reference
    (kernels/reference.py) of block map `static`, computed in tile order and returned in the model's
    (`_sdpa_for_self_attention`)."""
    src = layout.source_index()

    def rectified(query, key, value, scale, key_valid):
        tiled = [x.index_select(-2, src.to(x.device)) for x in (query, key, value)]
        valid = None if key_valid is None else key_valid.index_select(-1, src.to(key_valid.device))
        out, _ = rectified_attention_reference(*tiled, n_video=layout.n_video, block_size=layout.block_size,
                                               static=static, scale=scale, key_valid=valid, **options)
        return torch.empty_like(out).index_copy_(-2, src, out).to(query.dtype)

    return _sdpa_for_self_attention({layout.seq_len}, rectified)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref|."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------
# tiny diffusers models (random weights)

WAN_LATENT = (1, 4, 3, 16, 18)        # patch (1, 2, 2) → video grid (3, 8, 9) = 216 tokens
WAN_GRID = (3, 8, 9)
COG_LATENT = (1, 3, 4, 16, 16)        # (B, F, C, H, W), patch 2 → grid (3, 8, 8) = 192 tokens
COG_GRID = (3, 8, 8)
COG_TEXT = 12                         # text tokens, before the video tokens in CogVideoX


def tiny_wan(seed: int = 0, heads: int = 2, head_dim: int = 16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                  num_layers=2, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = dict(hidden_states=torch.randn(WAN_LATENT, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 12, 32, generator=g), return_dict=False)
    return model, inputs


def tiny_cogvideox(seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        num_layers=2, sample_width=16, sample_height=16, sample_frames=9,
                                        text_embed_dim=32, time_embed_dim=16, max_text_seq_length=COG_TEXT).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = dict(hidden_states=torch.randn(COG_LATENT, generator=g),
                  encoder_hidden_states=torch.randn(1, COG_TEXT, 32, generator=g),
                  timestep=torch.tensor([500]), return_dict=False)
    return model, inputs


HUNYUAN_GRID = (3, 8, 9)   # latent (4, 3, 16, 18), patch (1, 2, 2)
HUNYUAN_TEXT = 12          # prompt tokens, after the video tokens in the joint sequence


def tiny_hunyuan(seed: int = 0, lengths=(7, 12), head_dim: int = 16):
    """HunyuanVideo (1 dual-stream block, 1 single-stream, 1 refiner), one sample per prompt length:
    its joint attention always carries a key-padding mask `[B, 1, 1, S]` of the prompt's padding.
    head_dim 16 or a multiple of 16 (its RoPE splits it 1:1.5:1.5 over frames, rows, columns)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    rope = (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                           attention_head_dim=head_dim, num_layers=1, num_single_layers=1,
                                           num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                                           qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=32,
                                           pooled_projection_dim=16, rope_axes_dim=rope).eval()
    g = torch.Generator().manual_seed(seed + 1)
    B = len(lengths)
    mask = (torch.arange(HUNYUAN_TEXT)[None] < torch.tensor(lengths)[:, None]).long()
    inputs = dict(hidden_states=torch.randn(B, 4, 3, 16, 18, generator=g), timestep=torch.tensor([500] * B),
                  encoder_hidden_states=torch.randn(B, HUNYUAN_TEXT, 32, generator=g), encoder_attention_mask=mask,
                  pooled_projections=torch.randn(B, 16, generator=g), return_dict=False)
    return model, inputs


MOCHI_GRID = (3, 8, 9)     # latent (4, 3, 16, 18), patch 2 over each frame
MOCHI_TEXT = 8


def tiny_mochi(seed: int = 0, masks=((1, 1, 0, 1, 1, 0, 0, 0), (1,) * 8)):
    """Mochi (2 blocks), one sample per prompt mask (any pattern: its processor gathers the valid
    tokens with `nonzero`, which compact_compile.models replaces while Dynamo traces)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                    activation_fn="swiglu", max_sequence_length=16).eval()
    g = torch.Generator().manual_seed(seed + 1)
    B = len(masks)
    inputs = dict(hidden_states=torch.randn(B, 4, 3, 16, 18, generator=g), timestep=torch.tensor([500] * B),
                  encoder_hidden_states=torch.randn(B, MOCHI_TEXT, 32, generator=g),
                  encoder_attention_mask=torch.tensor(masks), return_dict=False)
    return model, inputs


def to_double(inputs: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------
# hand-written attention modules


class SelfAttention(nn.Module):
    """x [B, S, C] → SDPA over heads of `head_dim`; `call` chooses the SDPA form."""

    def __init__(self, dim: int = 32, heads: int = 2, call: str = "keyword", scale: float | None = None):
        super().__init__()
        self.heads, self.call, self.scale = heads, call, scale
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        if self.call == "positional" and self.scale is None:
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.call == "positional":   # scale and enable_gqa are keyword-only
            o = F.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0,
                                               is_causal=False, scale=self.scale, enable_gqa=False)
        return self.out(o.transpose(1, 2).flatten(2))


class Wrapper(nn.Module):
    """Puts a module at path `attn`, as in a real model (site names are module paths)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, *args):
        return self.attn(*args)


# ----------------------------------------------------------------------------------------------
# distributed: one process playing one rank (tracing needs no peer)


@contextlib.contextmanager
def fake_group(rank: int, world_size: int = 2):
    """This process as rank `rank` on torch's fake process group: collectives trace, and do nothing when run."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def diffusers_parallel_config(rank: int, ring: int = 1, ulysses: int = 1):
    """diffusers' ParallelConfig for context parallelism on a CPU device mesh of ring × ulysses ranks, set
    up as `enable_parallelism` sets it up (which itself needs an accelerator to pick the device)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    config.setup(rank, ring * ulysses, torch.device("cpu"),
                 mesh=init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("ring", "ulysses")))
    return config
