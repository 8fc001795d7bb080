"""Stage 4b: plan a cut — score every prunable group, allocate the channel budget, find the
share that meets a MAC target, and apply it through the dependency graph.

The channel budget is allocated here rather than by torch-pruning's global pruner,
which thresholds with ``score <= k-th smallest``: when many scores tie (an untrained
NAM model has every gamma = 1) that marks every channel of every layer, every group
fails the "would empty the layer" check and *nothing* is pruned, silently. Layers are cut in
the blocks ``round_to`` allows, ranked together; ties go by the share of its layer a block
would follow, so equal scores spread the cut evenly.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.config import bounded
from nam_prune.errors import NamPruneError
from nam_prune.prune import blocks
from nam_prune.prune.graph import (
    LayerCuts,
    Protected,
    count_macs_params,
    cut_layers,
    head_layers,
    layer_names,
    reaches_into,
)
from nam_prune.prune.importance import NAMImportance, Normalizer
from nam_prune.prune.latency import check_runtime

log = logging.getLogger("nam_prune")


@dataclass
class PruneConfig:
    """What to remove.

    target: ``macs`` keeps ``macs_keep`` of the original MACs; ``channels`` removes
        ``channel_ratio`` of the prunable channels; ``latency`` keeps ``latency_keep`` of the
        dense model's latency (or reaches ``latency_ms``) on ``runtime`` at batch ``batch``,
        the cut searched on timings of candidate cuts (``nam_prune.prune.latency``).
    scope: ``global`` ranks all layers together, ``local`` cuts each layer by the same share.
    normalizer: how gate scores are made comparable across layers (see ``NAMImportance``).
    fallback: score for channel groups without a NAM gate: the host BN's |gamma| (``bn``)
        or leave them unpruned (``skip``).
    max_pruning_ratio: the largest share of any layer's original channels that may go.
    round_to: keep channel counts at multiples of this: CPU kernels run 8- and 16-channel
        blocks, so other widths waste much of a cut. Each layer is cut in the blocks this allows,
        ranked globally (``plan_cut``). The default 16 realises more of a MAC cut as speed than 8
        at no measurable cost in accuracy (``python -m benchmarks speedup``, docs/performance.md); 8 suits
        nets whose layers are 16-32 channels wide; 1 cuts a channel at a time.
    steps: prune in this many steps, fine-tuning ``epochs_between_steps`` between them.
    ignore: module names never pruned (the classifier head never is).
    strip_gates: remove the NAM gates after pruning (``surgery.strip_gates``; gate-then-strip):
        the plain, faster model fine-tuning then trains, or, with ``finetune.open_gates``, after
        fine-tuning has opened them.
        On by default: kept gates make the deployed model slower for no accuracy the seed runs
        could tell apart (docs/performance.md, how the defaults were chosen).
    """

    target: Literal["macs", "channels", "latency"] = "macs"
    macs_keep: float = bounded(0.5, low=0, high=1, low_open=True, high_open=True)
    channel_ratio: float = bounded(0.3, low=0, high=1, high_open=True)
    latency_keep: float | None = bounded(None, low=0, high=1, low_open=True, high_open=True)
    latency_ms: float | None = bounded(None, low=0, low_open=True)
    runtime: Literal["torch", "torchscript", "onnxruntime"] = "torchscript"
    batch: int = bounded(1, low=1)
    scope: Literal["global", "local"] = "global"
    normalizer: Normalizer = "mean"
    fallback: Literal["bn", "skip"] = "bn"
    max_pruning_ratio: float = bounded(0.9, low=0, high=1, low_open=True, high_open=True)
    round_to: int = bounded(16, low=1)
    steps: int = bounded(1, low=1)
    epochs_between_steps: int = bounded(1, low=0)
    ignore: list[str] = field(default_factory=list)
    strip_gates: bool = True

    def __post_init__(self) -> None:
        if self.target == "latency":
            if (self.latency_keep is None) == (self.latency_ms is None):
                raise NamPruneError(
                    "prune.target: latency needs one of prune.latency_keep (a share of the dense model's latency, "
                    "e.g. 0.5) or prune.latency_ms"
                )
            check_runtime(self.runtime)


@dataclass
class Member:
    """One layer a group's cut changes: which side (output channels or input) and, per channel of that layer
    the group covers, the root channel it follows (all in the unpruned numbering). ``min_keep``
    is set when the group covers the layer wholly but not one-to-one with the root (a split
    half, a layer fed by a channel and its copy): the cut must leave it that many channels."""

    name: str
    out_channels: bool
    local: np.ndarray
    root: np.ndarray
    min_keep: int = 0


def _members(
    group: tp.Group, graph: tp.DependencyGraph, names: dict[nn.Module | nn.Parameter, str], size: int, max_ratio: float
) -> list[Member]:
    members = []
    for item in group:
        module = item.dep.target.module
        if module not in names:  # concat/split bookkeeping nodes are not layers of the model
            continue
        local = np.array([int(i) for i in item.idxs], dtype=np.int64)
        root = np.array([int(i) for i in item.root_idxs], dtype=np.int64)
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        channels = (graph.get_out_channels(module) if out else graph.get_in_channels(module)) or 0
        covered = len(np.unique(local))
        one_to_one = covered == size and len(local) == size and len(np.unique(root)) == size
        min_keep = max(1, int(np.ceil(channels * (1 - max_ratio)))) if covered == channels and not one_to_one else 0
        members.append(Member(names[module], out, local, root, min_keep))
    return members


@dataclass
class ScoredGroup:
    """One prunable coupled group: its root layer and one score per channel.

    ``channel_groups`` > 1 when a grouped convolution (or GroupNorm) is in the group: its
    channels form that many equal blocks, and a cut must take the same positions from each
    block or the grouped layer no longer splits evenly. Positions are then what is ranked
    and cut; ``min_keep`` counts positions (channels per block).
    """

    root: str
    out_channels: bool
    scores: torch.Tensor
    min_keep: int
    channel_groups: int = 1
    members: list[Member] = field(default_factory=list, repr=False)

    @property
    def positions(self) -> int:
        return len(self.scores) // self.channel_groups

    def position_scores(self) -> torch.Tensor:
        """Each position's score averaged over the blocks (torch-pruning does the same)."""
        return self.scores.view(self.channel_groups, -1).mean(0)

    def channels_at(self, positions: np.ndarray) -> list[int]:
        return sorted(int(p) + block * self.positions for block in range(self.channel_groups) for p in positions)


def _resolve(model: nn.Module, names: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise NamPruneError(f"prune.ignore names unknown modules: {', '.join(missing)}")
    return [modules[n] for n in names]


def channel_groups(
    group: tp.Group, graph: tp.DependencyGraph, tied: dict[nn.Module, tuple[int, int]] | None = None
) -> int:
    """The blocks a cut of ``group`` must respect: conv groups (depthwise convs excepted, they
    follow any cut channel by channel) and GroupNorm groups of every member, in the root's
    numbering (a member on one part of the root has its groups in every part), combined, and
    the copies of a ``tied`` layer when the root's channels are laid out as those copies."""
    blocks = 1
    size = len(group[0].idxs)
    for item in group:
        module = item.dep.target.module
        parts, width = (tied or {}).get(module, (0, 0))
        if parts and size == parts * width:
            blocks = math.lcm(blocks, parts)
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        if graph.is_out_channel_pruning_fn(item.dep.handler):
            count = int(pruner.get_out_channel_groups(module))
        else:
            count = int(pruner.get_in_channel_groups(module))
        covered = len(item.idxs)
        if count > 1 and covered < size and size % covered == 0:
            count *= size // covered  # a grouped layer on one part of the root (Res2NeXt's scale parts)
        blocks = math.lcm(blocks, count)
    return blocks


def prunable_groups(
    model: nn.Module, graph: tp.DependencyGraph, config: PruneConfig, protected: Protected | None = None
) -> Iterator[tp.Group]:
    """Every group a cut may change: rooted at a conv or linear layer that is not the head, in
    ``config.ignore`` or ``protected.layers``, changing nothing inside a ``protected`` block and
    no frozen channel."""
    protected = protected or Protected()
    roots_kept = head_layers(model) + _resolve(model, config.ignore) + protected.layers
    ignored = [m for layer in roots_kept for m in layer.modules()]
    frozen = blocks.frozen_channels(model)
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        if not (reaches_into(group, graph, protected.blocks) or blocks.touches_frozen(group, graph, frozen)):
            yield group


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
    ``compare`` command passes L1-norm and random ones). Only :func:`prunable_groups` are scored.
    """
    importance = importance or NAMImportance(model, config.normalizer, config.fallback)
    names = layer_names(model)
    tied = blocks.tied_copies(model)
    scored = []
    for group in prunable_groups(model, graph, config, protected):
        scores = importance(group)
        if scores is None:
            continue
        root = group[0].dep.target.module
        name = names[root]
        split = channel_groups(group, graph, tied)
        if len(scores) % split:
            log.debug("skipping %s: %d channels do not split into %d groups", name, len(scores), split)
            continue
        initial = initial_channels.setdefault(name, len(scores)) // split
        min_keep = max(1, int(np.ceil(initial * (1 - config.max_pruning_ratio))))
        out_channels = graph.is_out_channel_pruning_fn(group[0].dep.handler)
        members = _members(group, graph, names, len(scores), config.max_pruning_ratio)
        scored.append(ScoredGroup(name, out_channels, scores, min_keep, split, members))
    if not scored:
        raise NamPruneError(
            "no prunable channel group has a NAM gate or a BatchNorm to rank it by; "
            "insert NAM gates (nam.placement: every_bn) or set prune.fallback: bn"
        )
    return scored


def _rounding_steps(groups: list[ScoredGroup], config: PruneConfig) -> list[int]:
    """Positions per block of ``round_to`` channels in each group (a grouped layer's position is several channels)."""
    return [config.round_to // math.gcd(config.round_to, g.channel_groups) for g in groups]


def _round_keep(keep: int, size: int, min_keep: int, round_to: int) -> int:
    if round_to > 1:
        keep = max(round_to, keep - keep % round_to)
    return min(size, max(keep, min_keep))


def _allowed_cuts(group: ScoredGroup, order: np.ndarray, score: np.ndarray, step: int) -> np.ndarray:
    """The cuts ``round_to`` allows in ``group``, as consecutive runs of its ranked positions:
    rows ``(start, end, score)`` where cutting through ``end`` leaves a multiple of ``step``
    positions (at least one step and ``min_keep``), scoring as the run's most important position."""
    size = group.positions
    ends = np.array([size - keep for keep in range(size - 1, max(step, group.min_keep) - 1, -1) if keep % step == 0])
    if not len(ends):
        return np.zeros((0, 3))
    starts = np.concatenate([[0], ends[:-1]])
    return np.stack([starts, ends, score[order[ends - 1]]], axis=1)


def plan_cut(groups: list[ScoredGroup], fraction: float, config: PruneConfig) -> dict[str, list[int]]:
    """Channels to remove per root layer so that ``fraction`` of the current channels go.

    Global scope ranks blocks of channels across all layers: each layer's channels in score
    order, cut in the blocks ``round_to`` allows (a block scores as its best channel, so an
    all-zero block goes before any live channel; rounding each layer's cut afterwards would cut
    live channels while whole blocks of zeros stayed elsewhere). Ties go by the share of its
    layer already cut, which spreads them evenly instead of emptying the first layers. A position
    of a grouped layer weighs as many channels as it has blocks.
    """
    sizes = np.array([g.positions for g in groups])
    weights = np.array([g.channel_groups for g in groups])
    steps = _rounding_steps(groups, config)
    scores = [g.position_scores().numpy() for g in groups]
    orders = [np.argsort(score, kind="stable") for score in scores]
    if config.scope == "local":
        caps = np.maximum(sizes - np.array([g.min_keep for g in groups]), 0)
        counts = np.minimum(caps, np.round(fraction * sizes).astype(int))
    else:
        cuts = [_allowed_cuts(g, order, score, step) for g, order, score, step in zip(groups, orders, scores, steps)]
        owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(cuts)]).astype(int)
        starts, ends, score_key = np.concatenate(cuts).T
        starts, ends = starts.astype(int), ends.astype(int)
        ranked = np.lexsort((starts / sizes[owner], score_key))
        wanted = int(round(fraction * float((sizes * weights).sum())))
        taken = int(np.searchsorted(np.cumsum(((ends - starts) * weights[owner])[ranked]), wanted, side="right"))
        counts = np.zeros(len(groups), dtype=int)
        np.maximum.at(counts, owner[ranked[:taken]], ends[ranked[:taken]])
    plan = {}
    for group, order, size, count, step in zip(groups, orders, sizes, counts, steps):
        keep = _round_keep(int(size - count), int(size), group.min_keep, step)
        if keep < size:
            cut = group.channels_at(order[: size - keep])
            plan[group.root] = _spare_members(cut, group)
    return {root: cut for root, cut in plan.items() if cut}


def _spare_members(cut: list[int], group: ScoredGroup) -> list[int]:
    """Give back root channels until every limited member keeps its ``min_keep`` channels
    (its best channels first, a channel's score being the best of the roots it follows)."""
    removed = set(cut)
    for member in (m for m in group.members if m.min_keep):
        hit = np.isin(member.root, list(removed))
        lost = np.unique(member.local[hit])
        excess = member.min_keep - (len(np.unique(member.local)) - len(lost))
        if excess <= 0:
            continue
        value = {int(c): float(group.scores[member.root[member.local == c]].max()) for c in lost}
        for channel in sorted(value, key=value.get, reverse=True)[:excess]:
            removed.difference_update(int(r) for r in member.root[member.local == channel])
    return sorted(removed)


def layer_cuts(groups: list[ScoredGroup], plan: dict[str, list[int]]) -> LayerCuts:
    """What ``plan`` removes from each layer: per layer and side, the union of the channels its
    groups' maps give, all in the numbering the groups were scored in."""
    cuts: dict[tuple[str, bool], set[int]] = {}
    for group in groups:
        if group.root not in plan:
            continue
        wanted = np.array(plan[group.root], dtype=np.int64)
        for member in group.members:
            chosen = member.local[np.isin(member.root, wanted)]
            if len(chosen):
                cuts.setdefault((member.name, member.out_channels), set()).update(int(i) for i in chosen)
    return [(name, out, sorted(channels)) for (name, out), channels in cuts.items()]


def apply_plan(model: nn.Module, groups: list[ScoredGroup], plan: dict[str, list[int]]) -> LayerCuts:
    """Cut the planned channels; returns them per layer, replayable with ``graph.cut_layers``."""
    cuts = layer_cuts(groups, plan)
    cut_layers(model, cuts)
    return cuts


def trial_cut(model: nn.Module, groups: list[ScoredGroup], plan: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` with ``plan`` cut (the cut :func:`apply_plan` makes)."""
    trial = copy.deepcopy(model)
    cut_layers(trial, layer_cuts(groups, plan))
    return trial


def _trial_macs(model: nn.Module, example_input: torch.Tensor, groups: list[ScoredGroup], plan: dict[str, list[int]]) -> int:
    return count_macs_params(trial_cut(model, groups, plan), example_input)[0]


def search_fraction(macs_at: Callable[[float], int], target: float, tolerance: float = 1e-3, trials: int = 16) -> float:
    """The smallest channel fraction whose MACs (``macs_at``, non-increasing) meet ``target``,
    to within ``tolerance`` of it: regula falsi with the Illinois fix, so a smooth MAC curve
    takes a handful of trials where bisection takes 14, and a stepped one still converges."""
    low, high = 0.0, 1.0
    macs_low, macs_high = float(macs_at(low)), float(macs_at(high))
    if macs_low <= target:
        return low
    side = 0  # which end moved last: Illinois halves the stale end's weight to avoid one-sided crawl
    for _ in range(trials):
        if macs_high >= target * (1 - tolerance) or high - low < 1e-4:
            break
        weight_low, weight_high = macs_low - target, target - macs_high
        middle = low + (high - low) * weight_low / (weight_low + weight_high)
        middle = min(max(middle, low + 1e-5), high - 1e-5)
        macs = float(macs_at(middle))
        if macs <= target:
            high, macs_high = middle, macs
            if side == 1:
                macs_low = target + (macs_low - target) / 2
            side = 1
        else:
            low, macs_low = middle, macs
            if side == -1:
                macs_high = target - (target - macs_high) / 2
            side = -1
    return high


def least_macs(
    model: nn.Module,
    example_input: torch.Tensor,
    config: PruneConfig,
    target_macs: float,
    groups: list[ScoredGroup],
    keep_option: str = "prune.macs_keep",
) -> int:
    """The MACs of the deepest cut ``config`` allows; an error if that is still above ``target_macs``
    (``keep_option`` names the setting the user raises instead)."""
    floor = _trial_macs(model, example_input, groups, plan_cut(groups, 1.0, config))
    if floor > target_macs:
        rounding = f" and prune.round_to={config.round_to}" if config.round_to > 1 else ""
        kept = ", ".join(f"{kind} ({count})" for kind, count in blocks.kept_whole_counts(model).items())
        raise NamPruneError(
            f"cannot reach {target_macs / 1e6:.2f}M MACs: with prune.max_pruning_ratio={config.max_pruning_ratio}"
            f"{rounding}{f' and kept whole: {kept},' if kept else ''} the least this model can keep is "
            f"{floor / 1e6:.2f}M; raise max_pruning_ratio"
            f"{' or lower round_to' if config.round_to > 1 else ''} or raise {keep_option}"
        )
    return floor


def macs_step(model: nn.Module, example_input: torch.Tensor, config: PruneConfig, groups: list[ScoredGroup]) -> int:
    """The most MACs one step of the cut can remove at once, at the model's current widths: how far
    below a MAC target the first cut that meets it (:func:`fraction_for_macs`) can land, whatever
    the ranking. A global cut grows by one block of ``round_to`` channels of one layer group at a
    time; a local cut takes the same share of every group, so groups whose rounded widths change at
    the same share step together. Each step is costed at the current widths of the layers it
    shrinks, an upper bound once other layers are cut too."""
    dense = count_macs_params(model, example_input)[0]
    jumps: dict[object, float] = {}
    for index, (group, step) in enumerate(zip(groups, _rounding_steps(groups, config))):
        size = group.positions
        if config.scope == "local":
            cap = max(size - group.min_keep, 0)
            keeps = [_round_keep(size - min(cap, count), size, group.min_keep, step) for count in range(size + 1)]
            # np.round(fraction * size) reaches ``count`` at fraction (count - 0.5) / size
            moves = [(round((count - 0.5) / size, 12), keeps[count - 1] - keeps[count]) for count in range(1, size + 1)]
        else:
            cuts = _allowed_cuts(group, np.arange(size), np.zeros(size), step)
            moves = [((index, row), int(end - start)) for row, (start, end, _) in enumerate(cuts)]
        moves = [(at, positions) for at, positions in moves if positions > 0]
        if not moves:
            continue
        position = dense - _trial_macs(model, example_input, groups, {group.root: group.channels_at(np.arange(1))})
        for at, positions in moves:
            jumps[at] = jumps.get(at, 0.0) + positions * position
    return int(max(jumps.values(), default=0))


def fraction_for_macs(
    model: nn.Module,
    example_input: torch.Tensor,
    config: PruneConfig,
    target_macs: float,
    groups: list[ScoredGroup],
) -> float:
    """The channel fraction whose pruned model first meets ``target_macs``.

    Each trial prunes a copy and counts its MACs, so the answer holds whatever the
    architecture's coupling.
    """
    known = {1.0: least_macs(model, example_input, config, target_macs, groups)}

    def macs_at(fraction: float) -> int:
        if fraction not in known:
            known[fraction] = _trial_macs(model, example_input, groups, plan_cut(groups, fraction, config))
        return known[fraction]

    return search_fraction(macs_at, target_macs)


def warn_if_untrained(groups: list[ScoredGroup]) -> None:
    """Say so when the ranking is mostly ties: the order among them is arbitrary."""
    scores = torch.cat([g.scores for g in groups])
    finite = scores[torch.isfinite(scores)]
    if finite.numel() and float((finite == finite.median()).float().mean()) > 0.5:
        if float(finite.median()) == 0.0:
            log.warning(
                "the sparsity penalty drove most NAM scores to 0: ties are cut evenly across layers and the "
                "trained model has lost those channels already; lower sparsity.penalty (or sparsity.scale_lr)"
            )
            return
        log.warning(
            "most NAM scores are equal (an untrained NAM model?): ties are cut evenly across layers; "
            "train with sparsity.epochs > 0 for a meaningful ranking"
        )
