"""Heads ordered so that each rank of a head split gets the same attention work.

Under Ulysses each of n ranks runs the attention of H/n heads (contiguous groups in diffusers), and
with a per-head plan a head costs about its density (the fraction of blocks it computes): a rank
holding the dense heads waits for none of the others, and the step waits for it. Permuting the heads
moves work between ranks without changing what the model computes: the q, k, v projections' output
rows, the output projection's input columns, norms that span all heads (Wan's
`rms_norm_across_heads`: an RMS over all channels does not depend on their order) and the plan's
rows, all by the same permutation. That holds where everything else acts within a head (RoPE on
each head's channels, per-head norms), which is known per attention processor: HEAD_LOCAL_PROCESSORS
lists those checked (tests/test_balance.py permutes every model family's heads). Others are refused:
LTX-Video's and LTX-2's RoPE spans all heads' channels, LTX-2 gates each head by its own logit, Mochi
learns per-head RoPE frequencies shared by all layers, and AnyFlow-FAR's and Wan-Animate 2's processors
change the model too.

    plan = compact_compile.balance_heads(transformer, plan, ranks=2)   # before enable_parallelism
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .errors import PlanError
from .plan import Plan

_HEAD_ROWS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")   # out features = heads × dim
_HEAD_COLUMNS = ("to_out", "to_add_out")                                           # in features = heads × dim
_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
# attention processors whose modules compute the same function with their heads permuted as above
HEAD_LOCAL_PROCESSORS = frozenset({
    "AttnProcessor2_0", "WanAttnProcessor", "WanAnimateFaceBlockAttnProcessor", "SkyReelsV2AttnProcessor",
    "HeliosAttnProcessor", "AnyFlowAttnProcessor", "AnyFlowCrossAttnProcessor", "CogVideoXAttnProcessor2_0",
    "HunyuanVideoAttnProcessor2_0", "HunyuanVideo15AttnProcessor2_0", "MotifVideoAttnProcessor2_0",
    "AllegroAttnProcessor2_0", "EasyAnimateAttnProcessor2_0", "CosmosAttnProcessor2_0", "SanaAttnProcessor2_0",
    "SanaLinearAttnProcessor3_0", "MiniMaxH3AttnProcessor"})


def balanced_heads(cost: Sequence[float], ranks: int) -> list[int]:
    """A head permutation `perm` for `ranks` ranks taking contiguous groups of len(cost) / ranks heads:
    rank r gets the heads perm[r·h : (r+1)·h] (h = len(cost) / ranks). Greedy longest processing time
    with equal head counts: the costliest head first, each to the least loaded rank that has room."""
    heads = len(cost)
    if ranks < 1 or heads % ranks:
        raise ValueError(f"{heads} heads do not split evenly over {ranks} ranks")
    room = heads // ranks
    groups: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0.0] * ranks
    for head in sorted(range(heads), key=lambda i: -cost[i]):
        rank = min((r for r in range(ranks) if len(groups[r]) < room), key=lambda r: loads[r])
        groups[rank].append(head)
        loads[rank] += cost[head]
    return [head for group in groups for head in sorted(group)]


def rank_loads(cost: Sequence[float], perm: Sequence[int], ranks: int) -> list[float]:
    """The summed cost of each rank's heads under `perm` (the identity: diffusers' contiguous split)."""
    room = len(perm) // ranks
    return [sum(cost[head] for head in perm[r * room:(r + 1) * room]) for r in range(ranks)]


def balance_heads(model: nn.Module, plan: Plan, ranks: int) -> Plan:
    """Permute, in place, the heads of every attention module a per-head site of `plan` names, so that
    each of `ranks` contiguous head groups gets about the same work, and return the plan with those
    sites' rows (every step range's) permuted the same way. A site name matches the module of that
    path and, for plans of regionally compiled blocks (site `attn1`), every module whose path ends
    with it. Head-agnostic sites (one row) are left as they are. Every module is checked before any
    is changed: a PlanError leaves the model as it was."""
    sites = dict(plan.sites)
    permutations, changes = {}, []
    for base in dict.fromkeys(map(_module_path, plan.sites)):
        # every entry of one module (its step ranges `@start`, its further calls `#n`) shares its heads
        entries = [n for n in plan.sites if _module_path(n) == base and plan.sites[n].blocks.shape[0] > 1]
        if not entries:
            continue
        cost = torch.stack([plan.sites[n].blocks.float().mean((1, 2)) for n in entries]).mean(0).tolist()
        perm = balanced_heads(cost, ranks)
        modules = [m for path, m in model.named_modules() if path == base or path.endswith("." + base)]
        if not modules:
            raise PlanError(f"balance_heads: no module of the model is at the plan's site {base!r}")
        changes += [(module, perm) for module in modules]
        for n in entries:
            sites[n] = dataclasses.replace(plan.sites[n], blocks=plan.sites[n].blocks[perm])
        permutations[base] = perm
    for module, perm in changes:
        _check_permutable(module, len(perm))
    for module, perm in changes:
        permute_attention_heads(module, perm)
    info = {**plan.info, "head_permutations": {**plan.info.get("head_permutations", {}), **permutations}}
    return Plan(plan.grid, plan.tile, plan.block_size, sites, info)


def _module_path(site: str) -> str:
    """The module a plan entry belongs to: `blocks.3.attn1@20` (a step range) and `blocks.3.attn1#1`
    (the module's second attention call) are both `blocks.3.attn1`."""
    return site.split("@")[0].split("#")[0]


def permute_attention_heads(attn: nn.Module, perm: Sequence[int]) -> None:
    """Reorder the heads of a diffusers attention module in place: head i of the result is head
    perm[i] of the original. The module computes the same function of its inputs, its heads renamed."""
    heads = len(perm)
    dim = _check_permutable(attn, heads)
    order = (torch.as_tensor(perm)[:, None] * dim + torch.arange(dim)).flatten()
    with torch.no_grad():
        for name in _HEAD_ROWS:
            linear = _linear(attn, name, heads * dim, "out_features")
            if linear is not None:
                linear.weight.copy_(linear.weight[order])
                if linear.bias is not None:
                    linear.bias.copy_(linear.bias[order])
        for name in _HEAD_COLUMNS:
            linear = _linear(attn, name, heads * dim, "in_features")
            if linear is not None:
                linear.weight.copy_(linear.weight[:, order])
        for name in _NORMS:
            weight = getattr(getattr(attn, name, None), "weight", None)
            if weight is not None and weight.numel() == heads * dim:   # over all heads (per head: as it is)
                weight.copy_(weight[order])


def _check_permutable(attn: nn.Module, heads: int) -> int:
    """The head dim of `attn` if permuting its `heads` heads keeps its function, else a PlanError saying why."""
    name = type(attn).__name__
    processor = type(getattr(attn, "processor", None)).__name__
    if processor not in HEAD_LOCAL_PROCESSORS:
        raise PlanError(f"cannot permute the heads of {name}: its processor {processor} is not known to act "
                        "within each head (RoPE over all heads' channels, per-head gates, or per-head "
                        "frequencies outside the module would change what the model computes); run without "
                        "balance_heads (diffusers' split)")
    if getattr(attn, "fused_projections", False) or getattr(attn, "to_qkv", None) is not None:
        raise PlanError(f"cannot permute the heads of {name} with fused q/k/v projections; balance before fusing them")
    q = getattr(attn, "to_q", None)
    if not isinstance(q, nn.Linear) or q.out_features % heads:
        raise PlanError(f"cannot permute {heads} heads of {name}: no to_q projection of {heads} × head_dim outputs")
    dim = q.out_features // heads
    if _linear(attn, "to_out", heads * dim, "in_features") is None:
        raise PlanError(f"cannot permute the heads of {name}: it has no output projection, so its heads leave "
                        "the module in their order (HunyuanVideo's single-stream blocks project them together "
                        "with the MLP); balance a plan without per-head rows for such sites")
    for linear in _HEAD_ROWS:
        _linear(attn, linear, heads * dim, "out_features")
    for linear in _HEAD_COLUMNS:
        _linear(attn, linear, heads * dim, "in_features")
    for norm in _NORMS:
        weight = getattr(getattr(attn, norm, None), "weight", None)
        if weight is not None and weight.numel() not in (dim, heads * dim):
            raise PlanError(f"{name}.{norm} has {weight.numel()} weights: neither per head ({dim}) nor over all "
                            f"heads ({heads * dim})")
    return dim


def _linear(attn: nn.Module, name: str, features: int, side: str) -> nn.Linear | None:
    module = getattr(attn, name, None)
    if isinstance(module, (nn.ModuleList, nn.Sequential)):   # to_out = [Linear, Dropout]
        module = module[0]
    if module is None:
        return None
    if not isinstance(module, nn.Linear) or getattr(module, side) != features:
        raise PlanError(f"cannot permute heads through {type(attn).__name__}.{name}: expected a Linear with "
                        f"{side} = {features} (grouped-query attention and other layouts are not handled)")
    return module
