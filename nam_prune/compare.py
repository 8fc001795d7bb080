"""Is NAM's ranking better than the alternatives? Criteria compared at matched MAC budgets.

Any model family works through its ``Task``: classifiers are scored by top-1 (``accuracy``),
detectors by mAP50-95 (``map50_95``); every score key below carries that name.

Each criterion gets the same data, epochs, fine-tune and seeds; only the gates, what the
first training penalises and how channels are ranked differ:

* ``nam``: the recipe's NAM gates and sparsity training (default: closing gates; ``sparsity.regularizer:
  auto``, polarization on ResNets, L1 elsewhere), ranked by ``NAMImportance``;
* ``nam_reference``: the paper's gate and penalty (``sigmoid(w * BN(x)) * x``, L1, p = 1e-4);
* ``bn_slimming``: no gates, L1 on every BN gamma at the recipe's p (network slimming), ranked
  by |BN gamma|; ``bn_slimming_polarized``: the same with the polarization penalty;
* ``group_sl``: no gates; torch-pruning's group-sparsity regularizer (``GroupSparsity``, DepGraph's
  sparse learning at ``GROUP_SL_REG``, no weight decay, no penalty) in the first training, then
  ranked by the groups' L2 norm (``GroupMagnitudeImportance(p=2, normalizer="max")``), as
  torch-pruning's CIFAR recipe (its benchmark script's ``main.py --method group_sl``) does;
* ``l1``: no gates, no penalty, ranked by the L1 norm of each conv filter;
* ``taylor``: no gates, no penalty; ranked by first-order Taylor importance
  (``GroupTaylorImportance``: |weight x gradient| summed over each group) with the gradients of
  the task loss over ``recalibrate.batches`` training batches (``TAYLOR_BATCHES`` when that is 0),
  accumulated right before the cut and cleared right after it;
* ``random``: no gates, no penalty, random ranking (seeded);
* ``dense``: no gates, no penalty, no pruning: the same two training stages, the ceiling every
  row is read against.

Every arm runs the stages ``run`` runs after sparsity training (``stages.PruneAndFinetune``):
cut, strip the gates, recalibrate BN (``recalibrate.batches``), fine-tune, recalibrate, the same
way for every arm. Budgets are shares of the dense MACs kept (``--macs-keep``, as
``prune.macs_keep`` in ``run``). Before any training every criterion's model is checked to
reach every budget, and the coarsest step in which ``prune.round_to`` lets this model's MACs
move sets how closely arms can match: each arm is cut by bisection to the first cut at or under
its budget, which lands within that step (plus the bisection's own ``MACS_TOLERANCE``), and
records the share it actually kept (``macs_kept``). Each finished arm is written to
``compare.json`` at once, and each trained model is cached, so an interrupted comparison
resumes where it stopped.

``group_sl`` and ``taylor`` need the task loss's gradients (``Task.exposes_gradients``):
classifiers have them; detectors (``yolo``) train through ultralytics' own loop, and compare
refuses both criteria for them before anything trains.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch_pruning as tp
from rich.table import Table

from nam_prune.artifact import ModelRecord, load_state, save
from nam_prune.checkpoint import atomic_write, read_checkpoint
from nam_prune.console import console
from nam_prune.errors import NamPruneError
from nam_prune.measure import cpu_latency_ms
from nam_prune.pipeline import resolve_device, seed_everything
from nam_prune.prune import (
    GroupSparsity,
    NAMImportance,
    PruneConfig,
    PruneResult,
    check_macs_keeps,
    count_macs_params,
)
from nam_prune.recipe import Recipe, changed_keys
from nam_prune.sparsity import Scales, batchnorm_scales, gate_scales
from nam_prune.stages import PruneAndFinetune
from nam_prune.surgery import NAMConfig
from nam_prune.tasks import Task, task_class
from nam_prune.train import AfterBackward, TrainConfig, TrainState, enable_compile

log = logging.getLogger("nam_prune")

MACS_TOLERANCE = 0.02
REFERENCE_PENALTY = 1e-4  # the NAM paper's p
GROUP_SL_REG = 5e-4
"""``group_sl``'s regularizer strength, whatever the recipe's penalty: torch-pruning's CIFAR recipe
(ResNet-56, ``--method group_sl --reg 5e-4``; its sparse-learning stage also turns weight decay off)."""
TAYLOR_BATCHES = 25
"""Training batches ``taylor``'s gradients average over when the recipe's ``recalibrate.batches`` is 0."""
GRADIENT_CRITERIA = ("group_sl", "taylor")


@dataclass(frozen=True)
class Training:
    """How an arm's model is built and trained before pruning (arms with equal trainings share one model)."""

    name: str
    gates: NAMConfig | None
    sparsity: TrainConfig
    penalised: Scales = gate_scales
    after_backward: Callable[[nn.Module, ModelRecord, Task], AfterBackward] | None = None
    """Builds, for the built model, what runs after each backward pass (``group_sl``'s regularizer)."""


def _group_norm() -> tp.importance.Importance:
    """group_sl's ranking, as torch-pruning's CIFAR recipe has it: each channel's L2 norm over its
    whole group, divided by the group's largest."""
    return tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")


def _group_sparsity(prune: PruneConfig) -> Callable[[nn.Module, ModelRecord, Task], AfterBackward]:
    def build(model: nn.Module, record: ModelRecord, task: Task) -> AfterBackward:
        example = record.example_input(task.device)
        return GroupSparsity(model, example, prune, task.protected(model), GROUP_SL_REG, _group_norm())

    return build


def _training(criterion: str, recipe: Recipe) -> Training:
    sparsity = recipe.sparsity
    if criterion == "nam":
        return Training("nam", recipe.nam, sparsity)
    if criterion == "nam_reference":
        gates = replace(recipe.nam, gate="reference")
        return Training("nam_reference", gates, replace(sparsity, penalty=REFERENCE_PENALTY, regularizer="l1"))
    if criterion == "bn_slimming":
        return Training("slimming", None, replace(sparsity, regularizer="l1"), batchnorm_scales)
    if criterion == "bn_slimming_polarized":
        return Training("slimming_polarized", None, replace(sparsity, regularizer="polarization"), batchnorm_scales)
    if criterion == "group_sl":
        plain = replace(sparsity, penalty=0.0, weight_decay=0.0)
        return Training("group_sl", None, plain, after_backward=_group_sparsity(recipe.prune))
    return Training("plain", None, replace(sparsity, penalty=0.0))


CRITERIA = ("nam", "nam_reference", "bn_slimming", "bn_slimming_polarized", "group_sl", "l1", "taylor", "random", "dense")


class SeededRandomImportance(tp.importance.Importance):
    """Random channel scores from a generator seeded once: the same sequence of groups gets the
    same scores in every run with that seed (a second call on a group draws new numbers)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: tp.Group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


def _importance(criterion: str, model: nn.Module, recipe: Recipe, seed: int) -> tp.importance.Importance:
    if criterion in ("nam", "nam_reference"):
        return NAMImportance(model, recipe.prune.normalizer, recipe.prune.fallback)
    if criterion.startswith("bn_slimming"):  # raw |gamma| of the host BNs, ranked globally as in network slimming
        return NAMImportance(model, normalizer="none", fallback="bn")
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    if criterion == "group_sl":
        return _group_norm()
    if criterion == "taylor":  # reads .grad: the arm accumulates the task loss's gradients before the cut
        return tp.importance.GroupTaylorImportance()
    return SeededRandomImportance(seed)


def _trained(training: Training, seed: int, folder: Path, task: Task) -> tuple[nn.Module, ModelRecord, float]:
    """The trained, recalibrated model of one (training, seed), cached in ``folder``, and its score."""
    path = folder / f"trained_{training.name}_seed{seed}.pt"
    seed_everything(seed)
    model, record = task.build(training.gates)
    if path.is_file():
        payload = read_checkpoint(path)
        load_state(model, payload["state_dict"], str(path))
        return model.to(task.device), record, payload.get("score", payload.get("accuracy"))  # older caches: accuracy
    task.reseed(seed)
    after_backward = training.after_backward(model, record, task) if training.after_backward else None
    task.train(
        model, training.sparsity, f"{training.name} seed {seed}", penalised=training.penalised, after_backward=after_backward,
        warm_up=True,
    )
    task.recalibrate(model)
    score = task.score(model)
    save(path, model, record, score=score)
    return model, record, score


def _prune_config(recipe: Recipe, keep: float) -> PruneConfig:
    return replace(recipe.prune, target="macs", macs_keep=keep, steps=1)


def matched_tolerance(recipe: Recipe, task: Task, criteria: list[str], keeps: list[float]) -> float:
    """Before any training: every pruned criterion's model can reach every share in ``keeps`` (a
    one-line error naming the first that cannot), and how far from its budget an arm's MACs may
    land: ``MACS_TOLERANCE`` plus the largest share of the MACs one step of the cut removes on
    this model (``prune.round_to`` channels of one layer at the widest: coarse on a small net)."""
    step = 0.0
    built: dict[str, tuple[nn.Module, ModelRecord]] = {}
    for criterion in (c for c in criteria if c != "dense"):
        training = _training(criterion, recipe)
        if training.name not in built:  # untrained: reachability depends on the architecture only
            model, record = task.build(training.gates)
            built[training.name] = model.eval(), record
        model, record = built[training.name]
        # what the cut can reach does not depend on the scores; taylor's need gradients the untrained model lacks
        ranking = _importance("l1" if criterion == "taylor" else criterion, model, recipe, 0)
        try:
            share = check_macs_keeps(
                model, record.example_input(task.device), _prune_config(recipe, min(keeps)), keeps,
                task.protected(model), ranking, keep_option="--macs-keep",
            )
        except NamPruneError as error:
            raise NamPruneError(f"{criterion} at --macs-keep {min(keeps):g}: {error}") from error
        step = max(step, share)
    if step > MACS_TOLERANCE:
        log.warning(
            "prune.round_to=%d moves this model's MACs in steps of up to %.1f%%: each arm keeps its share of "
            "the MACs to within %.1f%% (lower prune.round_to for a closer match)",
            recipe.prune.round_to, 100 * step, 100 * (MACS_TOLERANCE + step),
        )
    return MACS_TOLERANCE + step


class _Arm(PruneAndFinetune):
    """One arm's stages: its cut checked against its budget, its fine-tuning seeded like every arm's."""

    def __init__(
        self, task: Task, model: nn.Module, record: ModelRecord, seed: int, budget: tuple[float, float, int],
        gradient_batches: int = 0,
    ) -> None:
        example = record.example_input(task.device)
        super().__init__(task, model, record, example, lambda trained, label: {task.score_key: task.score(trained)})
        self.seed = seed
        self.keep, self.tolerance, self.dense_macs = budget
        self.kept = 1.0  # share of the dense MACs kept, measured before the gates are stripped
        self.gradient_batches = gradient_batches  # > 0: the ranking reads the task loss's gradients

    def cut(
        self, config: PruneConfig, between: TrainConfig, importance: tp.importance.Importance | None, strip: bool
    ) -> None:
        """The cut, ranked on the task loss's gradients over ``gradient_batches`` batches when there
        are any; the gradients are cleared once it is done (fine-tuning starts from none)."""
        if self.gradient_batches:
            self.task.accumulate_gradients(self.model, self.gradient_batches)
        try:
            super().cut(config, between, importance, strip)
        finally:
            self.model.zero_grad(set_to_none=True)

    def after_prune(self, pruning: PruneResult) -> None:
        self.kept = count_macs_params(self.model, self.example)[0] / self.dense_macs
        if abs(self.kept - self.keep) > self.tolerance:
            raise NamPruneError(
                f"--macs-keep {self.keep:g}: the cut kept {self.kept:.3f} of the MACs, outside ±{self.tolerance:.3f}"
            )

    def finetune(self, config: TrainConfig, label: str, resume: TrainState | None = None) -> None:
        self.task.reseed(self.seed)  # the same images in the same order for every arm
        super().finetune(config, label, resume)


def _arm(
    criterion: str, keep: float, seed: int, trained: nn.Module, dense_cost: tuple[int, int], record: ModelRecord,
    recipe: Recipe, task: Task, tolerance: float,
) -> dict[str, Any]:
    """Prune a copy of ``trained`` (``dense_cost`` = its MACs, params) to ``keep`` of its MACs
    (not at all for ``dense``), within ``tolerance``, and run the stages after it."""
    key = task.score_key
    gradient_batches = (recipe.recalibrate.batches or TAYLOR_BATCHES) if criterion == "taylor" else 0
    arm = _Arm(task, copy.deepcopy(trained), record, seed, (keep, tolerance, dense_cost[0]), gradient_batches)
    pruned = criterion != "dense"
    importance = _importance(criterion, arm.model, recipe, seed) if pruned else None
    try:
        arm.run(_prune_config(recipe, keep), recipe.finetune, f"finetune {criterion} {keep:g} seed {seed}",
                importance=importance, cut=pruned)
    except NamPruneError as error:
        raise NamPruneError(f"{criterion}: {error}") from error
    macs, params = count_macs_params(arm.model, arm.example) if pruned else dense_cost
    return {
        "criterion": criterion, "macs_keep": keep, "seed": seed,
        "macs": macs, "params": params, "macs_kept": arm.kept,
        **{f"{key}_{stage}": arm.metrics[stage][key] for stage in ("pruned", "recalibrated") if stage in arm.metrics},
        key: arm.metrics["after"][key],
        "latency_ms": cpu_latency_ms(arm.model, arm.example, recipe.report.latency_runs, recipe.report.warmup),
    }


def _upgraded(arm: dict[str, Any]) -> dict[str, Any]:
    """An arm of a ``compare.json`` written before budgets were shares kept (``budget`` removed)."""
    if "budget" not in arm:
        return arm
    arm = {**arm, "macs_keep": round(1 - arm["budget"], 10), "macs_kept": 1 - arm.get("macs_removed", 0.0)}
    del arm["budget"]
    arm.pop("macs_removed", None)
    return arm


def compare(
    recipe: Recipe, criteria: list[str], macs_keep: list[float], seeds: list[int], folder: Path
) -> dict[str, Any]:
    """Run every (criterion, share of the MACs kept, seed) arm not yet in ``folder/compare.json``;
    return the summary. Every budget is checked reachable before anything trains."""
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise NamPruneError(f"unknown criteria {', '.join(unknown)}; choose from {', '.join(CRITERIA)}")
    if not macs_keep or any(not 0 < k < 1 for k in macs_keep):
        raise NamPruneError("--macs-keep values are shares of the MACs to keep, each strictly between 0 and 1")
    keeps = [round(k, 10) for k in macs_keep]  # 1 - 0.7 from --budgets is 0.30000000000000004
    if recipe.export.int8:
        raise NamPruneError("export.int8 is for nam-prune run: compare exports no model; drop it or set export.int8=false")
    task_type = task_class(recipe.model.name)
    needs_gradients = [c for c in criteria if c in GRADIENT_CRITERIA]
    if needs_gradients and not task_type.exposes_gradients:
        raise NamPruneError(
            f"{', '.join(needs_gradients)}: not available for {recipe.model.name}: they need the task loss's gradients, "
            "which only classifiers expose (detectors train through ultralytics' own loop)"
        )
    task = task_type(recipe, resolve_device(recipe.device))
    enable_compile(recipe.nam.compile, task.device)
    tolerance = matched_tolerance(recipe, task, criteria, keeps)
    folder.mkdir(parents=True, exist_ok=True)
    task.open(folder)
    path = folder / "compare.json"
    state = json.loads(path.read_text()) if path.is_file() else {"recipe": recipe.to_dict(), "arms": []}
    changed = changed_keys(state["recipe"], recipe.to_dict())
    if changed:
        raise NamPruneError(f"{path} holds a comparison of another recipe ({changed}); "
                            "use the same overrides, another --output, or delete it")
    state["arms"] = [_upgraded(arm) for arm in state["arms"]]
    state["score_key"], state["macs_tolerance"] = task.score_key, tolerance
    done = {(a["criterion"], a["macs_keep"], a["seed"]) for a in state["arms"]}
    for criterion in criteria:
        for seed in seeds:
            todo = [k for k in ([1.0] if criterion == "dense" else keeps) if (criterion, k, seed) not in done]
            if not todo:
                continue
            trained, record, trained_score = _trained(_training(criterion, recipe), seed, folder, task)
            dense_cost = count_macs_params(trained, record.example_input(task.device))  # once per trained model
            for keep in todo:
                arm = _arm(criterion, keep, seed, trained, dense_cost, record, recipe, task, tolerance)
                arm[f"{task.score_key}_trained"] = trained_score
                state["arms"].append(arm)
                atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)))
                log.info("finished %s at --macs-keep %g, seed %d", criterion, keep, seed)
    state["summary"] = summarize(state["arms"], criteria, keeps, seeds)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)))
    return state


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


SCORES = ("accuracy", "map50_95")
SUMMARY_KEYS = (
    *(f"{score}{stage}" for score in SCORES for stage in ("_trained", "_pruned", "_recalibrated", "")),
    "params", "macs", "latency_ms", "macs_kept",
)


def summarize(arms: list[dict], criteria: list[str], macs_keep: list[float], seeds: list[int]) -> list[dict]:
    """Mean and standard deviation over seeds of every (criterion, share of the MACs kept)."""
    rows = []
    for criterion in criteria:
        for keep in [1.0] if criterion == "dense" else macs_keep:
            runs = [a for a in arms if a["criterion"] == criterion and a["macs_keep"] == keep and a["seed"] in seeds]
            if not runs:
                continue
            row = {"criterion": criterion, "macs_keep": keep, "seeds": len(runs)}
            for key in SUMMARY_KEYS:
                if key in runs[0]:
                    row[key], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
            row.update(_paired_with_nam(arms, runs, keep))
            rows.append(row)
    return rows


def _paired_with_nam(arms: list[dict], runs: list[dict], keep: float) -> dict[str, float]:
    """NAM's final score minus this criterion's, seed by seed at the same share kept, as mean and std
    (``nam_minus``, ``nam_minus_std``): seeds move every arm together, so the paired difference is
    what says whether NAM is ahead. Empty where no seed has both (and for NAM and the uncut model)."""
    if runs[0]["criterion"] in ("nam", "dense"):
        return {}
    key = next(k for k in SCORES if k in runs[0])
    nam = {a["seed"]: a[key] for a in arms if a["criterion"] == "nam" and a["macs_keep"] == keep}
    differences = [nam[r["seed"]] - r[key] for r in runs if r["seed"] in nam]
    if not differences:
        return {}
    mean, std = _mean_std(differences)
    return {"nam_minus": mean, "nam_minus_std": std, "nam_minus_seeds": len(differences)}


def _pct(row: dict, key: str) -> str:
    return f"{100 * row[key]:.2f} ± {100 * row[f'{key}_std']:.2f}" if key in row else "-"


def summary_table(rows: list[dict], key: str = "accuracy", tolerance: float | None = None) -> Table:
    title = "top-1 %" if key == "accuracy" else "mAP50-95 %"
    matched = f"; MACs kept within ±{100 * tolerance:.1f}% of the target" if tolerance is not None else ""
    table = Table(title=f"criteria at matched MACs ({title}, mean ± std over seeds{matched})")
    columns = ("criterion", "MACs kept", "trained", "pruned", "pruned + recal", "fine-tuned", "NAM − this (paired)",
               "params", "MACs", "latency ms")
    for column in columns:
        table.add_column(column, justify="left" if column == "criterion" else "right")
    for r in rows:
        kept = "100% (unpruned)" if r["criterion"] == "dense" else f"{100 * r['macs_kept']:.1f}% (target {100 * r['macs_keep']:g}%)"
        table.add_row(
            r["criterion"],
            kept,
            _pct(r, f"{key}_trained"),
            _pct(r, f"{key}_pruned"),
            _pct(r, f"{key}_recalibrated"),
            _pct(r, key),
            f"{100 * r['nam_minus']:+.2f} ± {100 * r['nam_minus_std']:.2f}" if "nam_minus" in r else "-",
            f"{r['params'] / 1e6:.3f}M",
            f"{r['macs'] / 1e6:.2f}M",
            f"{r['latency_ms']:.2f}",
        )
    return table


def print_summary(state: dict[str, Any]) -> None:
    console.print(summary_table(state["summary"], state.get("score_key", "accuracy"), state.get("macs_tolerance")))
