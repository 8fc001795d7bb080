"""The whole run a recipe describes: data, model + NAM gates, sparsity training, pruning,
fine-tuning and the report, written to a run folder as ``model.pt`` and ``results.json``."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from nam_prune.checkpoint import (
    ModelRecord,
    atomic_write,
    is_nam_checkpoint,
    library_versions,
    load_state,
    read_checkpoint,
    rebuild,
    record_of,
    save_checkpoint,
)
from nam_prune import distributed
from nam_prune.console import console
from nam_prune.data import DataBundle, load_data
from nam_prune.errors import NamPruneError
from nam_prune.gates import use_compiled_gates
from nam_prune.models import ModelSpec, build_model, is_yolo_name
from nam_prune.prune import Protected, channel_counts, channel_step_fraction, prune_model
from nam_prune.recipe import Recipe
from nam_prune.report import layer_changes, measure, print_report
from nam_prune.surgery import insert_nam, strip_gates
from nam_prune.train import TrainConfig, TrainState, evaluate, fit

log = logging.getLogger("nam_prune")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NamPruneError(f"device = {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NamPruneError(f"device = {name!r} but CUDA is not available here; use device: auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_folder(recipe: Recipe, overwrite: bool) -> Path:
    """``runs/<name>`` (or ``output:``); an existing non-empty folder gets a numbered sibling
    (``<name>-2``, like ultralytics) unless ``overwrite`` is set."""
    base = Path(recipe.output or Path("runs") / recipe.name)
    folder, number = base, 1
    while not overwrite and folder.exists() and any(folder.iterdir()):
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NamPruneError(f"cannot create run folder {folder}: {error.strerror}; set output: to a writable path") from None
    if folder != base:
        log.info("%s already holds a run: writing to %s (use --overwrite to replace it)", base, folder)
    return folder


def prepare_model(recipe: Recipe, data: DataBundle) -> tuple[nn.Module, ModelRecord]:
    """Build (or load) the model and insert NAM gates unless the weights already have them."""
    spec = ModelSpec(recipe.model.name, data.num_classes, data.input_shape[0], recipe.model.width)
    record = ModelRecord(spec=spec, input_shape=data.input_shape, nam=recipe.nam)
    weights = recipe.model.weights
    payload = read_checkpoint(weights, recipe.model.trust_pickle) if weights else None
    if payload is not None and is_nam_checkpoint(payload):
        record = record_of(payload)
        if tuple(record.input_shape) != tuple(data.input_shape):
            raise NamPruneError(
                f"model.weights was trained on inputs {tuple(record.input_shape)} but data gives "
                f"{tuple(data.input_shape)}; use the data set it was trained on"
            )
        model = rebuild(record)
        load_state(model, payload["state_dict"], weights)
        if record.nam is None:
            insert_nam(model, recipe.nam, record.example_input())
            record = replace(record, nam=recipe.nam)
        return model, record
    model = build_model(spec)
    if payload is not None:
        if isinstance(payload, nn.Module):  # a whole saved model, allowed by model.trust_pickle
            payload = payload.state_dict()
        state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise NamPruneError(f"model.weights {weights} holds no state dict (a mapping of names to tensors)")
        load_state(model, state, weights)
    insert_nam(model, recipe.nam, record.example_input())
    return model, record


@dataclass
class RunResult:
    folder: Path
    results: dict[str, Any]
    model: nn.Module


LAST = "last.pt"


def _rng_state(data: DataBundle) -> dict[str, torch.Tensor | None]:
    """Random-number states to resume with (under torchrun the sampler is seeded per epoch instead)."""
    generator = data.train.generator
    return {"torch": torch.get_rng_state(), "loader": generator.get_state() if generator is not None else None}


def _restore_rng(data: DataBundle, state: dict[str, torch.Tensor | None]) -> None:
    torch.set_rng_state(state["torch"])
    if data.train.generator is not None and state["loader"] is not None:
        data.train.generator.set_state(state["loader"])


def _resume_point(recipe: Recipe, recipe_dict: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The interrupted run of this recipe: its folder and its ``last.pt`` payload."""
    folder = Path(recipe.output or Path("runs") / recipe.name)
    path = folder / LAST
    if not path.is_file():
        raise NamPruneError(f"nothing to resume: {path} does not exist; run without --resume to start")
    payload = read_checkpoint(path)
    if payload.get("recipe") != recipe_dict:
        raise NamPruneError(
            f"{path} was written by a different recipe; resume with the same recipe file and overrides"
        )
    return folder, payload


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Run the pipeline end to end and return the run folder, results and pruned model.

    After every complete training epoch the run is checkpointed to ``<folder>/last.pt``
    (atomically); ``resume=True`` continues from it and ends where an uninterrupted run
    with the same seed would. Under torchrun every rank runs this; only rank 0 writes.
    """
    device = resolve_device(recipe.device)
    if is_yolo_name(recipe.model.name):
        return _run_detector(recipe, device, overwrite, resume)
    distributed.init_from_env(device)
    try:
        return _run(recipe, distributed.local_device(device), overwrite, resume)
    finally:
        distributed.shutdown()


def _run_detector(recipe: Recipe, device: torch.device, overwrite: bool, resume: bool) -> RunResult:
    """YOLO recipes train through ultralytics' trainer (which keeps its own last.pt per stage)."""
    if resume:
        raise NamPruneError(
            "--resume is not available for YOLO runs; each stage's ultralytics weights are in <run>/<stage>/weights"
        )
    if distributed.world_size() > 1:
        raise NamPruneError("YOLO runs take one process (--nproc 1); ultralytics picks the GPU from device:")
    from nam_prune.yolo.pipeline import run_detector

    seed_everything(recipe.seed)
    folder = run_folder(recipe, overwrite)
    results, model = run_detector(recipe, device, folder)
    return RunResult(folder, results, model)


def _run(recipe: Recipe, device: torch.device, overwrite: bool, resume: bool) -> RunResult:
    started = time.perf_counter()
    main = distributed.is_main()
    if not main:
        log.setLevel(logging.WARNING)
    seed_everything(recipe.seed)
    use_compiled_gates(recipe.nam.compile)
    data = load_data(recipe.data, recipe.seed)
    recipe_dict = asdict(recipe)
    if resume:
        folder, payload = _resume_point(recipe, recipe_dict)
        record = record_of(payload)
        model = rebuild(record)
        load_state(model, payload["state_dict"], str(folder / LAST))
        progress = payload["progress"]
        _restore_rng(data, progress["rng"])
        log.info("resuming %s at %s epoch %d", folder, progress["stage"], progress["epoch"])
    else:
        model, record = prepare_model(recipe, data)
        # only once the inputs are known to be good; rank 0 picks it for everyone
        folder = distributed.broadcast_object(run_folder(recipe, overwrite) if main else None)
        progress = {"stage": "sparsity", "epoch": 0, "train_state": None, "results": {}, "timings": {}}
    log.info("run folder %s, device %s, %d process(es)", folder, device, distributed.world_size())
    model.to(device)
    example = record.example_input(device)
    results, timings = progress["results"], progress["timings"]

    def checkpoint(stage: str, state: TrainState | None) -> None:
        progress.update(
            stage=stage,
            epoch=state.epoch if state else 0,
            train_state=state.to_dict() if state else None,
            rng=_rng_state(data),
        )
        if main:
            save_checkpoint(folder / LAST, model, record, recipe=recipe_dict, progress=progress)

    def resumed(stage: str) -> TrainState | None:
        state = progress["train_state"] if progress["stage"] == stage else None
        return TrainState.from_dict(state) if state else None

    try:
        if progress["stage"] == "sparsity":
            tick = time.perf_counter()
            sparsity_log = fit(
                model, data.train, recipe.sparsity, device, "sparsity",
                on_epoch_end=lambda state: checkpoint("sparsity", state), resume=resumed("sparsity"),
            )
            timings["sparsity_s"] = time.perf_counter() - tick
            distributed.check_replicas_identical(model, "sparsity training")
            before = measure(model, example, recipe.report, evaluate(model, data.test, device, "eval dense"))
            if main:
                save_checkpoint(folder / "dense.pt", model, record, recipe=recipe_dict, metrics={"before": before.to_dict()})
            results["before"] = before.to_dict()
            results["dense_channels"] = channel_counts(model)
            results["sparsity_log"] = [asdict(e) for e in sparsity_log]

            tick = time.perf_counter()
            history, threshold = prune_steps(
                model, example, recipe, before.macs,
                train_between=lambda config, label: fit(model, data.train, config, device, label),
            )
            record = replace(record, history=record.history + history)
            results["prune_threshold"] = threshold
            if main:  # let `report dense.pt --plots` mark where the cut fell
                dense_payload = read_checkpoint(folder / "dense.pt")
                dense_payload["metrics"]["prune_threshold"] = threshold
                atomic_write(folder / "dense.pt", lambda tmp: torch.save(dense_payload, tmp))
            if recipe.prune.strip_gates:
                strip_gates(model)
                record = replace(record, stripped=True)
            timings["prune_s"] = time.perf_counter() - tick
            distributed.check_replicas_identical(model, "pruning")  # every rank pruned the same channels
            pruned = measure(model, example, recipe.report, evaluate(model, data.test, device, "eval pruned"))
            results["pruned"] = pruned.to_dict()
            checkpoint("finetune", None)

        tick = time.perf_counter()
        finetune_log = fit(
            model, data.train, recipe.finetune, device, "finetune",
            on_epoch_end=lambda state: checkpoint("finetune", state), resume=resumed("finetune"),
        )
        timings["finetune_s"] = timings.get("finetune_s", 0.0) + time.perf_counter() - tick
    except KeyboardInterrupt:
        if main and (folder / LAST).is_file():
            log.warning("interrupted: the last complete epoch is in %s; rerun the same command with --resume", folder / LAST)
        raise
    after = measure(model, example, recipe.report, evaluate(model, data.test, device, "eval fine-tuned"))
    layers = layer_changes(results["dense_channels"], channel_counts(model))
    timings["total_s"] = timings.get("total_s", 0.0) + time.perf_counter() - started

    stages = {"before": results["before"], "pruned": results["pruned"], "after": after.to_dict()}
    threshold = results["prune_threshold"]
    final = {
        **stages,
        "macs_kept": after.macs / stages["before"]["macs"],
        "prune_threshold": threshold,
        "layers": layers,
        "training": {"sparsity": results["sparsity_log"], "finetune": [asdict(e) for e in finetune_log]},
        "timings": timings,
        "device": str(device),
        "processes": distributed.world_size(),
        "recipe": recipe_dict,
        "versions": library_versions(),
    }
    distributed.check_replicas_identical(model, "fine-tuning")
    if main:
        metrics = {**stages, "prune_threshold": threshold}
        save_checkpoint(folder / "model.pt", model, record, recipe=recipe_dict, metrics=metrics, layers=layers)
        atomic_write(folder / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(final, indent=2)))
        (folder / LAST).unlink(missing_ok=True)  # the run is complete: model.pt supersedes it
        print_report({"dense": stages["before"], "pruned": stages["pruned"], "fine-tuned": stages["after"]}, layers)
        console.print(f"saved [bold]{folder / 'model.pt'}[/] and [bold]{folder / 'results.json'}[/]", soft_wrap=True)
    distributed.barrier()
    return RunResult(folder, final, model)


def prune_steps(
    model: nn.Module,
    example: torch.Tensor,
    recipe: Recipe,
    dense_macs: int,
    train_between: Callable[[TrainConfig, str], Any],
    protected: Protected | None = None,
) -> tuple[list, float]:
    """One-shot or iterative pruning to the recipe's target; returns the history and the last cut's threshold.

    ``train_between(config, label)`` fine-tunes between steps (the classifier loop or ultralytics' trainer).
    """
    config = recipe.prune
    initial_channels: dict[str, int] = {}
    history = []
    for step in range(1, config.steps + 1):
        if config.target == "macs":
            target = dense_macs * (1 - (1 - config.macs_keep) * step / config.steps)
            result = prune_model(
                model, example, config, target_macs=target, initial_channels=initial_channels, protected=protected
            )
        else:
            fraction = channel_step_fraction(config.channel_ratio, step, config.steps)
            result = prune_model(
                model, example, config, channel_fraction=fraction, initial_channels=initial_channels, protected=protected
            )
        history += result.history
        if step < config.steps and config.epochs_between_steps:
            train_between(replace(recipe.finetune, epochs=config.epochs_between_steps), f"step {step}")
    return history, result.threshold
