"""The whole run a recipe describes: data, model + NAM gates, sparsity training, pruning,
fine-tuning and the report, written to a run folder as ``model.pt`` and ``results.json``."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

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
from nam_prune.console import console
from nam_prune.data import DataBundle, load_data
from nam_prune.errors import NamPruneError
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import channel_counts, prune_model
from nam_prune.recipe import Recipe
from nam_prune.report import layer_changes, measure, print_report
from nam_prune.surgery import insert_nam
from nam_prune.train import evaluate, fit

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
    payload = read_checkpoint(recipe.model.weights) if recipe.model.weights else None
    if payload is not None and is_nam_checkpoint(payload):
        record = record_of(payload)
        if tuple(record.input_shape) != tuple(data.input_shape):
            raise NamPruneError(
                f"model.weights was trained on inputs {tuple(record.input_shape)} but data gives "
                f"{tuple(data.input_shape)}; use the data set it was trained on"
            )
        model = rebuild(record)
        load_state(model, payload["state_dict"], recipe.model.weights)
        if record.nam is None:
            insert_nam(model, recipe.nam, record.example_input())
            record = replace(record, nam=recipe.nam)
        return model, record
    model = build_model(spec)
    if payload is not None:
        state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
        if not isinstance(state, dict):
            raise NamPruneError(f"model.weights {recipe.model.weights} holds no state dict")
        load_state(model, state, recipe.model.weights)
    insert_nam(model, recipe.nam, record.example_input())
    return model, record


def _channel_step_fraction(total_ratio: float, step: int, steps: int) -> float:
    """Share of the *current* channels to cut at ``step`` so ``total_ratio`` is gone after ``steps``."""
    keep_now = 1 - total_ratio * (step - 1) / steps
    keep_next = 1 - total_ratio * step / steps
    return 1 - keep_next / keep_now


@dataclass
class RunResult:
    folder: Path
    results: dict[str, Any]
    model: nn.Module


def run(recipe: Recipe, overwrite: bool = False) -> RunResult:
    """Run the pipeline end to end and return the run folder, results and pruned model."""
    started = time.perf_counter()
    seed_everything(recipe.seed)
    device = resolve_device(recipe.device)
    data = load_data(recipe.data, recipe.seed)
    model, record = prepare_model(recipe, data)
    folder = run_folder(recipe, overwrite)  # only once the inputs are known to be good
    log.info("run folder %s, device %s", folder, device)
    model.to(device)
    example = record.example_input(device)
    recipe_dict = asdict(recipe)
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    sparsity_log = fit(model, data.train, recipe.sparsity, device, "sparsity")
    timings["sparsity_s"] = time.perf_counter() - tick
    before = measure(model, example, recipe.report, evaluate(model, data.test, device, "eval dense"))
    dense_channels = channel_counts(model)
    save_checkpoint(folder / "dense.pt", model, record, recipe=recipe_dict, metrics={"before": before.to_dict()})

    tick = time.perf_counter()
    initial_channels: dict[str, int] = {}
    history = list(record.history)
    prune_cfg = recipe.prune
    for step in range(1, prune_cfg.steps + 1):
        if prune_cfg.target == "macs":
            target = before.macs * (1 - (1 - prune_cfg.macs_keep) * step / prune_cfg.steps)
            result = prune_model(model, example, prune_cfg, target_macs=target, initial_channels=initial_channels)
        else:
            fraction = _channel_step_fraction(prune_cfg.channel_ratio, step, prune_cfg.steps)
            result = prune_model(model, example, prune_cfg, channel_fraction=fraction, initial_channels=initial_channels)
        history += result.history
        if step < prune_cfg.steps and prune_cfg.epochs_between_steps:
            fit(model, data.train, replace(recipe.finetune, epochs=prune_cfg.epochs_between_steps), device, f"step {step}")
    record = replace(record, history=history)
    timings["prune_s"] = time.perf_counter() - tick
    pruned = measure(model, example, recipe.report, evaluate(model, data.test, device, "eval pruned"))

    tick = time.perf_counter()
    finetune_log = fit(model, data.train, recipe.finetune, device, "finetune")
    timings["finetune_s"] = time.perf_counter() - tick
    after = measure(model, example, recipe.report, evaluate(model, data.test, device, "eval fine-tuned"))
    layers = layer_changes(dense_channels, channel_counts(model))
    timings["total_s"] = time.perf_counter() - started

    stages = {"before": before.to_dict(), "pruned": pruned.to_dict(), "after": after.to_dict()}
    results = {
        **stages,
        "macs_kept": after.macs / before.macs,
        "layers": layers,
        "training": {
            "sparsity": [asdict(e) for e in sparsity_log],
            "finetune": [asdict(e) for e in finetune_log],
        },
        "timings": timings,
        "device": str(device),
        "recipe": recipe_dict,
        "versions": library_versions(),
    }
    save_checkpoint(folder / "model.pt", model, record, recipe=recipe_dict, metrics=stages, layers=layers)
    atomic_write(folder / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    print_report({"dense": stages["before"], "pruned": stages["pruned"], "fine-tuned": stages["after"]}, layers)
    console.print(f"saved [bold]{folder / 'model.pt'}[/] and [bold]{folder / 'results.json'}[/]")
    return RunResult(folder, results, model)
