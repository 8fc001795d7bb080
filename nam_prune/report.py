"""Stage 6b: what a model costs and how well it does: params, MACs, accuracy, latency, per layer."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.table import Table

from nam_prune.config import bounded
from nam_prune.console import console
from nam_prune.errors import NamPruneError
from nam_prune.models import is_yolo_name
from nam_prune.prune import count_macs_params


@dataclass
class ReportConfig:
    """Latency is the median of ``latency_runs`` CPU forward passes at batch 1, after ``warmup``."""

    latency_runs: int = bounded(30, low=1)
    warmup: int = bounded(5, low=0)


@dataclass
class Metrics:
    params: int
    macs: int
    accuracy: float | None
    latency_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, example_input: torch.Tensor, runs: int, warmup: int) -> float:
    """Median wall time of one forward pass on ``example_input`` on the CPU, in milliseconds."""
    model = copy.deepcopy(model).cpu().eval()
    x = example_input.cpu()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def gflops(macs: int) -> float:
    """GFLOPs as ultralytics reports them: two floating-point operations per multiply-accumulate."""
    return 2 * macs / 1e9


def measure(
    model: nn.Module, example_input: torch.Tensor, config: ReportConfig, accuracy: float | None = None
) -> Metrics:
    macs, params = count_macs_params(model, example_input)
    latency = cpu_latency_ms(model, example_input, config.latency_runs, config.warmup)
    return Metrics(params=params, macs=macs, accuracy=accuracy, latency_ms=latency)


def layer_changes(before: dict[str, int], after: dict[str, int]) -> list[dict[str, Any]]:
    """Per-layer channels before -> after, from two ``channel_counts`` snapshots."""
    rows = []
    for name, count in before.items():
        kept = after.get(name, count)
        rows.append({"layer": name, "before": count, "after": kept, "pruned": round(1 - kept / count, 4)})
    return rows


CLASSIFICATION_COLUMNS = (
    ("params", "params"),
    ("macs", "MACs"),
    ("accuracy", "top-1"),
    ("latency_ms", "latency ms (CPU, bs 1)"),
)
SCORES = frozenset({"accuracy", "map50_95", "map50"})  # fractions 0-1: shown in %, changes in points


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "params":
        return f"{value / 1e6:.3f}M"
    if kind == "macs":
        return f"{value / 1e6:.2f}M"
    if kind in SCORES:
        return f"{100 * value:.2f}%"
    return f"{value:.2f}"


def summary_table(
    stages: dict[str, dict[str, Any]],
    title: str = "nam-prune report",
    columns: tuple[tuple[str, str], ...] = CLASSIFICATION_COLUMNS,
) -> Table:
    """One row per stage (dense, pruned, fine-tuned) with the change against the first."""
    table = Table(title=title)
    table.add_column("stage")
    for _, header in columns:
        table.add_column(header, justify="right")
    first = next(iter(stages.values()))
    for stage, metrics in stages.items():
        cells = []
        for key, _ in columns:
            text = _fmt(metrics.get(key), key)
            base, value = first.get(key), metrics.get(key)
            if stage != next(iter(stages)) and base and value is not None:
                delta = (value - base) * 100 if key in SCORES else 100 * (value / base - 1)
                text += f" ({delta:+.1f}{' pt' if key in SCORES else '%'})"
            cells.append(text)
        table.add_row(stage, *cells)
    return table


def layer_table(rows: list[dict[str, Any]], only_changed: bool = False) -> Table:
    table = Table(title="channels per layer")
    table.add_column("layer")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("pruned", justify="right")
    for row in rows:
        if only_changed and row["before"] == row["after"]:
            continue
        table.add_row(row["layer"], str(row["before"]), str(row["after"]), f"{100 * row['pruned']:.1f}%")
    return table


def _data_config(data: str):
    """``--data`` is a recipe file (its ``data:`` section) or a data set name."""
    from nam_prune.config import from_dict
    from nam_prune.data import DataConfig
    from nam_prune.recipe import load_recipe

    if data.endswith((".yaml", ".yml")):
        return load_recipe(data).data
    return from_dict(DataConfig, {"name": data}, prefix="data.")


def inspect_checkpoint(
    path: str | Path,
    data: str | None = None,
    config: ReportConfig | None = None,
    with_onnx: bool = False,
    plots: Path | None = None,
) -> dict[str, Any]:
    """What ``nam-prune report`` shows: params, MACs, layers, latency, accuracy when data is given,
    onnxruntime latency with ``with_onnx``, and the gamma/channel plots written to ``plots``."""
    from nam_prune.checkpoint import load_with_metadata, record_of
    from nam_prune.data import load_data
    from nam_prune.prune import channel_counts
    from nam_prune.train import evaluate

    model, payload = load_with_metadata(path)
    record = record_of(payload)
    example = record.example_input()
    detector = is_yolo_name(record.spec.name)
    config = config or ReportConfig()
    scores: dict[str, Any] = {}
    if data and detector:
        from nam_prune.yolo.config import YoloConfig
        from nam_prune.yolo.train import validate_detector

        size = record.input_shape[-1]
        scores = validate_detector(model, Path(data), YoloConfig(data=data, imgsz=size), torch.device("cpu"))
    elif data:
        bundle = load_data(_data_config(data))
        if tuple(bundle.input_shape) != tuple(record.input_shape):
            raise NamPruneError(
                f"--data gives inputs {tuple(bundle.input_shape)} but the model takes {tuple(record.input_shape)}"
            )
        scores["accuracy"] = evaluate(model, bundle.test, torch.device("cpu"))
    metrics = measure(model, example, config, scores.get("accuracy"))
    extra: dict[str, Any] = {**scores, "gflops": gflops(metrics.macs)}
    if with_onnx:
        from nam_prune.export import ort_latency_ms

        extra["onnx_latency_ms"] = ort_latency_ms(model, example, config.latency_runs, config.warmup)
    if plots is not None:
        from nam_prune.plots import gamma_plots

        extra["plots"] = [str(p) for p in gamma_plots(model, payload, plots)]
    counts = channel_counts(model)
    layers = payload.get("layers") or layer_changes(counts, counts)
    return {
        **metrics.to_dict(),
        **extra,
        "model": asdict(record.spec),
        "nam": asdict(record.nam) if record.nam else None,
        "input_shape": list(record.input_shape),
        "detector": detector,
        "pruned": bool(record.history),
        "layers": layers,
        "recorded": payload.get("metrics", {}),
        "versions": payload.get("versions", {}),
    }


def print_report(stages: dict[str, dict[str, Any]], layers: list[dict[str, Any]]) -> None:
    console.print(summary_table(stages))
    console.print(layer_table(layers))
