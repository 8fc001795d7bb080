"""Stage 6c: what a run or a saved model shows: summary and per-layer tables, and
``nam-prune report`` (params, MACs, latency, per layer; scores when data is given)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.markup import escape
from rich.table import Table

from nam_prune.artifact import adopt, from_payload, record_of
from nam_prune.checkpoint import is_nam_checkpoint, read_checkpoint
from nam_prune.errors import NamPruneError
from nam_prune.export import ort_latency_ms
from nam_prune.int8 import int8_latency_ms
from nam_prune.measure import BUSY_ELSEWHERE_LIMIT, ReportConfig, gflops, measure
from nam_prune.plots import gamma_plots
from nam_prune.prune.graph import channel_counts
from nam_prune.tasks import CLASSIFICATION_COLUMNS, ClassificationTask, Columns, Task, int8_data_for, task_class

log = logging.getLogger("nam_prune")

SCORES = frozenset({"accuracy", "map50_95", "map50"})  # fractions 0-1: shown in %, changes in points
ONNX_COLUMNS: Columns = (("onnx_latency_ms", "onnxruntime ms"), ("onnx_int8_latency_ms", "onnxruntime INT8 ms"))


def layer_changes(before: dict[str, int], after: dict[str, int]) -> list[dict[str, Any]]:
    """Per-layer channels before -> after, from two ``channel_counts`` snapshots."""
    rows = []
    for name, count in before.items():
        kept = after.get(name, count)
        rows.append({"layer": name, "before": count, "after": kept, "pruned": round(1 - kept / count, 4)})
    return rows


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
    columns: Columns = CLASSIFICATION_COLUMNS,
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
    table.caption = _contention_warning(stages)
    return table


def _contention_warning(stages: dict[str, dict[str, Any]]) -> str | None:
    """A line under the table when some stage was timed while others used the CPU: its ms are not
    comparable with the other stages' (a user would read a slow-down the model does not have)."""
    busy = {stage: m["cpu_busy_elsewhere"] for stage, m in stages.items()
            if (m.get("cpu_busy_elsewhere") or 0) > BUSY_ELSEWHERE_LIMIT}
    if not busy:
        return None
    which = ", ".join(f"{escape(stage)} {100 * share:.0f}%" for stage, share in busy.items())
    return (f"[yellow]ms unreliable: other processes took CPU while these were timed ({which}); "
            "re-time the model on an idle machine: nam-prune report MODEL.pt[/]")


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


def _int8_latency(
    model: nn.Module, example: torch.Tensor, task: type[Task], payload: dict[str, Any], source: str, data: Any, config: ReportConfig
) -> dict[str, float]:
    """onnxruntime latency of the model's INT8 form where it can be made: calibration data at hand
    (``--data``, else the recipe a run stored in its checkpoint) and a task that quantizes; else
    nothing, and the reason in the log."""
    try:
        int8 = int8_data_for(task, payload, source, data, option="--data")
        return {"onnx_int8_latency_ms": int8_latency_ms(model, example, int8, config.latency_runs, config.warmup, task.deploy_mode)}
    except NamPruneError as error:
        log.info("no INT8 onnxruntime latency: %s", error)
        return {}


def _onnx_columns(columns: Columns, metrics: dict[str, Any]) -> Columns:
    """The onnxruntime latencies measured that the task's own columns do not show already."""
    shown = dict(columns)
    return tuple((key, header) for key, header in ONNX_COLUMNS if key in metrics and key not in shown)


def inspect_checkpoint(
    path: str | Path,
    data: Any = None,
    config: ReportConfig | None = None,
    with_onnx: bool = False,
    plots: Path | None = None,
    model_name: str | None = None,
    image_size: int = 224,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """What ``nam-prune report`` shows: params, MACs, layers, latency, the task's scores on
    ``data`` (a ``DataConfig`` for classifiers, a data yaml path for detectors), onnxruntime
    latency with ``with_onnx`` (FP32, and INT8 where ``_int8_latency`` can make the INT8 form),
    and the gamma/channel plots written to ``plots``.

    A file from outside nam-prune is reported as a dense model: a state dict given its
    architecture (``model_name``), a whole pickled module with ``trust_pickle``; both are
    measured at ``image_size``.
    """
    payload = read_checkpoint(path, trust_pickle, how_to_trust="pass --trust-pickle")
    if is_nam_checkpoint(payload):
        if model_name:
            raise NamPruneError(f"{path} is a nam-prune checkpoint and names its own model: drop --model")
        model, record = from_payload(payload, str(path)), record_of(payload)
        task = task_class(record.spec.name)
    else:
        model, record = adopt(payload, str(path), model_name, image_size)
        task = task_class(model_name) if model_name else ClassificationTask
        payload = {}
    example = record.example_input()
    config = config or ReportConfig()
    scores = task.evaluate_checkpoint(model, record, data) if data is not None else {}
    metrics = measure(model, example, config, scores.get("accuracy"), task.deploy_mode)
    extra: dict[str, Any] = {**scores, "gflops": gflops(metrics.macs)}
    if with_onnx:
        extra["onnx_latency_ms"] = ort_latency_ms(model, example, config.latency_runs, config.warmup, task.deploy_mode)
        extra.update(_int8_latency(model, example, task, payload, str(path), data, config))
    if plots is not None:
        extra["plots"] = [str(p) for p in gamma_plots(model, payload, plots)]
    counts = channel_counts(model)
    layers = payload.get("layers") or layer_changes(counts, counts)
    return {
        **metrics.to_dict(),
        **extra,
        "model": asdict(record.spec),
        "nam": asdict(record.nam) if record.nam else None,
        "input_shape": list(record.input_shape),
        "task": task.__name__,
        "columns": [list(column) for column in (*task.columns, *_onnx_columns(task.columns, extra))],
        "pruned": bool(record.history),
        "layers": layers,
        "recorded": payload.get("metrics", {}),
        "versions": payload.get("versions", {}),
    }
