"""Is NAM's ranking better than the alternatives? Criteria compared at matched MAC budgets.

Any model family works through its ``Task``: classifiers are scored by top-1 (``accuracy``),
detectors by mAP50-95 (``map50_95``); every score key below carries that name.

Each criterion gets the same data, epochs, fine-tune and seeds; only the gates, what the
first training penalises and how channels are ranked differ:

* ``nam``: the recipe's NAM gates and sparsity training (default: closing gates, polarization),
  ranked by ``NAMImportance``;
* ``nam_reference``: the paper's gate and penalty (``sigmoid(w * BN(x)) * x``, L1, p = 1e-4);
* ``bn_slimming``: no gates, L1 on every BN gamma at the recipe's p (network slimming), ranked
  by |BN gamma|; ``bn_slimming_polarized``: the same with the polarization penalty;
* ``l1``: no gates, no penalty, ranked by the L1 norm of each conv filter;
* ``random``: no gates, no penalty, random ranking (seeded);
* ``dense``: no gates, no penalty, no pruning: the same two training stages, the ceiling every
  row is read against.

Every pruned model's BN statistics are recalibrated (``recalibrate.batches``) before it is
evaluated and again after fine-tuning, the same way for every arm. Budgets are shares of the
dense MACs removed; every arm is pruned by bisection to its budget, so achieved MACs sit just
under the target. Each finished arm is written to ``compare.json`` at once, and each trained
model is cached, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
from nam_prune.prune import NAMImportance, count_macs_params, prune_model
from nam_prune.recipe import Recipe
from nam_prune.sparsity import Scales, batchnorm_scales, gate_scales
from nam_prune.surgery import NAMConfig, strip_gates
from nam_prune.tasks import Task, task_class
from nam_prune.train import TrainConfig, enable_compile

log = logging.getLogger("nam_prune")

MACS_TOLERANCE = 0.02
REFERENCE_PENALTY = 1e-4  # the NAM paper's p


@dataclass(frozen=True)
class Training:
    """How an arm's model is built and trained before pruning (arms with equal trainings share one model)."""

    name: str
    gates: NAMConfig | None
    sparsity: TrainConfig
    penalised: Scales = gate_scales


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
    return Training("plain", None, replace(sparsity, penalty=0.0))


CRITERIA = ("nam", "nam_reference", "bn_slimming", "bn_slimming_polarized", "l1", "random", "dense")


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
    task.train(model, training.sparsity, f"{training.name} seed {seed}", penalised=training.penalised)
    task.recalibrate(model)
    score = task.score(model)
    save(path, model, record, score=score)
    return model, record, score


def _arm(
    criterion: str, budget: float, seed: int, trained: nn.Module, dense_cost: tuple[int, int], record: ModelRecord,
    recipe: Recipe, task: Task,
) -> dict[str, Any]:
    """Prune a copy of ``trained`` (``dense_cost`` = its MACs, params) to remove ``budget`` of its
    MACs (none for ``dense``), recalibrate, fine-tune, recalibrate, measure."""
    key = task.score_key
    model = copy.deepcopy(trained)
    example = record.example_input(task.device)
    macs, params = dense_cost
    removed = 0.0
    scores: dict[str, float] = {}
    if criterion != "dense":
        config = replace(recipe.prune, target="macs", macs_keep=1 - budget, steps=1)
        importance = _importance(criterion, model, recipe, seed)
        prune_model(model, example, config, importance=importance, protected=task.protected(model))
        macs, params = count_macs_params(model, example)
        removed = 1 - macs / dense_cost[0]
        if abs(removed - budget) > MACS_TOLERANCE:
            raise NamPruneError(f"{criterion} at budget {budget}: removed {removed:.3f} of the MACs, outside ±{MACS_TOLERANCE}")
        if record.nam is not None and recipe.prune.strip_gates:  # gate-then-strip: fine-tune the plain model
            strip_gates(model)
            macs, params = count_macs_params(model, example)
        scores[f"{key}_pruned"] = task.score(model)
        task.recalibrate(model)
        scores[f"{key}_recalibrated"] = task.score(model)
    task.reseed(seed)
    task.train(model, recipe.finetune, f"finetune {criterion} {budget} seed {seed}")
    task.recalibrate(model)
    return {
        "criterion": criterion, "budget": budget, "seed": seed,
        "macs": macs, "params": params, "macs_removed": removed,
        **scores,
        key: task.score(model),
        "latency_ms": cpu_latency_ms(model, example, recipe.report.latency_runs, recipe.report.warmup),
    }


def compare(
    recipe: Recipe, criteria: list[str], budgets: list[float], seeds: list[int], folder: Path
) -> dict[str, Any]:
    """Run every (criterion, budget, seed) arm not yet in ``folder/compare.json``; return the summary."""
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise NamPruneError(f"unknown criteria {', '.join(unknown)}; choose from {', '.join(CRITERIA)}")
    if not budgets or any(not 0 < b < 1 for b in budgets):
        raise NamPruneError("--budgets are shares of MACs to remove, each strictly between 0 and 1")
    task = task_class(recipe.model.name)(recipe, resolve_device(recipe.device))
    enable_compile(recipe.nam.compile, task.device)
    folder.mkdir(parents=True, exist_ok=True)
    task.open(folder)
    path = folder / "compare.json"
    state = json.loads(path.read_text()) if path.is_file() else {"recipe": recipe.to_dict(), "arms": []}
    if state["recipe"] != recipe.to_dict():
        raise NamPruneError(f"{path} holds a comparison of another recipe; use another --output or delete it")
    state["score_key"] = task.score_key
    done = {(a["criterion"], a["budget"], a["seed"]) for a in state["arms"]}
    for criterion in criteria:
        for seed in seeds:
            todo = [b for b in ([0.0] if criterion == "dense" else budgets) if (criterion, b, seed) not in done]
            if not todo:
                continue
            trained, record, trained_score = _trained(_training(criterion, recipe), seed, folder, task)
            dense_cost = count_macs_params(trained, record.example_input(task.device))  # once per trained model
            for budget in todo:
                arm = _arm(criterion, budget, seed, trained, dense_cost, record, recipe, task)
                arm[f"{task.score_key}_trained"] = trained_score
                state["arms"].append(arm)
                atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)))
                log.info("finished %s at budget %.2f, seed %d", criterion, budget, seed)
    state["summary"] = summarize(state["arms"], criteria, budgets, seeds)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)))
    return state


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


SCORES = ("accuracy", "map50_95")
SUMMARY_KEYS = (
    *(f"{score}{stage}" for score in SCORES for stage in ("_trained", "_pruned", "_recalibrated", "")),
    "params", "macs", "latency_ms", "macs_removed",
)


def summarize(arms: list[dict], criteria: list[str], budgets: list[float], seeds: list[int]) -> list[dict]:
    """Mean and standard deviation over seeds of every (criterion, budget)."""
    rows = []
    for criterion in criteria:
        for budget in [0.0] if criterion == "dense" else budgets:
            runs = [a for a in arms if a["criterion"] == criterion and a["budget"] == budget and a["seed"] in seeds]
            if not runs:
                continue
            row = {"criterion": criterion, "budget": budget, "seeds": len(runs)}
            for key in SUMMARY_KEYS:
                if key in runs[0]:
                    row[key], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
            rows.append(row)
    return rows


def _pct(row: dict, key: str) -> str:
    return f"{100 * row[key]:.2f} ± {100 * row[f'{key}_std']:.2f}" if key in row else "-"


def summary_table(rows: list[dict], key: str = "accuracy") -> Table:
    title = "top-1 %" if key == "accuracy" else "mAP50-95 %"
    table = Table(title=f"criteria at matched MACs ({title}, mean ± std over seeds)")
    columns = ("criterion", "MACs removed", "trained", "pruned", "pruned + recal", "fine-tuned", "params", "MACs", "latency ms")
    for column in columns:
        table.add_column(column, justify="left" if column == "criterion" else "right")
    for r in rows:
        table.add_row(
            r["criterion"],
            f"{100 * r['macs_removed']:.1f}% (target {100 * r['budget']:.0f}%)",
            _pct(r, f"{key}_trained"),
            _pct(r, f"{key}_pruned"),
            _pct(r, f"{key}_recalibrated"),
            _pct(r, key),
            f"{r['params'] / 1e6:.3f}M",
            f"{r['macs'] / 1e6:.2f}M",
            f"{r['latency_ms']:.2f}",
        )
    return table


def print_summary(state: dict[str, Any]) -> None:
    console.print(summary_table(state["summary"], state.get("score_key", "accuracy")))
