"""INT8 hand-off: onnxruntime's static quantization of an exported FP32 ONNX file, calibrated on
training images, checked to run and scored beside the FP32 file on the test split.

onnxruntime does the quantization (``quant_pre_process``: shape inference and graph optimization,
then ``quantize_static``): QDQ format, int8 weights per output channel, uint8 activations with MinMax
ranges. Unsigned activations (U8S8), because onnxruntime's x86 CPU kernels fuse only some of an
S8S8 ResNet's convolutions into QLinearConv and run the rest as float convolutions between
dequantize and quantize nodes, slower than the FP32 file (``python -m benchmarks int8``); 7-bit
weights (``reduce_range``), because x86 CPUs without VNNI multiply U8S8 with 16-bit sums that 8-bit
weights can saturate (onnxruntime's quantization guide), and the file may run on one.

nam-prune feeds the calibration images and checks what onnxruntime wrote. A task says which images
and how a file is scored (``Task.int8_data``: top-1 for classifiers, mAP50-95 through ultralytics'
validator for detectors); a task that cannot score a file refuses there.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from nam_prune.checkpoint import atomic_write
from nam_prune.errors import NamPruneError
from nam_prune.export import (
    DeployMode,
    ExportResult,
    failure_named,
    onnx_modules,
    ort_session,
    session_latency_ms,
    write_checked_onnx,
    write_onnx,
)

CALIBRATION_IMAGES = 512
"""Training images the activation ranges are measured on (onnxruntime's examples use a few hundred)."""


@dataclass
class Int8Data:
    """What a task hands the INT8 step: the input shape of its images (None where the task sizes them
    to the model's input, as a detector letterboxes), the calibration images (``calibration(shape)``
    with the model's input shape: a fresh pass over the same images in the same order, in batches),
    how many there are, the score of an ONNX file on the test split through onnxruntime (the task's
    ``score_key``) and how many test images that reads."""

    input_shape: tuple[int, ...] | None
    calibration: Callable[[tuple[int, ...]], Iterable[torch.Tensor]]
    calibration_images: int
    score: Callable[[Path], float]
    test_images: int
    files: Any = None
    """What the data's files live in (a temporary folder of a built-in set), kept as long as the data."""
    convolutions_only: bool = False
    """Quantize the convolutions only, and neither those no other convolution follows (a detector's
    last layers and box decoding stay float) nor the first two (the full-resolution stem). One uint8
    range per tensor cannot hold a detector's gate and SiLU products, its box offsets and its class
    scores alike: quantizing every operator onnxruntime can took a pruned yolov8n from 55.7 to 0.0
    mAP50-95, convolutions only to 54.6, and without the tail to 55.6. The stem: where most of an image
    is one flat colour, each of its channels is rounded by the same amount over that whole area, a
    bias the network sees everywhere; the yolov8n pruned from a trained detector went from 69.6 to
    23.6 with its stem quantized and to 68.7 without (``python -m benchmarks int8_sensitivity``)."""

    def check_input(self, input_shape: tuple[int, ...]) -> None:
        """Images of another shape would fail deep inside onnxruntime's calibration: say so first."""
        if self.input_shape is not None and tuple(self.input_shape) != tuple(input_shape):
            raise NamPruneError(
                f"the calibration data gives inputs {tuple(self.input_shape)} but the model takes {tuple(input_shape)}: "
                "calibrate on the data it was trained on"
            )


def quantization_tools():
    """onnxruntime's quantization package, or the one-line install hint where onnxruntime is missing."""
    onnx_modules()
    from onnxruntime import quantization

    return quantization


def fixed_batch(session: Any) -> int | None:
    """The batch size an onnxruntime session's input is fixed to; None where it varies (``--dynamic-batch``)."""
    size = session.get_inputs()[0].shape[0]
    return size if isinstance(size, int) else None


def fixed_batch_parts(images: torch.Tensor, size: int | None) -> list[np.ndarray]:
    """``images`` as arrays of a model's fixed batch ``size`` (None: one array), the last filled up with
    copies of the final image: their outputs are dropped, and they leave MinMax ranges as they are."""
    if size is None:
        return [images.numpy()]
    missing = -len(images) % size
    if missing:
        images = torch.cat([images, images[-1:].expand(missing, *images.shape[1:])])
    return [part.numpy() for part in images.split(size)]


class CalibrationBatches:
    """onnxruntime's ``CalibrationDataReader``, whose ABC counts any class with ``get_next`` as a
    subclass (so this module defines one without importing onnxruntime): the calibration images in
    the model's batch size, one feed per call, then None."""

    def __init__(self, batches: Iterable[torch.Tensor], size: int | None) -> None:
        self.arrays = (part for batch in batches for part in fixed_batch_parts(batch, size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        array = next(self.arrays, None)
        return None if array is None else {"input": array}


def ort_top1(session: Any, test: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 of an onnxruntime classifier session on labelled batches, whatever batch it is fixed to."""
    size, correct, total = fixed_batch(session), 0, 0
    for images, labels in test:
        logits = np.concatenate([session.run(None, {"input": part})[0] for part in fixed_batch_parts(images, size)])
        correct += int((logits[: len(labels)].argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return correct / total


def quantize_onnx(
    fp32: Path, path: Path, data: Int8Data, keep_float: Sequence[str] = (), float_stem: bool = True
) -> None:
    """Write ``path``: onnxruntime's static INT8 form of the FP32 ONNX file ``fp32``, calibrated on
    ``data``'s images, with the nodes named in ``keep_float`` left in float (and, for
    ``convolutions_only`` data, the stem unless ``float_stem`` is off: the benchmark that measures it
    turns it off). Before it takes ``path`` it must hold quantized operators and run in onnxruntime;
    else it is an error and leaves no file."""
    quantization = quantization_tools()
    session = ort_session(fp32)
    size, shape = fixed_batch(session), tuple(session.get_inputs()[0].shape[1:])

    def write_checked(tmp: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            prepared = Path(folder) / "prepared.onnx"
            quantization.quant_pre_process(str(fp32), str(prepared))
            nodes = graph_nodes(prepared) if keep_float or data.convolutions_only else []
            _check_node_names(nodes, keep_float)
            scope = {"nodes_to_exclude": list(keep_float)}
            if data.convolutions_only:
                kept = convolution_free_tail(nodes) + leading_convolutions(nodes, STEM_CONVOLUTIONS if float_stem else 0)
                scope = {"op_types_to_quantize": ["Conv"], "nodes_to_exclude": kept + list(keep_float)}
            quantization.quantize_static(
                str(prepared), tmp, CalibrationBatches(data.calibration(shape), size),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True, reduce_range=True,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8, **scope,
            )
        _check_int8(Path(tmp), np.zeros((size or 1, *shape), dtype=np.float32))

    with failure_named("INT8 quantization"):
        atomic_write(path, write_checked)


STEM_CONVOLUTIONS = 2
"""The first convolutions a ``convolutions_only`` INT8 file keeps in float (``Int8Data.convolutions_only``)."""


def graph_nodes(path: Path) -> list:
    """The nodes of an ONNX file, in its (topological) order."""
    onnx, _ = onnx_modules()
    return list(onnx.load(str(path)).graph.node)


def _check_node_names(nodes: list, names: Sequence[str]) -> None:
    """onnxruntime skips a node name it does not find without a word: say which are missing instead."""
    missing = sorted(set(names) - {node.name for node in nodes})
    if missing:
        raise NamPruneError(f"no node named {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} in the model "
                            "onnxruntime prepared for quantization: name nodes of the exported ONNX file")


def leading_convolutions(nodes: list, count: int) -> list[str]:
    """Names of the first ``count`` convolutions among ``nodes`` (:func:`graph_nodes`)."""
    return [node.name for node in nodes if node.op_type == "Conv"][:count]


def convolution_free_tail(nodes: list) -> list[str]:
    """Names of the ``nodes`` (:func:`graph_nodes`) that no convolution follows (the last convolutions included)."""
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    followed = [False] * len(nodes)
    for index in reversed(range(len(nodes))):  # ONNX lists nodes in topological order: readers come later
        followed[index] = any(nodes[r].op_type == "Conv" or followed[r] for out in nodes[index].output for r in readers.get(out, []))
    return [node.name for node, after in zip(nodes, followed) if not after and node.name]


def _check_int8(path: Path, x: np.ndarray) -> None:
    """Quantized operators in the file, and one run of it on ``x``."""
    if not any(node.op_type == "QuantizeLinear" for node in graph_nodes(path)):
        raise NamPruneError("onnxruntime quantized nothing in this model (no operator it quantizes, such as Conv, "
                            "MatMul or Gemm): deploy the FP32 file")
    ort_session(path).run(None, {"input": x})


def int8_path(path: Path) -> Path:
    """Where the INT8 form of the FP32 file ``path`` goes: ``model.onnx`` -> ``model.int8.onnx``."""
    return path.with_suffix(".int8.onnx")


@dataclass
class Int8Export:
    """The FP32 file (``fp32``) and its INT8 form at ``path``, with their scores on the test split."""

    fp32: ExportResult
    path: Path
    fp32_score: float
    int8_score: float
    data: Int8Data

    def scores_line(self, label: str) -> str:
        return scores_line(label, self.fp32_score, self.int8_score, self.data.test_images)


def scores_line(label: str, fp32: float, int8: float, test_images: int) -> str:
    """The two files' scores (fractions, shown in %) on one line, with the change in points."""
    return f"{label} on {test_images} test images: FP32 ONNX {100 * fp32:.2f}%, INT8 {100 * int8:.2f}% ({100 * (int8 - fp32):+.2f} pt)"


def export_int8(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    data: Int8Data,
    opset: int = 17,
    dynamic_batch: bool = False,
    deploy_mode: DeployMode = contextlib.nullcontext,
) -> Int8Export:
    """``export_onnx`` to ``path`` and its INT8 form beside it (``int8_path``), both scored on ``data``'s
    test split. The INT8 file is made from the checked FP32 file before that takes ``path``, so a
    failure of either leaves neither."""
    data.check_input(tuple(example.shape[1:]))
    model = model.cpu().eval()
    target = int8_path(path)

    def write_both(tmp: str) -> float:
        diff = write_checked_onnx(model, example, tmp, opset, dynamic_batch, deploy_mode)
        quantize_onnx(Path(tmp), target, data)
        return diff

    with failure_named("ONNX export"):
        diff = atomic_write(path, write_both)
    try:
        scores = [data.score(file) for file in (path, target)]
    except NamPruneError:  # data that cannot score this model: no files that look exported and checked
        for file in (path, target):
            file.unlink(missing_ok=True)
        raise
    return Int8Export(ExportResult(path, diff, opset), target, *scores, data)


def int8_results(done: Int8Export, example: torch.Tensor, runs: int, warmup: int, score_key: str) -> dict[str, Any]:
    """What ``export.int8`` adds to a run's results.json: the two files, their scores and their
    onnxruntime latencies on ``example``'s batch, each the median of ``runs`` calls."""
    return {
        "fp32_file": str(done.fp32.path),
        "int8_file": str(done.path),
        "calibration_images": done.data.calibration_images,
        "test_images": done.data.test_images,
        f"fp32_{score_key}": done.fp32_score,
        f"int8_{score_key}": done.int8_score,
        "fp32_latency_ms": session_latency_ms(done.fp32.path, example, runs, warmup),
        "int8_latency_ms": session_latency_ms(done.path, example, runs, warmup),
    }


def int8_summary(results: dict[str, Any], score_key: str, label: str) -> str:
    """The line a run prints for its ``int8_results``."""
    scores = scores_line(label, results[f"fp32_{score_key}"], results[f"int8_{score_key}"], results["test_images"])
    return (f"INT8 {Path(results['int8_file']).name} (onnxruntime): {scores}; {results['int8_latency_ms']:.2f} ms "
            f"against FP32 ONNX {results['fp32_latency_ms']:.2f} ms at batch 1")


def int8_latency_ms(
    model: nn.Module, example: torch.Tensor, data: Int8Data, runs: int, warmup: int,
    deploy_mode: DeployMode = contextlib.nullcontext,
) -> float:
    """Median onnxruntime CPU latency of the model's INT8 form on ``example``'s batch, via temporary files."""
    data.check_input(tuple(example.shape[1:]))
    with tempfile.TemporaryDirectory() as folder:
        fp32 = Path(folder) / "model.onnx"
        write_onnx(model, example, fp32, deploy_mode=deploy_mode)
        quantize_onnx(fp32, int8_path(fp32), data)
        return session_latency_ms(int8_path(fp32), example, runs, warmup)

