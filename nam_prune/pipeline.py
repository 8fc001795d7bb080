"""The whole run a recipe describes, once for every model family:

build (+ NAM gates) -> sparsity training -> measure -> prune (in steps) -> fine-tune ->
save and report, into a run folder as ``dense.pt``, ``model.pt`` and ``results.json``.
The family's :class:`~nam_prune.tasks.Task` supplies what differs (data, training loop,
score, protected parts, extra outputs).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from nam_prune import distributed, gate_kernel
from nam_prune.artifact import load_state, rebuild, record_of, save
from nam_prune.checkpoint import atomic_write, library_versions, read_checkpoint
from nam_prune.console import console
from nam_prune.errors import NamPruneError
from nam_prune.prune import channel_counts, check_prunable, prune_model
from nam_prune.recipe import Recipe
from nam_prune.report import layer_changes, layer_table, summary_table
from nam_prune.surgery import strip_gates
from nam_prune.tasks import Task, task_class
from nam_prune.train import TrainConfig, TrainState, enable_compile

log = logging.getLogger("nam_prune")

LAST = "last.pt"
STAGE_LABELS = {
    "before": "dense (sparsity-trained)",
    "pruned": "pruned",
    "recalibrated": "pruned + BN recalibrated",
    "after": "fine-tuned",
    "baseline": "dense, trained as long",
}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows: noise next to this one
        raise NamPruneError(f"device = {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NamPruneError(f"device = {name!r} but CUDA is not available here; use device: auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _base_folder(recipe: Recipe) -> Path:
    return Path(recipe.output or Path("runs") / recipe.name)


def run_folder(recipe: Recipe, overwrite: bool) -> Path:
    """``runs/<name>`` (or ``output:``); an existing non-empty folder gets a numbered sibling
    (``<name>-2``, like ultralytics) unless ``overwrite`` is set."""
    base = _base_folder(recipe)
    folder, number = base, 1
    while not overwrite and folder.is_dir() and any(folder.iterdir()):
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NamPruneError(f"cannot create run folder {folder}: {error.strerror}; set output: to a writable path") from error
    if folder != base:
        log.info("%s already holds a run: writing to %s (use --overwrite to replace it)", base, folder)
    return folder


def _numbered_runs(base: Path) -> list[Path]:
    """``base`` and its numbered siblings (``base-2``, ``base-3`` ...), oldest first."""
    pattern = re.compile(rf"{re.escape(base.name)}-(\d+)")
    numbered = [
        (int(match.group(1)), path)
        for path in (base.parent.iterdir() if base.parent.is_dir() else [])
        if (match := pattern.fullmatch(path.name))
    ]
    return [base, *(path for _, path in sorted(numbered))]


def _resume_point(recipe: Recipe, recipe_dict: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The latest interrupted run of this recipe and output: its folder and its ``last.pt`` payload."""
    base = _base_folder(recipe)
    interrupted = [folder for folder in _numbered_runs(base) if (folder / LAST).is_file()]
    if not interrupted:
        raise NamPruneError(
            f"nothing to resume: no {LAST} in {base} or its numbered siblings; run without --resume to start"
        )
    path = interrupted[-1] / LAST
    payload = read_checkpoint(path)
    if payload.get("recipe") != recipe_dict:
        raise NamPruneError(
            f"{path} was written by a different recipe; resume with the same recipe file and overrides"
        )
    return interrupted[-1], payload


@dataclass
class RunResult:
    folder: Path
    results: dict[str, Any]
    model: nn.Module


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Run the pipeline end to end and return the run folder, results and pruned model.

    After every complete training epoch the run is checkpointed to ``<folder>/last.pt``
    (atomically); ``resume=True`` continues the latest interrupted run of this recipe and
    ends where an uninterrupted run with the same seed would. Under torchrun every rank
    runs this; only rank 0 writes.
    """
    device = resolve_device(recipe.device)
    cls = task_class(recipe.model.name)
    if resume and not cls.resumable:
        raise NamPruneError(f"--resume is not available for {recipe.model.name}: start the run again")
    distributed.init_from_env(device)
    try:
        if distributed.world_size() > 1 and not cls.multi_process:
            raise NamPruneError(f"{recipe.model.name} runs in one process (--nproc 1); device: picks the GPU")
        seed_everything(recipe.seed)
        return _run(recipe, cls(recipe, distributed.local_device(device)), overwrite, resume)
    finally:
        distributed.shutdown()


def _run(recipe: Recipe, task: Task, overwrite: bool, resume: bool) -> RunResult:
    started = time.perf_counter()
    main = distributed.is_main()
    if not main:
        log.setLevel(logging.WARNING)
    enable_compile(recipe.nam.compile, task.device)
    recipe_dict = recipe.to_dict()
    if resume:
        folder, payload = _resume_point(recipe, recipe_dict)
        record = record_of(payload)
        model = rebuild(record)
        load_state(model, payload["state_dict"], str(folder / LAST))
        progress = payload["progress"]
        task.restore_rng(progress["rng"])
        log.info("resuming %s at %s epoch %d", folder, progress["stage"], progress["epoch"])
    else:
        model, record = task.prepare()
        trial = copy.deepcopy(model).eval()  # a prune setting that cannot work fails now, not after training
        check_prunable(trial, record.example_input(), recipe.prune, task.protected(trial))
        # only once the inputs are known to be good; rank 0 picks it for everyone
        folder = distributed.broadcast_object(run_folder(recipe, overwrite) if main else None)
        progress = {"stage": "sparsity", "epoch": 0, "train_state": None, "results": {}, "timings": {}}
    task.open(folder)
    device = task.device
    log.info("run folder %s, device %s, %d process(es)", folder, device, distributed.world_size())
    if device.type == "cpu" and not recipe.nam.compile:
        log.info("NAM gates train on %s", gate_kernel.status())
    model.to(device)
    example = record.example_input(device)
    results, timings = progress["results"], progress["timings"]

    def checkpoint(stage: str, state: TrainState | None) -> None:
        if not task.resumable:
            return
        progress.update(
            stage=stage,
            epoch=state.epoch if state else 0,
            train_state=state.to_dict() if state else None,
            rng=task.rng_state(),
        )
        if main:
            save(folder / LAST, model, record, recipe=recipe_dict, progress=progress)

    def resumed(stage: str) -> TrainState | None:
        state = progress["train_state"] if progress["stage"] == stage else None
        return TrainState.from_dict(state) if state else None

    def train_stage(config: TrainConfig, stage: str, trained: nn.Module = model, **checkpointing: Any) -> list[dict[str, Any]]:
        """A training stage, ending with recalibrated BN statistics (before anything evaluates or saves it)."""
        history = task.train(trained, config, stage, **checkpointing)
        if config.epochs:
            task.recalibrate(trained)
        return history

    try:
        if progress["stage"] == "sparsity":
            tick = time.perf_counter()
            results["sparsity_log"] = train_stage(
                recipe.sparsity, "sparsity",
                on_epoch_end=lambda state: checkpoint("sparsity", state), resume=resumed("sparsity"),
            )
            timings["sparsity_s"] = time.perf_counter() - tick
            distributed.check_replicas_identical(model, "sparsity training")
            results["before"] = task.measure(model, example, "dense")
            results["dense_channels"] = channel_counts(model)
            dense_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

            tick = time.perf_counter()
            between = replace(recipe.finetune, epochs=recipe.prune.epochs_between_steps)

            def train_between(step: int) -> None:
                task.recalibrate(model)
                train_stage(between, f"step {step}")

            pruning = prune_model(
                model, example, recipe.prune, protected=task.protected(model), train_between=train_between
            )
            results["prune_threshold"] = pruning.threshold
            if main:  # written now, with the threshold, so `report dense.pt --plots` marks where the cut fell
                metrics = {"before": results["before"], "prune_threshold": pruning.threshold}
                save(folder / "dense.pt", model, record, state_dict=dense_state, recipe=recipe_dict, metrics=metrics)
            record = replace(record, history=record.history + pruning.history)
            if recipe.prune.strip_gates:
                strip_gates(model)
                record = replace(record, stripped=True)
            timings["prune_s"] = time.perf_counter() - tick
            distributed.check_replicas_identical(model, "pruning")  # every rank pruned the same channels
            results["pruned"] = task.measure(model, example, "pruned")
            if task.recalibrate(model):
                results["recalibrated"] = task.measure(model, example, "recalibrated")
            checkpoint("finetune", None)

        tick = time.perf_counter()
        finetune_log = train_stage(
            recipe.finetune, "finetune",
            on_epoch_end=lambda state: checkpoint("finetune", state), resume=resumed("finetune"),
        )
        timings["finetune_s"] = timings.get("finetune_s", 0.0) + time.perf_counter() - tick
    except KeyboardInterrupt:
        if main and (folder / LAST).is_file():
            log.warning("interrupted: the last complete epoch is in %s; rerun the same command with --resume", folder / LAST)
        raise
    after = task.measure(model, example, "fine-tuned")
    layers = layer_changes(results["dense_channels"], channel_counts(model))
    distributed.check_replicas_identical(model, "fine-tuning")
    stages = {
        stage: metrics
        for stage, metrics in (
            ("before", results["before"]),
            ("pruned", results["pruned"]),
            ("recalibrated", results.get("recalibrated")),
            ("after", after),
        )
        if metrics is not None
    }
    if recipe.report.baseline and recipe.finetune.epochs:
        tick = time.perf_counter()
        distributed.barrier()  # rank 0 wrote dense.pt
        dense_payload = read_checkpoint(folder / "dense.pt")
        baseline = rebuild(record_of(dense_payload))
        load_state(baseline, dense_payload["state_dict"], str(folder / "dense.pt"))
        baseline.to(device)
        train_stage(recipe.finetune, "baseline (dense, trained as long)", trained=baseline)
        stages["baseline"] = task.measure(baseline, example, "baseline")
        timings["baseline_s"] = time.perf_counter() - tick
    final = {
        **stages,
        "macs_kept": after["macs"] / stages["before"]["macs"],
        "prune_threshold": results["prune_threshold"],
        "layers": layers,
        "training": {"sparsity": results["sparsity_log"], "finetune": finetune_log},
        "timings": timings,
        "device": str(device),
        "processes": distributed.world_size(),
        "recipe": recipe_dict,
        "versions": library_versions(),
    }
    if main:
        final.update(task.outputs(folder, model, record, stages))
        metrics = {**stages, "prune_threshold": results["prune_threshold"]}
        save(
            folder / "model.pt", model, record,
            recipe=recipe_dict, metrics=metrics, layers=layers, **task.checkpoint_fields(),
        )
        timings["total_s"] = timings.get("total_s", 0.0) + time.perf_counter() - started
        atomic_write(folder / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(final, indent=2)))
        (folder / LAST).unlink(missing_ok=True)  # the run is complete: model.pt supersedes it
        console.print(summary_table({STAGE_LABELS[k]: v for k, v in stages.items()}, columns=task.columns))
        if "baseline" in stages:
            drop = 100 * (stages["after"][task.score_key] - stages["baseline"][task.score_key])
            console.print(f"fine-tuned vs dense trained as long: {drop:+.2f} pt {task.score_key}")
        console.print(layer_table(layers, only_changed=True))
        console.print(f"saved [bold]{folder / 'model.pt'}[/] and [bold]{folder / 'results.json'}[/]", soft_wrap=True)
    distributed.barrier()
    return RunResult(folder, final, model)


__all__ = ["RunResult", "run", "resolve_device", "seed_everything"]
