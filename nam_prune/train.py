"""Stage 2 and 5: sparsity training (with the NAM penalty) and fine-tuning, plus evaluation.

One loop serves both: sparsity training is fine-tuning with ``penalty > 0``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from nam_prune import distributed
from nam_prune.config import bounded
from nam_prune.console import progress_bar
from nam_prune.errors import NamPruneError
from nam_prune.gates import set_gate_opening, use_compiled_gates
from nam_prune.sparsity import (
    GammaStats,
    RegularizerChoice,
    Scales,
    apply_sparsity_penalty,
    clamp_scales,
    gamma_stats,
    gate_scales,
)
from nam_prune.surgery import resolved_regularizer

log = logging.getLogger("nam_prune")

AfterBackward = Callable[[nn.Module], None]
"""Called with the (unwrapped) model after each backward pass: adds a regularizer's gradients."""


@dataclass
class TrainConfig:
    """Optimiser and schedule for one training stage.

    penalty: sparsity strength p (0 = plain training); regularizer: ``polarization`` (with t =
    ``polarization_t``; scales clamped to [0, 1]), ``l1`` (the paper's) or ``auto`` (the default: polarization
    on ResNets, L1 elsewhere and for the paper's gate, ``surgery.resolved_regularizer``; polarization on detectors).
    milestones: fractions of the epochs where a ``multistep`` schedule divides the learning
    rate by 10. scale_lr: the penalised scales' learning rate as a multiple of ``lr``. AdamW
    moves a parameter about ``lr`` per step whatever the penalty's size, so at lr 1e-3 a gamma
    at 1 needs 1,000 steps to reach 0: a short sparsity stage on a detector needs a larger one.
    teacher: a trained model this stage also learns from (knowledge distillation, the usual way
    to win back a pruned model's last points): for classifiers a nam-prune ``.pt`` or a state
    dict of ``model.name``, learnt through Hinton's soft targets; for detectors a trusted
    ultralytics ``.pt``, through ultralytics' own distillation. distill: the distillation loss's
    weight as a multiple of its trainer's default (the soft targets weigh as the cross-entropy
    does; ultralytics' ``dis`` is 6).
    open_gates: fine-tuning only, with ``prune.strip_gates``: the NAM gates stay through the cut
    and open linearly, step by step, into the identity over this many epochs (``NAMGated.opening``
    0 -> 1), so the network learns to do without them and removing them after the stage is exact.
    0 strips them at the cut (``surgery.strip_gates``).
    """

    epochs: int = bounded(0, low=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = bounded(0.1, low=0, low_open=True)
    momentum: float = bounded(0.9, low=0, high=1, high_open=True)
    weight_decay: float = bounded(5e-4, low=0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    penalty: float = bounded(0.0, low=0)
    regularizer: RegularizerChoice = "auto"
    polarization_t: float = bounded(1.2, low=1)
    scale_lr: float = bounded(1.0, low=0, low_open=True)
    teacher: str | None = None
    distill: float = bounded(1.0, low=0, low_open=True)
    open_gates: int = bounded(0, low=0)

    @property
    def scales_own_lr(self) -> bool:
        """Whether the penalised scales need an optimizer group of their own (a penalty at another rate)."""
        return self.penalty > 0 and self.scale_lr != 1.0

    def gate_opening(self, step: int, steps_per_epoch: int) -> float:
        """``NAMGated.opening`` at the stage's ``step`` (from 0): a linear rise that reaches 1 at the last
        step of epoch ``open_gates``."""
        return min(1.0, step / max(1, self.open_gates * steps_per_epoch - 1))


def require_cpp_compiler(device: torch.device) -> None:
    """``torch.compile`` builds its CPU kernels with a C++ compiler: say so before a run starts,
    not as an Inductor traceback at the first training step."""
    if device.type != "cpu":
        return
    compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")  # what Inductor runs
    if not shutil.which(compiler.split()[0]):
        raise NamPruneError(
            "nam.compile: true needs a C++ compiler on the CPU (torch.compile builds its kernels with one): "
            "install g++ (apt-get install -y g++) or set nam.compile: false"
        )


def enable_compile(enabled: bool, device: torch.device) -> None:
    """``nam.compile`` for a run or a compare: the compiler check first, then the compiled gates
    (what YOLO's trainer uses; a classifier is compiled whole in :func:`fit`)."""
    if enabled:
        require_cpp_compiler(device)
    use_compiled_gates(enabled)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    accuracy: float
    penalty: float
    near_zero_gammas: int
    lr: float


def _penalty_and_gates(config: TrainConfig, penalty: float, stats: GammaStats) -> str:
    """The epoch summary's tail: the penalty only when the stage applies one, the gate statistics
    only when the model has gates (a stripped or plain model has none to count)."""
    parts = [f"penalty {penalty:.4g}"] if config.penalty else []
    if stats.channels:
        parts.append(str(stats))
    return "".join(f", {part}" for part in parts)


DISTILL_TEMPERATURE = 4.0  # Hinton et al.'s soft targets: enough to show the teacher's ranking of the wrong classes


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softened class distributions, times T² so its gradients
    keep the cross-entropy's scale whatever the temperature."""
    t = DISTILL_TEMPERATURE
    soft_student = torch.log_softmax(student / t, dim=1)
    soft_teacher = torch.log_softmax(teacher / t, dim=1)
    return nn.functional.kl_div(soft_student, soft_teacher, log_target=True, reduction="batchmean") * t * t


def make_optimizer(model: nn.Module, config: TrainConfig, penalised: Scales = gate_scales) -> torch.optim.Optimizer:
    """The stage's optimizer; the penalised scales get their own group at ``scale_lr`` times the rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params}]
    if config.scales_own_lr:
        scales = {id(scale) for scale in penalised(model)}
        groups = [
            {"params": [p for p in params if id(p) not in scales]},
            {"params": [p for p in params if id(p) in scales], "lr": config.lr * config.scale_lr},
        ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=False
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """A per-step schedule, so short runs (a few epochs) still anneal smoothly."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=sorted(int(m * total) for m in config.milestones), gamma=0.1
        )
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@dataclass
class TrainState:
    """Where a training stage stands after a complete epoch (random-number states are the caller's)."""

    epoch: int
    history: list[EpochLog]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "history": [asdict(e) for e in self.history]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        return cls(**{**data, "history": [EpochLog(**e) for e in data["history"]]})


def fit(
    model: nn.Module,
    loader: DataLoader,
    config: TrainConfig,
    device: torch.device,
    stage: str,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    resume: TrainState | None = None,
    penalised: Callable[[nn.Module], list[torch.Tensor]] = gate_scales,
    compiled: bool = False,
    after_backward: AfterBackward | None = None,
    teacher: nn.Module | None = None,
) -> list[EpochLog]:
    """Train ``model`` for ``config.epochs``; the NAM penalty is applied when ``config.penalty > 0``.

    ``on_epoch_end`` receives the state after each complete epoch (to checkpoint it);
    ``resume`` continues from such a state with the same optimizer and schedule;
    ``penalised`` picks the scales the L1 penalty acts on (NAM gates by default);
    ``after_backward(model)`` runs after every backward pass and the penalty, before the
    optimizer step (a regularizer that adds to the gradients: torch-pruning's group sparsity);
    ``compiled`` trains through ``torch.compile`` of the whole model, so each BN, its gate and
    the activation after them run as fused kernels (``nam.compile``; compiled anew per stage,
    as pruning changes the shapes); ``teacher`` (in eval mode, frozen) adds ``config.distill`` times
    the distillation loss to its outputs.
    """
    if config.epochs == 0:
        return []
    if config.regularizer == "auto":
        config = replace(config, regularizer=resolved_regularizer(model, config.regularizer))
        if config.penalty:
            log.info("%s: sparsity.regularizer auto is %s for this model", stage, config.regularizer)
    model.to(device)
    trained = distributed.wrap(model, device)  # DDP under torchrun; the penalty finds the gates through it
    if compiled:  # a fresh cache: each pruned architecture would otherwise count towards recompile_limit
        torch._dynamo.reset()
        trained = torch.compile(trained)
    optimizer = make_optimizer(model, config, penalised)
    scheduler = make_scheduler(optimizer, config, len(loader))
    history: list[EpochLog] = []
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        history = list(resume.history)
    criterion = nn.CrossEntropyLoss()
    if teacher is not None:
        teacher.to(device).eval()
    with progress_bar() as bar:
        for epoch in range(len(history) + 1, config.epochs + 1):
            trained.train()
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            task = bar.add_task(f"{stage} {epoch}/{config.epochs}", total=len(loader), status="")
            seen = correct = 0
            loss_sum = penalty = 0.0
            for step, (images, labels) in enumerate(loader, 1):
                if config.open_gates:
                    set_gate_opening(model, config.gate_opening((epoch - 1) * len(loader) + step - 1, len(loader)))
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                logits = trained(images)
                loss = criterion(logits, labels)
                if teacher is not None:
                    with torch.no_grad():
                        targets = teacher(images)
                    loss = loss + config.distill * distillation_loss(logits, targets)
                if not math.isfinite(loss.item()):
                    raise NamPruneError(
                        f"{stage}: loss became {loss.item()} at epoch {epoch}, step {step}; "
                        "lower the learning rate or the penalty (the last complete epoch is kept)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                penalty = apply_sparsity_penalty(
                    trained, config.penalty, penalised, config.regularizer, config.polarization_t
                )
                if after_backward is not None:
                    after_backward(model)
                optimizer.step()
                if config.penalty and config.regularizer == "polarization":
                    clamp_scales(trained, penalised)
                scheduler.step()
                seen += labels.numel()
                correct += int((logits.argmax(1) == labels).sum())
                loss_sum += loss.item() * labels.numel()
                bar.update(task, advance=1, status=f"loss {loss_sum / seen:.3f}")
            bar.remove_task(task)
            loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device)
            stats = gamma_stats(model)
            entry = EpochLog(
                epoch, loss_sum / seen, correct / seen, penalty, stats.near_zero, optimizer.param_groups[0]["lr"]
            )
            history.append(entry)
            log.info(
                "%s epoch %d/%d: loss %.4f, train acc %.4f%s",
                stage, epoch, config.epochs, entry.loss, entry.accuracy, _penalty_and_gates(config, penalty, stats),
            )
            if stats.dead_layers:
                log.warning(
                    "%s: every NAM gamma of %s is below %g; pruning keeps at least one channel there",
                    stage, ", ".join(stats.dead_layers), stats.threshold,
                )
            distributed.sync_buffers(model)  # every rank ends each epoch with rank 0's BN statistics
            if on_epoch_end is not None:
                on_epoch_end(TrainState(epoch, list(history), optimizer.state_dict(), scheduler.state_dict()))
    return history


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, stage: str = "eval") -> float:
    """Top-1 accuracy (a fraction 0-1) on ``loader``."""
    model.to(device).eval()
    seen = correct = 0
    with progress_bar() as bar:
        task = bar.add_task(stage, total=len(loader), status="")
        for images, labels in loader:
            logits = model(images.to(device))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            seen += labels.numel()
            bar.update(task, advance=1, status=f"acc {correct / seen:.4f}")
    correct, seen = distributed.all_reduce_sum([correct, seen], device)
    return correct / max(seen, 1)


def accumulate_gradients(model: nn.Module, loader: DataLoader, batches: int, device: torch.device) -> int:
    """The mean cross-entropy's gradient over the first ``batches`` batches of ``loader`` in each
    parameter's ``.grad`` (what first-order Taylor importance reads), any earlier gradient
    discarded; returns the batches used. The model runs in eval mode, so its BN statistics stay."""
    model.to(device)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    criterion = nn.CrossEntropyLoss()
    used = 0
    try:
        with torch.enable_grad():
            for images, labels in loader:
                if used == batches:
                    break
                used += 1
                logits = model(images.to(device, non_blocking=True))
                (criterion(logits, labels.to(device, non_blocking=True)) / batches).backward()
    finally:
        model.train(was_training)
    return used
