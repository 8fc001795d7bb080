"""Stage 4b: plan a cut — score every prunable group, allocate the channel budget, find the
share that meets a MAC target, and apply it through the dependency graph.

The channel budget is allocated here rather than by torch-pruning's global pruner,
which thresholds with ``score <= k-th smallest``: when many scores tie (an untrained
NAM model has every gamma = 1) that marks every channel of every layer, every group
fails the "would empty the layer" check and *nothing* is pruned, silently. Ties are
broken by each channel's rank within its layer, so equal scores spread the cut evenly.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.config import bounded
from nam_prune.errors import NamPruneError
from nam_prune.prune.graph import (
    Protected,
    PruningHistory,
    build_graph,
    count_macs_params,
    head_layers,
    reaches_into,
)
from nam_prune.prune.importance import NAMImportance, Normalizer

log = logging.getLogger("nam_prune")


@dataclass
class PruneConfig:
    """What to remove.

    target: ``macs`` keeps ``macs_keep`` of the original MACs; ``channels`` removes
        ``channel_ratio`` of the prunable channels.
    scope: ``global`` ranks all layers together, ``local`` cuts each layer by the same share.
    normalizer: how gate scores are made comparable across layers (see ``NAMImportance``).
    fallback: score for channel groups without a NAM gate: the host BN's |gamma| (``bn``)
        or leave them unpruned (``skip``).
    max_pruning_ratio: the largest share of any layer's original channels that may go.
    round_to: keep channel counts at multiples of this (CPU kernels like 8 or 16).
    steps: prune in this many steps, fine-tuning ``epochs_between_steps`` between them.
    ignore: module names never pruned (the classifier head never is).
    strip_gates: remove the NAM gates after pruning (gate-then-strip): a plain, faster
        model; fine-tuning then recovers the gates' scaling.
    """

    target: Literal["macs", "channels"] = "macs"
    macs_keep: float = bounded(0.5, low=0, high=1, low_open=True, high_open=True)
    channel_ratio: float = bounded(0.3, low=0, high=1, high_open=True)
    scope: Literal["global", "local"] = "global"
    normalizer: Normalizer = "mean"
    fallback: Literal["bn", "skip"] = "bn"
    max_pruning_ratio: float = bounded(0.9, low=0, high=1, low_open=True, high_open=True)
    round_to: int = bounded(1, low=1)
    steps: int = bounded(1, low=1)
    epochs_between_steps: int = bounded(1, low=0)
    ignore: list[str] = field(default_factory=list)
    strip_gates: bool = False


@dataclass
class ScoredGroup:
    """One prunable coupled group: its root layer, channel count and channel scores."""

    root: str
    out_channels: bool
    scores: torch.Tensor
    min_keep: int


def _resolve(model: nn.Module, names: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise NamPruneError(f"prune.ignore names unknown modules: {', '.join(missing)}")
    return [modules[n] for n in names]


def score_groups(
    model: nn.Module,
    graph: tp.DependencyGraph,
    config: PruneConfig,
    initial_channels: dict[str, int],
    importance: tp.importance.Importance | None = None,
    protected: Protected | None = None,
) -> list[ScoredGroup]:
    """Score every prunable group; ``initial_channels`` (root name -> channels) bounds each cut.

    ``importance`` defaults to ``NAMImportance``; any torch-pruning importance works (the
    ``compare`` command passes L1-norm and random ones). Groups that would change the
    inside of a ``protected`` block are left out.
    """
    importance = importance or NAMImportance(model, config.normalizer, config.fallback)
    protected = protected or Protected()
    roots_kept = head_layers(model) + _resolve(model, config.ignore) + protected.layers
    ignored = [m for layer in roots_kept for m in layer.modules()]
    names = {m: n for n, m in model.named_modules()}
    scored = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        if reaches_into(group, graph, protected.blocks):
            continue
        scores = importance(group)
        if scores is None:
            continue
        root = group[0].dep.target.module
        name = names[root]
        initial = initial_channels.setdefault(name, len(scores))
        min_keep = max(1, int(np.ceil(initial * (1 - config.max_pruning_ratio))))
        scored.append(ScoredGroup(name, graph.is_out_channel_pruning_fn(group[0].dep.handler), scores, min_keep))
    if not scored:
        raise NamPruneError(
            "no prunable channel group has a NAM gate or a BatchNorm to rank it by; "
            "insert NAM gates (nam.placement: every_bn) or set prune.fallback: bn"
        )
    return scored


def _round_keep(keep: int, size: int, min_keep: int, round_to: int) -> int:
    if round_to > 1:
        keep = max(round_to, keep - keep % round_to)
    return min(size, max(keep, min_keep))


def plan_cut(groups: list[ScoredGroup], fraction: float, config: PruneConfig) -> dict[str, list[int]]:
    """Channels to remove per root layer so that ``fraction`` of the current channels go.

    Global scope ranks (score, rank within layer / layer size) across all layers: the
    second key spreads tied scores evenly instead of emptying the first layers.
    """
    sizes = np.array([len(g.scores) for g in groups])
    caps = np.maximum(sizes - np.array([g.min_keep for g in groups]), 0)
    orders = [torch.argsort(g.scores, stable=True).numpy() for g in groups]
    if config.scope == "local":
        counts = np.minimum(caps, np.round(fraction * sizes).astype(int))
    else:
        score_key = np.concatenate([g.scores.numpy()[order[:cap]] for g, order, cap in zip(groups, orders, caps)])
        rank_key = np.concatenate([np.arange(cap) / size for cap, size in zip(caps, sizes)])
        owner = np.concatenate([np.full(cap, i) for i, cap in enumerate(caps)])
        wanted = min(int(round(fraction * sizes.sum())), len(owner))
        chosen = owner[np.lexsort((rank_key, score_key))[:wanted]]
        counts = np.bincount(chosen, minlength=len(groups))
    plan = {}
    for group, order, size, count in zip(groups, orders, sizes, counts):
        keep = _round_keep(int(size - count), int(size), group.min_keep, config.round_to)
        if keep < size:
            plan[group.root] = sorted(int(i) for i in order[: size - keep])
    return plan


def apply_plan(
    model: nn.Module, graph: tp.DependencyGraph, groups: list[ScoredGroup], plan: dict[str, list[int]]
) -> PruningHistory:
    """Cut the planned channels through the dependency graph; returns the replayable history."""
    modules = dict(model.named_modules())
    for group in groups:
        if group.root not in plan:
            continue
        module = modules[group.root]
        pruner = graph.get_pruner_of_module(module)
        handler = pruner.prune_out_channels if group.out_channels else pruner.prune_in_channels
        cut = graph.get_pruning_group(module, handler, plan[group.root])
        if not graph.check_pruning_group(cut):
            raise NamPruneError(f"pruning {group.root} would empty a coupled layer; lower prune.max_pruning_ratio")
        cut.prune()
    return [(name, bool(out), [int(i) for i in idxs]) for name, out, idxs in graph.pruning_history()]


def _trial_macs(
    model: nn.Module,
    example_input: torch.Tensor,
    config: PruneConfig,
    groups: list[ScoredGroup],
    fraction: float,
    protected: Protected,
) -> int:
    """MACs of a copy pruned by ``fraction``, reusing the scores computed on the original."""
    trial = copy.deepcopy(model)
    graph = build_graph(trial, example_input, protected.stand_ins)
    apply_plan(trial, graph, groups, plan_cut(groups, fraction, config))
    return count_macs_params(trial, example_input)[0]


def fraction_for_macs(
    model: nn.Module,
    example_input: torch.Tensor,
    config: PruneConfig,
    target_macs: float,
    groups: list[ScoredGroup],
    protected: Protected,
    iterations: int = 14,
) -> float:
    """Binary-search the channel fraction whose pruned model first meets ``target_macs``.

    Each trial prunes a copy and counts its MACs, so the answer holds whatever the
    architecture's coupling; 14 halvings resolve the fraction to 1e-4.
    """
    low, high = 0.0, 1.0
    floor = _trial_macs(model, example_input, config, groups, high, protected)
    if floor > target_macs:
        raise NamPruneError(
            f"cannot reach {target_macs / 1e6:.2f}M MACs: with prune.max_pruning_ratio="
            f"{config.max_pruning_ratio} the model keeps {floor / 1e6:.2f}M; raise max_pruning_ratio "
            "or prune.macs_keep"
        )
    for _ in range(iterations):
        middle = (low + high) / 2
        if _trial_macs(model, example_input, config, groups, middle, protected) <= target_macs:
            high = middle
        else:
            low = middle
    return high


def warn_if_untrained(groups: list[ScoredGroup]) -> None:
    """Say so when the ranking is mostly ties: the order among them is arbitrary."""
    scores = torch.cat([g.scores for g in groups])
    finite = scores[torch.isfinite(scores)]
    if finite.numel() and float((finite == finite.median()).float().mean()) > 0.5:
        log.warning(
            "most NAM scores are equal (an untrained NAM model?): ties are cut evenly across layers; "
            "train with sparsity.epochs > 0 for a meaningful ranking"
        )
