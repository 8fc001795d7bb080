"""The stages after sparsity training, written once for ``run`` and ``compare``:

prune -> strip the gates (``prune.strip_gates``) -> measure pruned -> recalibrate BN ->
measure recalibrated -> fine-tune -> recalibrate -> measure; with ``finetune.open_gates`` the gates
are stripped after fine-tuning instead, once it has opened them.

:class:`PruneAndFinetune` runs them on one model. ``pipeline`` hooks in to write ``dense.pt``
and checkpoint between stages; ``compare`` to check each arm's MACs and seed its fine-tuning.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.artifact import ModelRecord
from nam_prune.prune import PruneConfig, PruneResult, prune_model
from nam_prune.surgery import strip_gates
from nam_prune.tasks import Task
from nam_prune.train import TrainConfig, TrainState

Measure = Callable[[nn.Module, str], dict[str, Any]]
"""A stage's metrics of a model, given the stage's label (``pruned``, ``recalibrated``, ``fine-tuned``)."""


def train_stage(task: Task, model: nn.Module, config: TrainConfig, stage: str, **checkpointing: Any) -> list[dict[str, Any]]:
    """A training stage, ending with recalibrated BN statistics (before anything evaluates or saves it)."""
    history = task.train(model, config, stage, **checkpointing)
    if config.epochs:
        task.recalibrate(model)
    return history


class PruneAndFinetune:
    """The stage sequence on ``model`` (built as ``record`` says), in place.

    After :meth:`run`, ``metrics`` holds ``pruned``, ``recalibrated`` (when the task
    recalibrates) and ``after``; ``record`` the pruned model's record; ``pruning`` what the cut
    did; ``finetune_log`` the fine-tuning epochs; ``seconds`` the time the cut and the
    fine-tuning took. Subclasses hook in through :meth:`after_prune`, :meth:`before_finetune`
    and :meth:`on_epoch_end`.
    """

    def __init__(self, task: Task, model: nn.Module, record: ModelRecord, example: torch.Tensor, measure: Measure) -> None:
        self.task, self.model, self.record, self.example, self.measure = task, model, record, example, measure
        self.metrics: dict[str, dict[str, Any]] = {}
        self.pruning: PruneResult | None = None
        self.finetune_log: list[dict[str, Any]] = []
        self.seconds = {"prune": 0.0, "finetune": 0.0}

    def run(
        self,
        prune: PruneConfig,
        finetune: TrainConfig,
        label: str = "finetune",
        *,
        importance: tp.importance.Importance | None = None,
        cut: bool = True,
        resume: TrainState | None = None,
    ) -> dict[str, dict[str, Any]]:
        """The whole sequence; ``cut=False`` starts at fine-tuning (a model cut and measured before
        an interruption, or one that stays dense); ``resume`` continues an interrupted fine-tuning."""
        if cut:
            between = replace(finetune, epochs=prune.epochs_between_steps, open_gates=0)
            self.cut(prune, between, importance, strip=prune.strip_gates and not finetune.open_gates)
            self.measure_cut()
            self.before_finetune()
        self.finetune(finetune, label, resume)
        if finetune.open_gates and self.record.nam is not None and not self.record.stripped:
            self.strip(fold=False)  # fine-tuning opened them fully: the model is the same without them
        self.metrics["after"] = self.measure(self.model, "fine-tuned")
        return self.metrics

    def cut(
        self, config: PruneConfig, between: TrainConfig, importance: tp.importance.Importance | None, strip: bool
    ) -> None:
        """Prune to ``config`` (training ``between`` steps), then strip the gates if ``strip``."""
        tick = time.perf_counter()

        def train_between(step: int) -> None:
            self.task.recalibrate(self.model)
            train_stage(self.task, self.model, between, f"step {step}")

        self.pruning = prune_model(
            self.model, self.example, config,
            importance=importance, protected=self.task.protected(self.model), train_between=train_between,
            deploy_mode=self.task.deploy_mode,
        )
        self.after_prune(self.pruning)
        self.record = replace(self.record, history=self.record.history + self.pruning.history)
        if strip and self.record.nam is not None:  # gate-then-strip: fine-tune the plain model
            self.strip(fold=True)
        self.seconds["prune"] = time.perf_counter() - tick

    def strip(self, fold: bool) -> None:
        """Remove the gates (``fold``: into their host BN, see ``strip_gates``); the record says the model has none."""
        strip_gates(self.model, fold)
        self.record = replace(self.record, stripped=True)

    def measure_cut(self) -> None:
        """The cut model as it is, then with its BN statistics recalibrated."""
        self.metrics["pruned"] = self.measure(self.model, "pruned")
        if self.task.recalibrate(self.model):
            self.metrics["recalibrated"] = self.measure(self.model, "recalibrated")

    def finetune(self, config: TrainConfig, label: str, resume: TrainState | None = None) -> None:
        tick = time.perf_counter()
        self.finetune_log = train_stage(self.task, self.model, config, label, on_epoch_end=self.on_epoch_end, resume=resume)
        self.seconds["finetune"] = time.perf_counter() - tick

    def after_prune(self, pruning: PruneResult) -> None:
        """Right after the cut, before the gates are stripped."""

    def before_finetune(self) -> None:
        """The cut model is measured (``metrics``) and about to be fine-tuned."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After every complete fine-tuning epoch."""
