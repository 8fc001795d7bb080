"""The whole run for an ultralytics detector: the spine's stages with ultralytics' trainer and mAP.

Writes ``model.pt`` (nam-prune's weights-only checkpoint, read by ``nam-prune report``),
``model_ultralytics.pt`` (loads with ``ultralytics.YOLO``), ``dense.pt`` and ``results.json``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from nam_prune import __version__
from nam_prune.checkpoint import ModelRecord, atomic_write, library_versions, save_checkpoint
from nam_prune.console import console
from nam_prune.errors import NamPruneError
from nam_prune.export import ort_latency_ms
from nam_prune.models import ModelSpec
from nam_prune.prune import IntactBlock, Protected, channel_counts
from nam_prune.recipe import Recipe
from nam_prune.pipeline import prune_steps
from nam_prune.report import gflops, layer_changes, layer_table, measure, summary_table
from nam_prune.surgery import insert_nam, strip_gates
from nam_prune.yolo.data import class_names, resolve_data
from nam_prune.yolo.models import (
    build_yolo,
    load_ultralytics_checkpoint,
    marked_yaml,
    protected_parts,
    scope_end,
    scope_prefixes,
)
from nam_prune.yolo.train import train_detector, trainer_overrides, validate_detector

DETECTION_COLUMNS = (
    ("params", "params"),
    ("gflops", "GFLOPs"),
    ("map50_95", "mAP50-95"),
    ("latency_ms", "torch ms (CPU, bs 1)"),
    ("onnx_latency_ms", "onnxruntime ms"),
)


def prepare_detector(recipe: Recipe, names: dict[int, str]) -> tuple[nn.Module, ModelRecord]:
    """Build (yaml) or load (trusted ultralytics .pt) the detector, split-free, with NAM gates in scope."""
    if recipe.nam.spatial:
        raise NamPruneError("nam.spatial is not available for YOLO models (their input size varies); set it to false")
    if recipe.nam.placement != "every_bn":
        raise NamPruneError("YOLO models take nam.placement: every_bn (a gate after every conv-BN-act)")
    name = recipe.model.name
    if name.endswith(".pt"):
        model = load_ultralytics_checkpoint(name, recipe.model.trust_pickle)
        if model.model[-1].nc != len(names):
            raise NamPruneError(
                f"{name} detects {model.model[-1].nc} classes but yolo.data has {len(names)}; use its own data yaml"
            )
        spec = ModelSpec(name=name, num_classes=len(names), in_channels=3, config=copy.deepcopy(model.yaml))
    else:
        spec = ModelSpec(name=name, num_classes=len(names), in_channels=3)
        model = build_yolo(spec.name, spec.num_classes, spec.in_channels)
    nam = replace(recipe.nam, include=scope_prefixes(model, recipe.yolo.scope))
    insert_nam(model, nam)
    model.names = names
    size = recipe.yolo.report_imgsz
    return model, ModelRecord(spec=spec, input_shape=(3, size, size), nam=nam)


def protection(model: nn.Module, scope: str) -> Protected:
    """The Detect head and attention blocks stay intact; layers outside the scope are never roots."""
    head, blocks = protected_parts(model)
    return Protected(layers=[*head, *model.model[scope_end(model, scope):-1]], blocks=blocks)


def _parameter_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in module.parameters()]


def _intact_report(blocks: list[IntactBlock], before: dict[str, list[tuple[int, ...]]]) -> dict[str, str]:
    """Per protected block: 'intact', or 'intact (input width ...)' when its entry conv lost inputs."""
    states = {}
    for block in blocks:
        shapes = _parameter_shapes(block.module)
        if shapes == before[block.name]:
            states[block.name] = "intact"
        elif [s[:1] + s[2:] for s in shapes] == [s[:1] + s[2:] for s in before[block.name]]:
            states[block.name] = "intact (input width follows the layer feeding it)"
        else:
            raise NamPruneError(f"internal: {block.name} changed inside while pruning; please report this")
    return states


def measure_detector(
    model: nn.Module, example: torch.Tensor, recipe: Recipe, data_yaml: Path, device: torch.device
) -> dict[str, Any]:
    """Params, MACs and GFLOPs at the report size, CPU latency (torch, onnxruntime) and mAP."""
    config = recipe.report
    metrics = measure(model, example, config).to_dict()
    del metrics["accuracy"]  # detectors are scored by mAP
    return {
        **metrics,
        "gflops": gflops(metrics["macs"]),
        "imgsz": example.shape[-1],
        "onnx_latency_ms": ort_latency_ms(model, example, config.latency_runs, config.warmup),
        **validate_detector(model, data_yaml, recipe.yolo, device),
    }


def save_ultralytics(path: Path, model: nn.Module, data_yaml: Path, imgsz: int) -> None:
    """An ultralytics checkpoint of the pruned model (a pickle, as all of theirs are).

    ``YOLO(path)`` loads it (nam-prune must be importable: the model holds its gate and
    split-free modules) and predicts, validates and exports with ultralytics' own code.
    """
    deployed = copy.deepcopy(model).cpu().float().eval()
    deployed.args = {"task": "detect", "data": str(data_yaml), "imgsz": imgsz}
    deployed.yaml = marked_yaml(deployed.yaml)
    payload = {
        "model": deployed,
        "ema": None,
        "epoch": -1,
        "optimizer": None,
        "train_args": {"task": "detect", "data": str(data_yaml), "imgsz": imgsz, "model": str(path)},
        "date": datetime.now(timezone.utc).isoformat(),
        "version": __version__,
        "nam_prune": True,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def run_detector(recipe: Recipe, device: torch.device, folder: Path) -> tuple[dict[str, Any], nn.Module]:
    """Sparsity training, pruning, fine-tuning and the report for a YOLO recipe, into ``folder``."""
    started = time.perf_counter()
    data_yaml = resolve_data(recipe.yolo.data, folder)
    names = class_names(data_yaml)
    model, record = prepare_detector(recipe, names)
    model.to(device)
    example = record.example_input(device)
    recipe_dict = asdict(recipe)

    def train(stage: str, config, penalty: float):
        overrides = trainer_overrides(config, recipe.yolo, data_yaml, device, folder, stage, recipe.seed)
        return train_detector(model, overrides, penalty)

    sparsity_log = train("sparsity", recipe.sparsity, recipe.sparsity.penalty)
    before = measure_detector(model, example, recipe, data_yaml, device)
    save_checkpoint(folder / "dense.pt", model, record, recipe=recipe_dict, metrics={"before": before})
    dense_channels = channel_counts(model)

    protected = protection(model, recipe.yolo.scope)
    block_shapes = {b.name: _parameter_shapes(b.module) for b in protected.blocks}
    history, threshold = prune_steps(
        model, example, recipe, before["macs"],
        train_between=lambda config, label: train(label.replace(" ", ""), config, 0.0), protected=protected,
    )
    record = replace(record, history=history)
    if recipe.prune.strip_gates:
        strip_gates(model)
        record = replace(record, stripped=True)
    intact = _intact_report(protected.blocks, block_shapes)
    pruned = measure_detector(model, example, recipe, data_yaml, device)

    finetune_log = train("finetune", recipe.finetune, 0.0)
    after = measure_detector(model, example, recipe, data_yaml, device)
    layers = layer_changes(dense_channels, channel_counts(model))
    stages = {"before": before, "pruned": pruned, "after": after}
    results = {
        **stages,
        "macs_kept": after["macs"] / before["macs"],
        "gflops_reduction": 1 - after["gflops"] / before["gflops"],
        "prune_threshold": threshold,
        "protected": intact,
        "layers": layers,
        "training": {"sparsity": asdict(sparsity_log), "finetune": asdict(finetune_log)},
        "data": str(data_yaml),
        "timings": {"total_s": time.perf_counter() - started},
        "device": str(device),
        "recipe": recipe_dict,
        "versions": library_versions(),
    }
    metrics = {**stages, "prune_threshold": threshold, "protected": intact}
    save_checkpoint(folder / "model.pt", model, record, recipe=recipe_dict, metrics=metrics, layers=layers, names=names)
    save_ultralytics(folder / "model_ultralytics.pt", model, data_yaml, recipe.yolo.imgsz)
    atomic_write(folder / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    console.print(summary_table({"dense": before, "pruned": pruned, "fine-tuned": after}, columns=DETECTION_COLUMNS))
    console.print(layer_table(layers, only_changed=True))
    for block, state in intact.items():
        console.print(f"{block}: {state}", soft_wrap=True)
    console.print(
        f"saved [bold]{folder / 'model.pt'}[/], [bold]{folder / 'model_ultralytics.pt'}[/] and "
        f"[bold]{folder / 'results.json'}[/]",
        soft_wrap=True,
    )
    return results, model
