"""Stages 3-4: rank channels by the NAM gates' normalized |gamma| and remove them structurally.

torch-pruning's dependency graph finds the coupled channels (residual additions,
concatenations, depthwise convs) and cuts them; ``NAMImportance`` is a torch-pruning
``Importance`` that scores each coupled group by the NAM gates sitting on it.

The channel budget is allocated here rather than by torch-pruning's global pruner,
which thresholds with ``score <= k-th smallest``: when many scores tie (an untrained
NAM model has every gamma = 1) that marks every channel of every layer, every group
fails the "would empty the layer" check and *nothing* is pruned, silently. Ties are
broken by each channel's rank within its layer, so equal scores spread the cut evenly.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.config import bounded
from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, NAMSpatialGate, tracing_mode

log = logging.getLogger("nam_prune")

Normalizer = Literal["mean", "sum", "max", "none"]
PruningHistory = list[tuple[str, bool, list[int]]]


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


def normalize_scores(magnitude: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """Make one gate's |gamma| comparable with other layers'.

    ``sum`` is NAM's own ``w = |gamma|/sum|gamma|``: it averages 1/C, so in a global
    ranking wide layers always look less important. ``mean`` (``w * C``, the default)
    removes that bias: 1.0 is an average channel in any layer. ``max`` scales by the
    layer's strongest channel; ``none`` compares raw |gamma| (network-slimming style).
    """
    eps = torch.finfo(magnitude.dtype).tiny
    if normalizer == "sum":
        return magnitude / (magnitude.sum() + eps)
    if normalizer == "mean":
        return magnitude / (magnitude.mean() + eps)
    if normalizer == "max":
        return magnitude / (magnitude.max() + eps)
    return magnitude


class NAMImportance(tp.importance.Importance):
    """Score each channel of a torch-pruning group by the NAM gates on it.

    Every NAM gate norm in the group contributes its normalized |gamma| at the
    group's root indices; channels covered by several gates (a residual stream)
    take the mean. Groups with no gate use the host BNs' |gamma| (``fallback='bn'``)
    or are skipped (``None``).
    """

    def __init__(self, model: nn.Module, normalizer: Normalizer = "mean", fallback: str = "bn") -> None:
        self.gate_norms = {m.bn for m in model.modules() if isinstance(m, NAMChannelGate)}
        self.normalizer = normalizer
        self.fallback = fallback

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        size = len(group[0].idxs)
        sums = {True: torch.zeros(size), False: torch.zeros(size)}
        counts = {True: torch.zeros(size), False: torch.zeros(size)}
        for item in group:
            norm = item.dep.target.module
            if not isinstance(norm, nn.BatchNorm2d) or norm.weight is None:
                continue
            is_gate = norm in self.gate_norms
            scores = normalize_scores(norm.weight.detach().abs().float().cpu(), self.normalizer)
            root = torch.as_tensor([int(i) for i in item.root_idxs], dtype=torch.long)
            local = torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)
            sums[is_gate].index_add_(0, root, scores[local])
            counts[is_gate].index_add_(0, root, torch.ones(len(root)))
        if counts[True].any():
            gate_score = sums[True] / counts[True].clamp(min=1)
            host_score = sums[False] / counts[False].clamp(min=1)
            uncovered = counts[True] == 0
            return torch.where(uncovered, host_score if self.fallback == "bn" else torch.inf, gate_score)
        if self.fallback == "bn" and counts[False].any():
            return sums[False] / counts[False].clamp(min=1)
        return None


@dataclass
class IntactBlock:
    """A block whose inner channels must not change (attention heads, a detection head).

    Only the input channels of its ``entries`` (the convs fed from outside) may follow
    the layer that feeds the block; any other cut that reaches inside it is skipped.
    """

    name: str
    module: nn.Module
    entries: list[nn.Module]
    members: set[nn.Module] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.members = set(self.module.modules())  # looked up for every candidate group


@dataclass
class Protected:
    """What a model-specific caller keeps: ``layers`` are never pruning roots, ``blocks`` stay intact."""

    layers: list[nn.Module] = field(default_factory=list)
    blocks: list[IntactBlock] = field(default_factory=list)


def reaches_into(group: tp.Group, graph: tp.DependencyGraph, blocks: list[IntactBlock]) -> str | None:
    """The name of the first intact block this group would change inside, if any."""
    for block in blocks:
        for item in group:
            module = item.dep.target.module
            if module not in block.members:
                continue
            if module in block.entries and not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue
            return block.name
    return None


@dataclass
class ScoredGroup:
    """One prunable coupled group: its root layer, channel count and channel scores."""

    root: str
    out_channels: bool
    scores: torch.Tensor
    min_keep: int


def head_layers(model: nn.Module) -> list[nn.Module]:
    """The classifier head (the last Linear or Conv2d registered): never pruned."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1:]


TRACE_STAND_INS: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {}
"""Block types traced through a simpler forward with the same convs and shapes (model families
register theirs: torch-pruning cannot map the reshapes inside YOLO attention blocks). Such
blocks must also be kept intact (``IntactBlock``), since the stand-in hides their real coupling."""


@contextlib.contextmanager
def _stand_ins(model: nn.Module):
    swapped = [m for m in model.modules() if type(m) in TRACE_STAND_INS]
    for module in swapped:
        module.forward = functools.partial(TRACE_STAND_INS[type(module)], module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph, traced with the gates in ``tracing_mode``.

    Spatial gates are traced as identities: their parameters are indexed by pixel, not
    channel, and their reductions over channels confuse torch-pruning's reshape inference
    (it mis-maps the final flatten). They couple no channels, so the graph stays exact.
    """
    pixel_params = [p for m in model.modules() if isinstance(m, NAMSpatialGate) for p in m.parameters()]
    was_training = model.training
    model.eval()
    try:
        # tracing needs autograd even when the caller is under no_grad / inference_mode
        with warnings.catch_warnings(), tracing_mode(model), torch.inference_mode(False), torch.enable_grad():  # noqa: E501
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            with _stand_ins(model):
                return tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_input.clone(), ignored_params=pixel_params
                )
    except NamPruneError:
        raise
    except Exception as error:  # torch-pruning raises many types while tracing
        raise NamPruneError(
            f"torch-pruning could not trace the model ({type(error).__name__}: {error}); "
            "the forward must run on one tensor input; list untraceable blocks in prune.ignore"
        ) from None
    finally:
        model.train(was_training)


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


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """MACs and parameters from torch-pruning's counter (gate norms counted as the BNs they are)."""
    with tracing_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def _trial_macs(
    model: nn.Module, example_input: torch.Tensor, config: PruneConfig, groups: list[ScoredGroup], fraction: float
) -> int:
    """MACs of a copy pruned by ``fraction``, reusing the scores computed on the original."""
    trial = copy.deepcopy(model)
    apply_plan(trial, build_graph(trial, example_input), groups, plan_cut(groups, fraction, config))
    return count_macs_params(trial, example_input)[0]


def fraction_for_macs(
    model: nn.Module,
    example_input: torch.Tensor,
    config: PruneConfig,
    target_macs: float,
    groups: list[ScoredGroup],
    iterations: int = 14,
) -> float:
    """Binary-search the channel fraction whose pruned model first meets ``target_macs``.

    Each trial prunes a copy and counts its MACs, so the answer holds whatever the
    architecture's coupling; 14 halvings resolve the fraction to 1e-4.
    """
    low, high = 0.0, 1.0
    floor = _trial_macs(model, example_input, config, groups, high)
    if floor > target_macs:
        raise NamPruneError(
            f"cannot reach {target_macs / 1e6:.2f}M MACs: with prune.max_pruning_ratio="
            f"{config.max_pruning_ratio} the model keeps {floor / 1e6:.2f}M; raise max_pruning_ratio "
            "or prune.macs_keep"
        )
    for _ in range(iterations):
        middle = (low + high) / 2
        if _trial_macs(model, example_input, config, groups, middle) <= target_macs:
            high = middle
        else:
            low = middle
    return high


@dataclass
class PruneResult:
    history: PruningHistory
    params_before: int
    params_after: int
    fraction: float
    threshold: float  # the largest score that was cut (in the normalizer's units)


def warn_if_untrained(groups: list[ScoredGroup]) -> None:
    """Say so when the ranking is mostly ties: the order among them is arbitrary."""
    scores = torch.cat([g.scores for g in groups])
    finite = scores[torch.isfinite(scores)]
    if finite.numel() and float((finite == finite.median()).float().mean()) > 0.5:
        log.warning(
            "most NAM scores are equal (an untrained NAM model?): ties are cut evenly across layers; "
            "train with sparsity.epochs > 0 for a meaningful ranking"
        )


def prune_model(
    model: nn.Module,
    example_input: torch.Tensor,
    config: PruneConfig,
    target_macs: float | None = None,
    channel_fraction: float | None = None,
    initial_channels: dict[str, int] | None = None,
    importance: tp.importance.Importance | None = None,
    protected: Protected | None = None,
) -> PruneResult:
    """Prune ``model`` in place to ``target_macs`` or by ``channel_fraction`` of its current channels.

    ``initial_channels`` (root layer -> channels before the first step) is filled on the
    first call and bounds later steps, so ``max_pruning_ratio`` refers to the original model.
    ``protected`` keeps model-specific parts (a detection head, attention blocks) unpruned.

    Raises if the model does not shrink: a pruning step never reports success for nothing.
    """
    initial_channels = {} if initial_channels is None else initial_channels
    params_before = _parameter_count(model)
    graph = build_graph(model, example_input)
    groups = score_groups(model, graph, config, initial_channels, importance, protected)
    warn_if_untrained(groups)
    if target_macs is not None:
        fraction = fraction_for_macs(model, example_input, config, target_macs, groups)
    elif channel_fraction is not None:
        fraction = channel_fraction
    else:
        raise NamPruneError("prune_model needs target_macs or channel_fraction")
    plan = plan_cut(groups, fraction, config)
    scores = {g.root: g.scores for g in groups}
    threshold = max(float(scores[root][idxs].max()) for root, idxs in plan.items()) if plan else float("nan")
    history = apply_plan(model, graph, groups, plan)
    params_after = _parameter_count(model)  # cheap: MACs are counted by the caller's report
    if params_after >= params_before:
        raise NamPruneError(
            "pruning removed nothing: every layer is at prune.max_pruning_ratio or the target is the "
            "model's own size; lower prune.macs_keep / raise prune.channel_ratio"
        )
    log.info(
        "pruned %d layer group(s) (channel share %.3f): params %.3fM -> %.3fM",
        len(plan), fraction, params_before / 1e6, params_after / 1e6,
    )
    return PruneResult(history, params_before, params_after, fraction, threshold)


def channel_step_fraction(total_ratio: float, step: int, steps: int) -> float:
    """Share of the *current* channels to cut at ``step`` so ``total_ratio`` is gone after ``steps``."""
    keep_now = 1 - total_ratio * (step - 1) / steps
    keep_next = 1 - total_ratio * step / steps
    return 1 - keep_next / keep_now


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear layer, by name: the per-layer table's raw data."""
    return {
        name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def replay(model: nn.Module, example_input: torch.Tensor, history: PruningHistory) -> nn.Module:
    """Redo a recorded pruning on a freshly built dense model (how checkpoints are rebuilt)."""
    graph = build_graph(model, example_input)
    graph.load_pruning_history([[name, out, list(idxs)] for name, out, idxs in history])
    return model
