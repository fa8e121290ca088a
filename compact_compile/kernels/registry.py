"""The kernel seam: one protocol every block-sparse attention kernel implements, and the registry the
planner chooses from.

A kernel backend is one file in this package plus one entry in `KERNELS`. It is built once per site
with the site's token layout and answers four things:

    unsupported(device, dtype, head_dim, block_size, explicit, key_mask) -> str
                        why it cannot run these inputs ("" if it can): the one place that decides
    prepare(lists)      its own form of a block list (a FlexAttention BlockMask, FA4's block-sparse
                        tensors, …), once per static block map and per call for online choices
    attend(q, k, v, prepared, scale, key_valid, rectify) -> O
                        softmax(q·kᵀ·scale over the listed key blocks, keys with key_valid False
                        excluded)·v; with `rectify=(R, Ō)` (only if `fuses_rectify`) it writes R·O + Ō
    dense(q, k, v, scale, key_valid) -> O
                        full attention, for dense steps and all-block maps: its fastest dense path

FP8 attention (fp8.py) runs on the kernels of `FP8_KERNELS` only, which also answer
    fp8_unsupported(head_dim, block_size, key_mask) -> str
                        why their FP8 path cannot take these inputs ("" if it can)
    attend_fp8(tiles, prepared, scale, dtype, key_valid, rectify) -> O
                        `attend` over e4m3 tiles, the output in dtype (dense steps run `dense`).

Block lists (`BlockLists`) are what `kv_block_lists` makes: per query block the count of kept key
blocks `[B or 1, H or 1, nq]` and their indices, kept first and ascending, `[B or 1, H or 1, nq, nk]`
int32. q, k, v are `[B, H, S, D]` in tiled token order (layout.py); `key_valid` is bool `[B, S]` in
the same order (key-padding masks), or None.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from ..layout import TokenLayout

BlockLists = tuple[torch.Tensor, torch.Tensor]


class SparseKernel(Protocol):
    name: ClassVar[str]
    fuses_rectify: ClassVar[bool]

    def __init__(self, layout: TokenLayout) -> None: ...

    @staticmethod
    def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int,
                    explicit: bool, key_mask: bool = False) -> str: ...

    def prepare(self, lists: BlockLists) -> Any: ...

    def attend(self, q, k, v, prepared, scale: float | None, key_valid: torch.Tensor | None = None,
               rectify: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor: ...

    def dense(self, q, k, v, scale: float | None, key_valid: torch.Tensor | None = None) -> torch.Tensor: ...


def kv_block_lists(blocks: torch.Tensor) -> BlockLists:
    """Per query block, the count of kept key blocks and their indices (kept first, ascending), int32."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def batched(lists: BlockLists) -> BlockLists:
    """Lists with their leading dims made explicit: `[B or 1, H or 1, nq]`, `[B or 1, H or 1, nq, nk]`."""
    num, idx = lists
    return num.reshape((1,) * (3 - num.dim()) + tuple(num.shape)), idx.reshape((1,) * (4 - idx.dim()) + tuple(idx.shape))


def sdpa_dense(q, k, v, scale: float | None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Full attention by torch's SDPA (cuDNN on Hopper), keys with key_valid False excluded. In tiled
    order it equals full attention in the model's order: a permutation of both sides."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def checked_key_valid(key_valid: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """`key_valid` as every kernel takes it: `[B or 1, S]`; anything else is one ValueError."""
    if key_valid.dim() != 2 or key_valid.shape[0] not in (1, batch) or key_valid.shape[1] != seq_len:
        raise ValueError(f"key_valid must be [B or 1, S] = [{batch}, {seq_len}]; got {tuple(key_valid.shape)}")
    return key_valid


def masked_key_blocks(key_valid: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """bool `[B or 1, n_blocks]`: whether key block n holds a key that `key_valid` (`[B or 1, S]`,
    nonzero = keep) excludes. Positions past S in a partial last block are no keys (each kernel
    drops them with its sequence-length mask). Only these blocks pay for the key mask."""
    pad = n_blocks * block_size - key_valid.shape[-1]
    return F.pad(key_valid == 0, (0, pad)).reshape(-1, n_blocks, block_size).any(-1)


KERNEL_NAMES = ("fa4", "triton", "flex")   # in order of preference
FP8_KERNELS = ("fa4", "triton")   # in order of preference; FlexAttention has no e4m3 path


def _kernels() -> dict[str, type]:
    from .fa4 import FA4Kernel
    from .flex import FlexKernel
    from .triton_sparse import TritonKernel

    classes = {k.name: k for k in (FA4Kernel, TritonKernel, FlexKernel)}
    return {name: classes[name] for name in KERNEL_NAMES}


def kernel_class(name: str) -> type:
    return _kernels()[name]


def choose_kernel(option: str, device, dtype: torch.dtype, head_dim: int, block_size: int,
                  key_mask: bool = False, fp8: bool = False) -> tuple[str, str]:
    """(kernel name, why): `option` "auto" takes the first kernel of `KERNEL_NAMES` that runs these
    inputs (Flex runs everything); a named kernel that cannot is replaced by Flex, and the reason says
    why. Only an explicitly named kernel runs where it is slow but correct (Triton's CPU interpreter).
    `fp8`: a kernel of FP8_KERNELS or one OptionsError saying why none can run here (the options
    have refused a named kernel that has no FP8 path)."""
    device = torch.device(device)
    kernels = _kernels()
    if fp8:
        return _choose_fp8(kernels, option, device, dtype, head_dim, block_size, key_mask)
    if option != "auto":
        why = kernels[option].unsupported(device, dtype, head_dim, block_size, True, key_mask)
        if not why:
            return option, f"{option}: asked for"
        return "flex", f"{option} asked for but not used ({why}): FlexAttention instead"
    skipped = []
    for name, cls in kernels.items():
        why = cls.unsupported(device, dtype, head_dim, block_size, False, key_mask)
        if not why:
            return name, f"{name}: the fastest available here" + (f" ({'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{name}: {why}")
    raise AssertionError("FlexAttention runs every input")   # FlexKernel.unsupported is always ""


def check_fp8_device(device) -> None:
    """One OptionsError where `device` has no FP8 (e4m3) path at all."""
    from ..errors import OptionsError
    from .fp8 import fp8_unsupported

    why = fp8_unsupported(device)
    if why:
        raise OptionsError(f"option 'fp8_attention' cannot run here: {why}")


def _choose_fp8(kernels, option, device, dtype, head_dim, block_size, key_mask) -> tuple[str, str]:
    """The first kernel of FP8_KERNELS (or the one `option` names) whose FP8 path runs these inputs;
    an explicitly named kernel is taken wherever it runs (Triton's CPU interpreter)."""
    from ..errors import OptionsError

    check_fp8_device(device)
    skipped = []
    for name in FP8_KERNELS if option == "auto" else (option,):
        explicit = option != "auto" or name == FP8_KERNELS[-1]
        why = (kernels[name].unsupported(device, dtype, head_dim, block_size, explicit, key_mask)
               or kernels[name].fp8_unsupported(head_dim, block_size, key_mask))
        if not why:
            said = "its FP8 (e4m3) path, as asked" if option != "auto" else "the fastest FP8 (e4m3) path here"
            return name, f"{name}: {said}" + (f" ({'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{name}: {why}")
    hint = "" if option == "auto" else "; kernel='auto' takes the first FP8 path that runs"
    raise OptionsError(f"option 'fp8_attention': a site's inputs fit no kernel's FP8 path ({'; '.join(skipped)}){hint}")
