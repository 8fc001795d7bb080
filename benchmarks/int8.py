"""FP32 against INT8 onnxruntime: a saved model's latency at batch 1 and 32, paired, and each file's score.

The FP32 ONNX file of a nam-prune checkpoint and onnxruntime's static INT8 form of it, made as
``nam-prune export MODEL --int8`` makes them (calibrated on the training images of the recipe the
checkpoint stores, or of ``--data``), one fixed-shape pair per batch size. The two sessions are timed
in alternating rounds (``benchmarks/timing.py``), so a slow spell hits both; the INT8 speed-up
(FP32 ms / INT8 ms) is given per round with its median and quartiles. The score of both batch-1
files on the recipe's test split: top-1, or mAP50-95 for a detector.

    python -m benchmarks int8 runs/fashion_quickstart/model.pt [--data SPEC] [--runs 40] [--rounds 5] [--threads N] [--json NAME.json]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.nn as nn

from benchmarks.timing import (
    add_options,
    benchmark_parser,
    interleaved_rounds,
    median_quartiles,
    parse,
    pooled_median_ms,
    round_speedups,
    write_result,
)
from nam_prune.artifact import ModelRecord, load_with_metadata, record_of
from nam_prune.cli import parse_data_option
from nam_prune.export import ort_session, write_onnx
from nam_prune.int8 import Int8Data, int8_path, quantize_onnx, scores_line
from nam_prune.tasks import Task, int8_data_for, task_class


def add_data_option(parser: argparse.ArgumentParser) -> None:
    """``--data``, which :func:`load_for_int8` reads."""
    parser.add_argument("--data", help="calibrate and score on this data set name or recipe .yaml "
                                       "(default: the recipe the checkpoint stores)")


def load_for_int8(path: Path, data: str | None) -> tuple[nn.Module, ModelRecord, type[Task], Int8Data]:
    """A checkpoint's model, record and task, and what calibrates and scores its INT8 file: the recipe
    it stores, or ``data`` (a data set name or recipe, ``--data``)."""
    model, payload = load_with_metadata(path)
    record = record_of(payload)
    task = task_class(record.spec.name)
    return model, record, task, int8_data_for(task, payload, str(path), parse_data_option(data) if data else None, option="--data")


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("int8", __doc__)
    parser.add_argument("model", type=Path, help="a nam-prune checkpoint (a run's model.pt)")
    add_data_option(parser)
    parser.add_argument("--runs", type=int, default=40, help="timed calls per round at batch 1 (an eighth of it at batch 32)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (at least 2, for quartiles)")
    add_options(parser)
    args = parse(parser, argv)
    if args.runs < 1 or args.rounds < 2:
        parser.error("--runs must be at least 1 and --rounds at least 2")
    model, record, task, data = load_for_int8(args.model, args.data)
    example = record.example_input()
    examples = {"bs1": example, "bs32": example.expand(32, *example.shape[1:]).contiguous()}
    calls: dict[str, dict[str, Callable[[], object]]] = {"fp32": {}, "int8": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for label, x in examples.items():
            files = {"fp32": Path(scratch) / f"{label}.onnx", "int8": int8_path(Path(scratch) / f"{label}.onnx")}
            write_onnx(model, x, files["fp32"], deploy_mode=task.deploy_mode)
            quantize_onnx(files["fp32"], files["int8"], data)
            for kind, path in files.items():
                session, feed = ort_session(path), {"input": x.numpy()}
                calls[kind][f"ort_{label}"] = lambda session=session, feed=feed: session.run(None, feed)
            if label == "bs1":
                scores = {kind: data.score(path) for kind, path in files.items()}
        fp32, int8 = interleaved_rounds([calls["fp32"], calls["int8"]], {"bs1": args.runs, "bs32": max(args.runs // 8, 1)},
                                        args.rounds, warmup=3)
    fp32_ms, int8_ms = pooled_median_ms(fp32), pooled_median_ms(int8)
    speedup = {column: median_quartiles(round_speedups(fp32[column], int8[column])) for column in fp32}
    print(f"{args.model}: {scores_line(task.score_label(), scores['fp32'], scores['int8'], data.test_images)}")
    for column, ratio in speedup.items():
        low, high = ratio["quartiles"]
        print(f"  {column}: FP32 {fp32_ms[column]:.3f} ms, INT8 {int8_ms[column]:.3f} ms; "
              f"INT8 speed-up {ratio['median']:.2f}x (quartiles {low:.2f}-{high:.2f} over {args.rounds} rounds)")
    if args.json:
        write_result(args.json, parser, argv, model=str(args.model), calibration_images=data.calibration_images,
                     test_images=data.test_images, score_key=task.score_key, scores=scores,
                     fp32_ms=fp32_ms, int8_ms=int8_ms, int8_speedup=speedup)
