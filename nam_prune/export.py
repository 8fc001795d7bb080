"""Deployment: export a saved model to ONNX or frozen TorchScript, check it, and compare the
exported model's outputs with eager torch.

Gates export in their folded eval form ``x * sigmoid(a x + b)`` (BN folded away). A
``deploy_mode`` (a model family's ``Task.deploy_mode``) puts the model in the form it is
deployed in, e.g. a detector returning only its decoded boxes.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn as nn

from nam_prune.checkpoint import atomic_write
from nam_prune.errors import NamPruneError, first_line

PARITY_TOLERANCE = 1e-4

DeployMode = Callable[[nn.Module], ContextManager[nn.Module]]


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    opset: int


@dataclass
class ExportConfig:
    """The recipe's ``export:`` section. int8: end the run with ``model.onnx`` and its onnxruntime
    static INT8 form ``model.int8.onnx`` (``nam_prune.int8``), both scored on the test split and timed
    at batch 1 in results.json; off by default, as it needs onnxruntime and adds a calibration pass."""

    int8: bool = False


def onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise NamPruneError("ONNX export needs onnx and onnxruntime: pip install 'nam-prune[onnx]'") from error
    return onnx, onnxruntime


@contextlib.contextmanager
def failure_named(step: str):
    """Exporters, checkers, the tracer and the runtimes raise many types: one line naming the step."""
    try:
        yield
    except NamPruneError:
        raise
    except Exception as error:
        raise NamPruneError(f"{step} failed ({type(error).__name__}: {first_line(error, 200)})") from error


def _highest_opset() -> int | None:
    """The highest opset torch's TorchScript-based exporter writes (a private constant: None if it moves)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)


def _onnx_file(
    model: nn.Module, example: torch.Tensor, path: str, opset: int, dynamic_batch: bool, deploy_mode: DeployMode
) -> None:
    """torch.onnx.export (TorchScript exporter: conv nets need no dynamic control flow) then onnx.checker."""
    onnx, _ = onnx_modules()
    highest = _highest_opset()
    if highest is not None and opset > highest:  # else the exporter dumps the whole graph to stdout first
        raise NamPruneError(f"opset {opset} is above the highest this torch exports ({highest}); pass --opset {highest} or lower")
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), deploy_mode(model):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example.cpu(),), path, input_names=["input"], output_names=["logits"],
            opset_version=opset, dynamic_axes=axes, dynamo=False,
        )
    onnx.checker.check_model(onnx.load(path))


def write_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int = 17,
    dynamic_batch: bool = False,
    deploy_mode: DeployMode = contextlib.nullcontext,
) -> None:
    """Write a checked ONNX file (no output comparison: ``export_onnx`` adds that)."""
    model = model.cpu().eval()
    with failure_named("ONNX export"):
        atomic_write(path, lambda tmp: _onnx_file(model, example, tmp, opset, dynamic_batch, deploy_mode))


def ort_session(path: Path):
    """A CPU session with as many threads as torch uses, so a CPU quota (``measure.fit_threads_to_quota``)
    or ``OMP_NUM_THREADS`` sizes both runtimes alike and their latencies compare."""
    _, onnxruntime = onnx_modules()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(
    model: nn.Module,
    run: Callable[[torch.Tensor], np.ndarray],
    example: torch.Tensor,
    deploy_mode: DeployMode = contextlib.nullcontext,
) -> float:
    """Largest |torch - run(x)| / max(1, |torch|) on a random input ``x`` of the example's shape,
    ``run`` being the exported model (onnxruntime, a loaded TorchScript file).

    Absolute for values up to 1 (logits, scores); relative above, where float32 itself
    cannot resolve 1e-4 (YOLO box coordinates in pixels: one ulp at 640 is 6e-5).
    """
    x = torch.rand_like(example.cpu())
    with torch.inference_mode(), deploy_mode(model):
        expected = model.cpu().eval()(x).numpy()
    with torch.inference_mode():
        return _difference(expected, run(x))


def _checked_parity(diff: float, runtime: str, hint: str) -> float:
    if diff > PARITY_TOLERANCE:
        raise NamPruneError(f"{runtime} output differs from eager torch by {diff:.2e} (> {PARITY_TOLERANCE}){hint}")
    return diff


def _difference(expected: np.ndarray, got: np.ndarray) -> float:
    return float((np.abs(expected - got) / np.maximum(1.0, np.abs(expected))).max())


class ChannelsLastInput(nn.Module):
    """Runs the wrapped model on a channels-last (NHWC) copy of its input, the layout oneDNN's CPU
    convolutions are fastest in, so a pruned model realises more of its MAC cut than in NCHW
    (``benchmarks/speedup.py``, docs/speedup*.json); traced, the file converts its input itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x.contiguous(memory_format=torch.channels_last))


CHUNK_BYTES = 16 * 2**20
"""Largest feature map a TorchScript file lets one slice of its batch make. glibc's malloc hands
blocks above its mmap threshold (32 MiB at most) back to the OS after each call, so a large batch
page-faults its feature maps in again every call; slices of at most 16 MiB run from memory the heap
keeps (docs/performance.md, Memory)."""


class BatchChunks(nn.Module):
    """Runs the wrapped model on slices of at most ``chunk`` samples and concatenates the outputs:
    per-sample results are unchanged (eval mode), and each slice's maps stay small enough to reuse memory."""

    def __init__(self, model: nn.Module, chunk: int) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) <= self.chunk:
            return self.model(x)
        return torch.cat([self.model(part) for part in x.split(self.chunk)])


def samples_per_chunk(model: nn.Module, example: torch.Tensor) -> int:
    """How many samples keep every module output of one slice within ``CHUNK_BYTES`` (one sample at
    least); ``model`` as it will run (in its deploy form)."""
    largest = example[:1].numel() * example.element_size()

    def record(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    try:
        with torch.inference_mode():
            model(example[:1].cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, CHUNK_BYTES // largest)


def frozen_torchscript(
    model: nn.Module,
    example: torch.Tensor,
    deploy_mode: DeployMode = contextlib.nullcontext,
    channels_last: bool = True,
    batch_chunks: bool = True,
) -> torch.jit.ScriptModule:
    """A copy of ``model`` in its deploy form, channels-last, traced and frozen (weights as constants,
    conv-BN folded): the fast way to run a pruned model in plain torch on the CPU. With ``batch_chunks``
    a model that returns one tensor runs large batches in slices (``BatchChunks``, ``samples_per_chunk``).
    ``channels_last=False, batch_chunks=False`` keeps plain NCHW (measured against the others in ``docs/memory_format.json``)."""
    with failure_named("TorchScript tracing"), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        copied = copy.deepcopy(model).cpu().eval()
        traced = ChannelsLastInput(copied.to(memory_format=torch.channels_last)) if channels_last else copied
        with deploy_mode(copied):
            script = torch.jit.trace(traced.eval(), example.cpu(), check_trace=False)
            if batch_chunks and _slices_agree(script, example):
                script = torch.jit.script(BatchChunks(script, samples_per_chunk(copied, example)))
            return torch.jit.freeze(script.eval())


def _slices_agree(script: torch.jit.ScriptModule, example: torch.Tensor) -> bool:
    """Whether one-sample slices of a batch of two, concatenated, give the whole batch's output: not
    so for a model that returns several tensors or puts its batch elsewhere than first (left unsliced)."""
    pair = torch.rand(2, *example.shape[1:], dtype=example.dtype)
    whole = script(pair)
    if not isinstance(whole, torch.Tensor):
        return False
    sliced = torch.cat([script(pair[:1]), script(pair[1:])])
    return sliced.shape == whole.shape and bool(torch.allclose(sliced, whole, rtol=1e-4, atol=1e-5))


def median_ms(call: Callable[[], object], runs: int, warmup: int) -> float:
    """Median wall time of ``call()`` over ``runs`` calls after ``warmup`` untimed ones, in milliseconds."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def torchscript_latency_ms(
    model: nn.Module, example: torch.Tensor, runs: int, warmup: int, deploy_mode: DeployMode = contextlib.nullcontext
) -> float:
    """Median CPU latency of ``frozen_torchscript(model)`` on ``example``'s batch."""
    frozen = frozen_torchscript(model, example, deploy_mode)
    x = example.cpu()
    with torch.inference_mode():  # the first calls of a frozen module optimize its graph: warm up twice at least
        return median_ms(lambda: frozen(x), runs, max(warmup, 2))


def export_torchscript(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    deploy_mode: DeployMode = contextlib.nullcontext,
    batch_chunks: bool = True,
) -> ExportResult:
    """Write ``frozen_torchscript(model)``; the file loads with ``torch.jit.load`` and needs no
    nam-prune. It is checked before it takes ``path``: a parity miss beyond 1e-4 is an error and
    leaves no file. ``batch_chunks=False`` suits an allocator that keeps freed memory (jemalloc,
    tcmalloc, tuned glibc), where whole batches run faster than slices."""
    model = model.cpu().eval()
    frozen = frozen_torchscript(model, example, deploy_mode, batch_chunks=batch_chunks)

    def write_checked(tmp: str) -> float:
        with warnings.catch_warnings():  # this torch warns that TorchScript is deprecated on every save and load
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(frozen, tmp)
            loaded = torch.jit.load(tmp)
        return _checked_parity(parity(model, lambda x: loaded(x).numpy(), example, deploy_mode), "TorchScript", "")

    with failure_named("TorchScript export"):
        return ExportResult(path, atomic_write(path, write_checked), 0)


def write_checked_onnx(
    model: nn.Module, example: torch.Tensor, path: str, opset: int, dynamic_batch: bool, deploy_mode: DeployMode
) -> float:
    """Write and check an ONNX file at ``path`` and return its parity with eager torch (a miss
    beyond 1e-4 is an error); ``model`` on the CPU, in eval mode."""
    _onnx_file(model, example, path, opset, dynamic_batch, deploy_mode)
    session = ort_session(Path(path))
    diff = parity(model, lambda x: session.run(None, {"input": x.numpy()})[0], example, deploy_mode)
    return _checked_parity(diff, "ONNX", "; try another --opset")


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int = 17,
    dynamic_batch: bool = False,
    deploy_mode: DeployMode = contextlib.nullcontext,
) -> ExportResult:
    """Write, check and verify an ONNX file before it takes ``path``: a parity miss beyond 1e-4 is
    an error and leaves no file."""
    model = model.cpu().eval()
    with failure_named("ONNX export"):
        return ExportResult(path, atomic_write(path, lambda tmp: write_checked_onnx(
            model, example, tmp, opset, dynamic_batch, deploy_mode)), opset)


def ort_latency_ms(
    model: nn.Module, example: torch.Tensor, runs: int, warmup: int, deploy_mode: DeployMode = contextlib.nullcontext
) -> float:
    """Median onnxruntime CPU latency on ``example``'s batch, via a temporary export."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        write_onnx(model, example, path, deploy_mode=deploy_mode)
        return session_latency_ms(path, example, runs, warmup)


def session_latency_ms(path: Path, example: torch.Tensor, runs: int, warmup: int) -> float:
    """Median onnxruntime CPU latency of the ONNX file at ``path`` on ``example``'s batch."""
    session = ort_session(path)
    x = {"input": example.cpu().numpy()}
    return median_ms(lambda: session.run(None, x), runs, warmup)
