"""Is NAM's ranking better than the alternatives? Criteria compared at matched MAC budgets.

Each criterion gets the same data, epochs, fine-tune and seeds; only what the first
training penalises and how channels are ranked differ:

* ``nam``: NAM gates, L1 on the NAM gammas, ranked by ``NAMImportance``;
* ``bn_slimming``: no gates, L1 on every BN gamma (network slimming), ranked by |BN gamma|;
* ``l1``: no gates, no penalty, ranked by the L1 norm of each conv filter;
* ``random``: no gates, no penalty, random ranking (seeded).

With ``prune.strip_gates: true`` the NAM arm drops its gates after pruning (gate-then-strip),
so its MACs and latency are those of a plain model like the other arms'.

Budgets are shares of the dense MACs removed; every arm is pruned by bisection to its
budget, so achieved MACs sit just under the target. Each finished arm is written to
``compare.json`` at once, and each criterion's trained dense model is cached, so an
interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from rich.table import Table

from nam_prune.artifact import ModelRecord, load_state, save
from nam_prune.checkpoint import atomic_write, read_checkpoint
from nam_prune.console import console
from nam_prune.data import load_data
from nam_prune.errors import NamPruneError
from nam_prune.measure import cpu_latency_ms
from nam_prune.models import ModelSpec, build_model
from nam_prune.pipeline import resolve_device, seed_everything
from nam_prune.prune import NAMImportance, count_macs_params, prune_model
from nam_prune.recipe import Recipe
from nam_prune.sparsity import batchnorm_scales, gate_scales
from nam_prune.surgery import insert_nam, strip_gates
from nam_prune.train import evaluate, fit

log = logging.getLogger("nam_prune")

CRITERIA = ("nam", "bn_slimming", "l1", "random")
MACS_TOLERANCE = 0.02


class SeededRandomImportance(tp.importance.Importance):
    """Random channel scores from a generator seeded once: the same sequence of groups gets the
    same scores in every run with that seed (a second call on a group draws new numbers)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: tp.Group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


def _importance(criterion: str, model: nn.Module, recipe: Recipe, seed: int) -> tp.importance.Importance:
    if criterion == "nam":
        return NAMImportance(model, recipe.prune.normalizer, recipe.prune.fallback)
    if criterion == "bn_slimming":  # raw |gamma| of the host BNs, ranked globally as in network slimming
        return NAMImportance(model, normalizer="none", fallback="bn")
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    return SeededRandomImportance(seed)


def _same_data_order(data, seed: int) -> None:
    """Every arm trains on the same images in the same order: reseed torch and the loader's shuffle."""
    seed_everything(seed)
    if data.train.generator is not None:
        data.train.generator.manual_seed(seed)


def _dense(criterion: str, recipe: Recipe, seed: int, folder: Path, data, device) -> tuple[nn.Module, ModelRecord]:
    """The trained dense model of one (criterion, seed), cached in ``folder``."""
    spec = ModelSpec(recipe.model.name, data.num_classes, data.input_shape[0], recipe.model.width)
    nam = recipe.nam if criterion == "nam" else None
    record = ModelRecord(spec, data.input_shape, nam)
    path = folder / f"dense_{criterion}_seed{seed}.pt"
    seed_everything(seed)
    model = build_model(spec)
    if nam is not None:
        insert_nam(model, nam, record.example_input())
    if path.is_file():
        load_state(model, read_checkpoint(path)["state_dict"], str(path))
        return model.to(device), record
    sparsity = recipe.sparsity
    if criterion in ("l1", "random"):
        sparsity = replace(sparsity, penalty=0.0)
    penalised = batchnorm_scales if criterion == "bn_slimming" else gate_scales
    _same_data_order(data, seed)
    fit(model, data.train, sparsity, device, f"{criterion} seed {seed}", penalised=penalised)
    save(path, model, record)
    return model, record


def _arm(
    criterion: str, budget: float, seed: int, dense: nn.Module, dense_macs: int, record: ModelRecord,
    recipe: Recipe, data, device,
):
    """Prune a copy of ``dense`` (``dense_macs`` MACs) to remove ``budget`` of its MACs, fine-tune, measure."""
    model = copy.deepcopy(dense)
    example = record.example_input(device)
    config = replace(recipe.prune, target="macs", macs_keep=1 - budget, steps=1)
    prune_model(model, example, config, importance=_importance(criterion, model, recipe, seed))
    macs, params = count_macs_params(model, example)
    removed = 1 - macs / dense_macs
    if abs(removed - budget) > MACS_TOLERANCE:
        raise NamPruneError(f"{criterion} at budget {budget}: removed {removed:.3f} of the MACs, outside ±{MACS_TOLERANCE}")
    if criterion == "nam" and recipe.prune.strip_gates:  # gate-then-strip: fine-tune the plain model
        strip_gates(model)
        macs, params = count_macs_params(model, example)
    pruned_accuracy = evaluate(model, data.test, device, "eval pruned")
    _same_data_order(data, seed)
    fit(model, data.train, recipe.finetune, device, f"finetune {criterion} {budget} seed {seed}")
    return {
        "criterion": criterion, "budget": budget, "seed": seed,
        "macs": macs, "params": params, "macs_removed": removed,
        "accuracy_pruned": pruned_accuracy, "accuracy": evaluate(model, data.test, device, "eval fine-tuned"),
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
    device = resolve_device(recipe.device)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "compare.json"
    state = json.loads(path.read_text()) if path.is_file() else {"recipe": recipe.to_dict(), "arms": []}
    if state["recipe"] != recipe.to_dict():
        raise NamPruneError(f"{path} holds a comparison of another recipe; use another --output or delete it")
    done = {(a["criterion"], a["budget"], a["seed"]) for a in state["arms"]}
    data = load_data(recipe.data, recipe.seed)
    for criterion in criteria:
        for seed in seeds:
            todo = [b for b in budgets if (criterion, b, seed) not in done]
            if not todo:
                continue
            dense, record = _dense(criterion, recipe, seed, folder, data, device)
            dense_macs = count_macs_params(dense, record.example_input(device))[0]
            for budget in todo:
                arm = _arm(criterion, budget, seed, dense, dense_macs, record, recipe, data, device)
                state["arms"].append(arm)
                atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)))
                log.info("finished %s at budget %.2f, seed %d", criterion, budget, seed)
    state["summary"] = summarize(state["arms"], criteria, budgets, seeds)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)))
    return state


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(arms: list[dict], criteria: list[str], budgets: list[float], seeds: list[int]) -> list[dict]:
    rows = []
    for criterion in criteria:
        for budget in budgets:
            runs = [a for a in arms if a["criterion"] == criterion and a["budget"] == budget and a["seed"] in seeds]
            if not runs:
                continue
            row = {"criterion": criterion, "budget": budget, "seeds": len(runs)}
            for key in ("accuracy_pruned", "accuracy", "params", "macs", "latency_ms", "macs_removed"):
                row[key], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
            rows.append(row)
    return rows


def summary_table(rows: list[dict]) -> Table:
    table = Table(title="criteria at matched MACs (mean ± std over seeds)")
    for column in ("criterion", "MACs removed", "top-1 pruned", "top-1 fine-tuned", "params", "MACs", "latency ms"):
        table.add_column(column, justify="left" if column == "criterion" else "right")
    for r in rows:
        table.add_row(
            r["criterion"],
            f"{100 * r['macs_removed']:.1f}% (target {100 * r['budget']:.0f}%)",
            f"{100 * r['accuracy_pruned']:.2f} ± {100 * r['accuracy_pruned_std']:.2f}",
            f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}",
            f"{r['params'] / 1e6:.3f}M",
            f"{r['macs'] / 1e6:.2f}M",
            f"{r['latency_ms']:.2f}",
        )
    return table


def print_summary(state: dict[str, Any]) -> None:
    console.print(summary_table(state["summary"]))
