"""Find every scaled_dot_product_attention call in a Dynamo graph and decide what it is.

A site is rewritten only when sparse attention over its blocks is the same computation as the SDPA
call with some of the key blocks dropped: 4-D q/k/v, no dropout, not causal, no GQA, no attn_mask
or one the graph proves to be a key-padding mask (key_mask.py), queries and keys over the same
tokens, and those tokens being the video grid (optionally with a text prefix or suffix whose
position the graph proves). Anything else keeps the original call and carries the reason into the
report.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import OptionsError
from .graph_util import example_value, module_path
from .grid import GridCandidate, video_offset
from .heads import head_slice
from .key_mask import KeyMask, classify_mask

VIDEO = "video self-attention"
JOINT = "joint text+video"
CROSS = "cross-attention"
OTHER = "other"

_SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Site:
    node: fx.Node
    name: str                       # module path, e.g. "blocks.0.attn1"
    kind: str
    q_shape: tuple
    k_shape: tuple
    dtype: str
    device: str = ""
    scale: float | None = None
    reason: str = ""                # why it stays dense ("" = rewritten)
    grid: tuple | None = None
    grid_source: str = ""
    n_text: int = 0
    n_before: int = 0               # of the n_text others, how many come before the video tokens
    density: float | None = None    # fraction of blocks computed, when rewritten
    key_mask: bool = False          # attn_mask is a key-padding mask (rewritten with it)
    mask: KeyMask | None = None     # what the attn_mask was proven to be (key_mask.py)
    model_heads: tuple | None = None   # under sequence parallelism: the model heads of this rank's heads (heads.py)
    n_model_heads: int = 0             # and how many heads the model has
    model_heads_unproven: str = ""     # an all-to-all feeds the site, but which heads it gave is not proven: why
    maybe_video: bool = True        # False: fewer tokens than the video grid has (e.g. a prompt refiner)
    extras: dict = field(default_factory=dict)

    @property
    def rewritten(self) -> bool:
        return not self.reason

    @property
    def symbolic(self) -> bool:
        """A dim of q or k is symbolic: Dynamo compiled this graph for more than one size."""
        return not all(isinstance(d, int) for d in self.q_shape + self.k_shape)

    def summary(self) -> dict:
        return dict(site=self.name, kind=self.kind, q=list(self.q_shape), k=list(self.k_shape), dtype=self.dtype,
                    rewritten=self.rewritten, reason=self.reason or None, grid=self.grid, grid_source=self.grid_source,
                    n_text=self.n_text, n_before=self.n_before, density=self.density,
                    key_mask=self.key_mask, **self.extras,
                    **(dict(masked_queries_zeroed=True) if self.mask and self.mask.zero_masked_queries else {}),
                    **(dict(frame_mask=True) if self.mask and self.mask.frames is not None else {}),
                    **(dict(model_heads=list(self.model_heads)) if self.model_heads is not None else {}))


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def sdpa_arguments(node: fx.Node) -> dict:
    bound = _SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def find_sites(gm: fx.GraphModule, grids: list[GridCandidate], grid_option=None, plan_grid=None) -> list[Site]:
    sites, used = [], {}
    for node in gm.graph.nodes:
        if is_sdpa(node):
            site = classify(node, grids, grid_option, plan_grid)
            used[site.name] = used.get(site.name, 0) + 1
            if used[site.name] > 1:  # one module calling SDPA twice
                site.name = f"{site.name}#{used[site.name] - 1}"
            sites.append(site)
    return sites


def classify(node: fx.Node, grids: list[GridCandidate], grid_option=None, plan_grid=None) -> Site:
    a = sdpa_arguments(node)
    q, k, v = (example_value(a[n]) for n in ("query", "key", "value"))
    site = Site(node, module_path(node), OTHER, tuple(getattr(q, "shape", ())), tuple(getattr(k, "shape", ())),
                str(getattr(q, "dtype", "?")).replace("torch.", ""), str(getattr(q, "device", "")))
    if any(t is None or t.dim() != 4 for t in (q, k, v)):
        site.reason = "q, k, v are not all 4-D [B, H, S, D]"
        return site
    S, Sk = q.shape[-2], k.shape[-2]
    if not (isinstance(S, int) and isinstance(Sk, int)):
        site.reason = ("symbolic sequence length: the inputs are marked dynamic (torch._dynamo.mark_dynamic), so one "
                       "graph serves every size; without the mark each video size gets its own sparse graph")
        return site
    if S != Sk:
        site.kind, site.reason = CROSS, "cross-attention: queries and keys are different token sets"
        return site
    _locate_video(site, node, S, q.shape[0], grids, grid_option, plan_grid)
    site.model_heads, site.n_model_heads, site.model_heads_unproven = head_slice(a)
    site.reason = site.reason or _ineligible(a, q, k, v)
    if not site.reason and a["attn_mask"] is not None:
        site.mask = classify_mask(a["attn_mask"], Sk, site.grid if site.kind == VIDEO else None)
        site.reason, site.key_mask = site.mask.reason, not site.mask.reason and site.mask.frames is None
    if a["scale"] is not None and isinstance(a["scale"], (int, float)) and not a["scale"] > 0:
        site.reason = site.reason or f"softmax scale {a['scale']} (the kernels' running maximum needs a positive one)"
    elif isinstance(a["scale"], (int, float)) or a["scale"] is None:
        site.scale = None if a["scale"] is None else float(a["scale"])
    else:
        site.reason = site.reason or "scale is computed in the graph, not a constant"
    return site


def _ineligible(a: dict, q, k, v) -> str:
    if not (isinstance(a["dropout_p"], (int, float)) and a["dropout_p"] == 0):
        return "dropout"
    if a["is_causal"] is not False:
        return "causal attention"
    if a["enable_gqa"] is not False or not (q.shape[1] == k.shape[1] == v.shape[1]):
        return "grouped-query attention (heads of q, k, v differ)"
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return "q, k, v shapes do not broadcast like self-attention"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query's and key's {q.shape[-1]}"
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32, the same for q, k, v)"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device.type}"
    if any(t.requires_grad for t in (q, k, v)):
        return "inputs require grad (compact attention is inference-only: use torch.no_grad())"
    return ""


def _locate_video(site: Site, node, S: int, batch: int, grids, grid_option, plan_grid) -> None:
    """Set the site's grid, kind and text split, or a reason why the tokens are not a video grid."""
    if grid_option is not None:
        _check_grid_option(tuple(grid_option), grids, batch)
        choices = [(tuple(grid_option), "options['grid']")]
    elif plan_grid is not None:
        found = _contradicting(tuple(plan_grid), grids, batch)
        if found:
            site.reason = (f"the plan's grid {tuple(plan_grid)} contradicts the model's patch embedding, which makes "
                           f"a {found[0]} grid of the same tokens ({found[1]}): a plan for another video shape")
            return
        choices = [(tuple(plan_grid), "plan")]
    else:
        choices = [(g.grid(batch), g.source) for g in grids if g.grid(batch) is not None]
    if not choices:
        site.reason = ("no video grid: pass options['grid'] (this graph shows no patch embedding and no merge of "
                       "(T, H, W) into tokens; a graph break may have left them in another graph)" if not grids else
                       f"no video grid for a batch of {batch}: the graph's patch embedding ({grids[0].source}) "
                       f"does not divide into it (attention over frames or pixels folded into the batch?)")
        return
    merged = [(g.grid(batch), g.source) for g in grids if g.merge and g.grid(batch) is not None]
    for grid, source in choices:
        n_video = grid[0] * grid[1] * grid[2]
        if n_video == S:
            other = next(((g, s) for g, s in merged if g != grid and g[0] * g[1] * g[2] == S), None)
            if other:   # e.g. a conv's (T, H, W), then its tokens flattened as (H, W, T)
                site.reason = (f"the graph shows its {S} tokens as two grids, {grid} ({source}) and {other[0]} "
                               f"({other[1]}): which order the tokens are in is not proven")
                return
            site.kind, site.grid, site.grid_source = VIDEO, grid, source
            return
    # joint attention: the largest grid that is most of the sequence, the rest other tokens
    joint = [(g[0] * g[1] * g[2], g, source) for g, source in choices if S / 2 < g[0] * g[1] * g[2] < S]
    if joint:
        n_video, grid, source = max(joint, key=lambda c: c[0])
        site.kind, site.grid, site.grid_source, site.n_text = JOINT, grid, source, S - n_video
        offset = video_offset(node, n_video, S, [g.tag for g in grids if g.tag is not None])
        if offset is None:
            site.reason = (f"{S} tokens = {n_video} video + {S - n_video} others, but the graph does not show "
                           f"where the video tokens are among the others")
        else:
            site.n_before = offset
        return
    site.reason = f"{S} tokens do not match the video grid {choices[0][0]} ({choices[0][1]})"
    site.maybe_video = any(S >= g[0] * g[1] * g[2] for g, _ in choices)


def _contradicting(grid, grids: list[GridCandidate], batch: int):
    """(grid, source) of the graph's own grid for as many tokens as `grid` (the first candidate of that
    count, as the graph's choice takes it) where it is another (T, H, W): `grid` has the axes wrong
    (832×480 for 480×832). Later candidates of that count (a model's other convolutions) do not count."""
    n = grid[0] * grid[1] * grid[2]
    for candidate in grids:
        found = candidate.grid(batch)
        if found is not None and found[0] * found[1] * found[2] == n:
            return (found, candidate.source) if found != grid else None
    return None


def _check_grid_option(grid, grids: list[GridCandidate], batch: int) -> None:
    """options['grid'] must not contradict the graph (`_contradicting`)."""
    found = _contradicting(grid, grids, batch)
    if found:
        n = grid[0] * grid[1] * grid[2]
        raise OptionsError(f"option 'grid' {grid} contradicts the model's patch embedding, which makes a {found[0]} "
                           f"grid of the same {n} tokens ({found[1]}): leave 'grid' out to use the graph's, or "
                           f"correct it")
