"""Stage 4: the prune verb — one-shot or in steps to the config's target, with training between steps.

``prune_model(model, example, PruneConfig(target="macs", macs_keep=0.5, steps=2))`` prunes
in place, in the style of torchao's ``quantize_(model, config)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.errors import NamPruneError
from nam_prune.prune.graph import Protected, PruningHistory, build_graph, count_macs_params, parameter_count
from nam_prune.prune.planning import (
    PruneConfig,
    ScoredGroup,
    apply_plan,
    fraction_for_macs,
    least_macs,
    macs_step,
    plan_cut,
    score_groups,
    warn_if_untrained,
)

log = logging.getLogger("nam_prune")


@dataclass
class PruneResult:
    history: PruningHistory  # every step's cuts, replayable on the dense model
    params_before: int
    params_after: int
    fraction: float  # share of the channels the last step removed
    threshold: float  # the largest score the last step cut (in the normalizer's units)


def channel_step_fraction(total_ratio: float, step: int, steps: int) -> float:
    """Share of the *current* channels to cut at ``step`` so ``total_ratio`` is gone after ``steps``."""
    keep_now = 1 - total_ratio * (step - 1) / steps
    keep_next = 1 - total_ratio * step / steps
    return 1 - keep_next / keep_now


def _step_fraction(
    model: nn.Module, example: torch.Tensor, config: PruneConfig, step: int, dense_macs: int, groups
) -> float:
    if config.target == "channels":
        return channel_step_fraction(config.channel_ratio, step, config.steps)
    target = dense_macs * (1 - (1 - config.macs_keep) * step / config.steps)
    return fraction_for_macs(model, example, config, target, groups)


def _unpruned_groups(
    model: nn.Module, example_input: torch.Tensor, config: PruneConfig, protected: Protected | None,
    importance: tp.importance.Importance | None = None,
) -> list[ScoredGroup]:
    protected = protected or Protected()
    graph = build_graph(model, example_input, protected.stand_ins)
    return score_groups(model, graph, config, {}, importance, protected)


def check_prunable(model: nn.Module, example_input: torch.Tensor, config: PruneConfig, protected: Protected | None = None) -> None:
    """Raise before training what pruning would raise after it: a ``prune.ignore`` that names no
    module, a model with nothing to rank, a MAC target below the deepest cut that ``round_to`` and
    ``max_pruning_ratio`` allow. It traces ``model``: pass a copy in eval mode (a forward in
    training mode would move its BN statistics)."""
    groups = _unpruned_groups(model, example_input, config, protected)
    if config.target == "macs":
        least_macs(model, example_input, config, count_macs_params(model, example_input)[0] * config.macs_keep, groups)


def check_macs_keeps(
    model: nn.Module,
    example_input: torch.Tensor,
    config: PruneConfig,
    keeps: list[float],
    protected: Protected | None = None,
    importance: tp.importance.Importance | None = None,
    keep_option: str = "prune.macs_keep",
) -> float:
    """:func:`check_prunable` for several shares of the MACs kept at once (one trace), ranked by
    ``importance``; returns how closely a cut can meet any MAC target on this model: the largest
    share of its MACs one step of the cut removes (:func:`~nam_prune.prune.planning.macs_step`).
    Same caveat: pass a copy in eval mode."""
    groups = _unpruned_groups(model, example_input, config, protected, importance)
    dense = count_macs_params(model, example_input)[0]
    least_macs(model, example_input, config, dense * min(keeps), groups, keep_option)
    return macs_step(model, example_input, config, groups) / dense


def prune_model(
    model: nn.Module,
    example_input: torch.Tensor,
    config: PruneConfig | None = None,
    *,
    importance: tp.importance.Importance | None = None,
    protected: Protected | None = None,
    train_between: Callable[[int], Any] | None = None,
) -> PruneResult:
    """Prune ``model`` in place to ``config``'s target, in ``config.steps`` steps.

    ``train_between(step)`` runs after every step but the last when
    ``config.epochs_between_steps > 0`` (the pipeline fine-tunes there). ``importance``
    defaults to NAM's; ``protected`` keeps a family's parts (a detection head) unpruned.
    ``max_pruning_ratio`` always refers to the model as it was before the first step.
    Raises if the model does not shrink: pruning never reports success for nothing.
    """
    config = config or PruneConfig()
    protected = protected or Protected()
    dense_macs = count_macs_params(model, example_input)[0] if config.target == "macs" else 0
    initial_channels: dict[str, int] = {}
    params_before = parameter_count(model)
    history: PruningHistory = []
    for step in range(1, config.steps + 1):
        graph = build_graph(model, example_input, protected.stand_ins)
        groups = score_groups(model, graph, config, initial_channels, importance, protected)
        warn_if_untrained(groups)
        fraction = _step_fraction(model, example_input, config, step, dense_macs, groups)
        plan = plan_cut(groups, fraction, config)
        scores = {g.root: g.scores for g in groups}
        threshold = max(float(scores[root][idxs].max()) for root, idxs in plan.items()) if plan else float("nan")
        step_params = parameter_count(model)
        history.append(apply_plan(model, groups, plan))
        if parameter_count(model) >= step_params:  # cheap: MACs are counted by the caller's report
            raise NamPruneError(
                "pruning removed nothing: every layer is at prune.max_pruning_ratio, narrower than prune.round_to "
                "allows to cut, or the target is the model's own size; lower prune.macs_keep / raise "
                "prune.channel_ratio, or lower prune.round_to"
            )
        log.info(
            "step %d/%d: pruned %d layer group(s) (channel share %.3f): params %.3fM -> %.3fM",
            step, config.steps, len(plan), fraction, step_params / 1e6, parameter_count(model) / 1e6,
        )
        if step < config.steps and config.epochs_between_steps and train_between is not None:
            train_between(step)
    return PruneResult(history, params_before, parameter_count(model), fraction, threshold)
