"""Latency ratios on a shared, noisy machine: time the models being compared in alternation.

Each round times every model in turn and a model's figure is its median over all rounds, so a
slow spell hits the dense and the pruned model alike instead of skewing one ratio (timed one
after the other, single ratios of ``speedup`` moved by up to 0.15 between runs). A model's
first calls after another model ran are slow (onnxruntime MobileNetV2: 2.4 ms instead of 1.8 ms
with 10 calls per turn; the other session's threads still spin), so each turn starts with a short
pause and untimed calls.

Also what every benchmark shares: its parser (``benchmark_parser``, ``add_options``, ``parse``:
``--image-size``, ``--threads``, ``--json``) and the JSON writer (``write_result``). A helper, not a benchmark:
``python -m benchmarks`` does not list it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from nam_prune.checkpoint import atomic_write
from nam_prune.export import DeployMode, frozen_torchscript, ort_session, write_onnx

RESULTS = Path(__file__).resolve().parent.parent / "docs"  # where ``--json NAME.json`` writes


def runners(
    model: torch.nn.Module, examples: dict[str, torch.Tensor], folder: Path,
    deploy_mode: DeployMode = contextlib.nullcontext, optimized: bool = False,
) -> dict[str, Callable[[], object]]:
    """``{runtime_example: call}``: eager torch, frozen channels-last TorchScript (what ``export
    --format torchscript`` writes) and onnxruntime, on each named example batch; with ``optimized``
    also that TorchScript after ``torch.jit.optimize_for_inference`` (``tsopt``: the line a user can
    add after ``torch.jit.load``, measured on the loaded file in ``docs/load_optimize.json``)."""
    eager = copy.deepcopy(model).cpu().eval()
    calls = {}
    for label, x in examples.items():
        frozen = frozen_torchscript(model, x, deploy_mode)
        path = folder / f"{id(model)}-{label}.onnx"
        write_onnx(model, x, path, deploy_mode=deploy_mode)
        session, feed = ort_session(path), {"input": x.numpy()}
        calls[f"torch_{label}"] = lambda x=x: eager(x)
        calls[f"torchscript_{label}"] = lambda x=x, frozen=frozen: frozen(x)
        if optimized:  # optimize_for_inference rewrites its argument in place: it gets its own copy
            packed = torch.jit.optimize_for_inference(frozen_torchscript(model, x, deploy_mode))
            calls[f"tsopt_{label}"] = lambda x=x, packed=packed: packed(x)
        calls[f"ort_{label}"] = lambda session=session, feed=feed: session.run(None, feed)
    return calls


def interleaved_rounds(
    models: list[dict[str, Callable[[], object]]], runs: dict[str, int], rounds: int, warmup: int
) -> list[dict[str, list[list[float]]]]:
    """Seconds per timed call, per model and column (``runtime_example``), grouped by round: each
    round, each model gets ``warmup`` untimed calls, then ``runs[example]`` timed ones."""
    columns = list(models[0])
    times: list[dict[str, list[list[float]]]] = [{column: [] for column in columns} for _ in models]
    with torch.inference_mode():
        for column in columns:
            for _ in range(rounds):
                for calls, samples in zip(models, times):
                    time.sleep(0.05)  # lets the last model's runtime threads stop spinning
                    for _ in range(warmup):  # then warm this model's caches
                        calls[column]()
                    this_round = []
                    for _ in range(runs[column.split("_", 1)[1]]):
                        start = time.perf_counter()
                        calls[column]()
                        this_round.append(time.perf_counter() - start)
                    samples[column].append(this_round)
    return times


def pooled_median_ms(rounds_of_seconds: dict[str, list[list[float]]]) -> dict[str, float]:
    """Median milliseconds per column over every timed call of every round."""
    return {column: 1000 * statistics.median(t for one in per_round for t in one)
            for column, per_round in rounds_of_seconds.items()}


def interleaved_ms(
    models: list[dict[str, Callable[[], object]]], runs: dict[str, int], rounds: int, warmup: int
) -> list[dict[str, float]]:
    """Median milliseconds per model and column, timed as ``interleaved_rounds`` does."""
    return [pooled_median_ms(samples) for samples in interleaved_rounds(models, runs, rounds, warmup)]


def round_speedups(slow: list[list[float]], fast: list[list[float]]) -> list[float]:
    """Speed-up of ``fast`` over ``slow`` in each round (median call against median call): the two
    were timed back to back, so a round's ratio is paired and the spread over rounds shows how far
    one run's ratio can be trusted."""
    return [statistics.median(s) / statistics.median(f) for s, f in zip(slow, fast)]


def allocator_env() -> dict[str, str]:
    """The environment that sets how glibc's malloc serves large blocks: it halves eager ResNet-50
    batch-32 latency (docs/performance.md), so every JSON records it."""
    return {key: value for key, value in os.environ.items() if key.startswith("MALLOC_") or key == "LD_PRELOAD"}


def cpu_model() -> str:
    """The CPU's model name and clock: ratios measured on different machines are not comparable, so
    every JSON says which."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    clocks = [line.split(":", 1)[1].strip() for line in lines if line.startswith("cpu MHz")]
    return ", ".join([names[0] if names else "unknown", *([f"{clocks[0]} MHz"] if clocks else [])])


def command_line(script_and_args: str) -> str:
    """``script_and_args`` as a shell command, prefixed with the allocator environment it ran in."""
    return " ".join([*(f"{key}={value}" for key, value in sorted(allocator_env().items())), script_and_args])


def median_quartiles(values: list[float]) -> dict[str, object]:
    """Median and first and third quartiles (inclusive) of per-round values, with the values."""
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "quartiles": [low, high], "rounds": values}


def benchmark_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks NAME``: that line as its program name, the first line of
    the benchmark's docstring as its description."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc.splitlines()[0])


def result_path(text: str) -> Path:
    """``--json``'s value: a bare file name goes into docs/, a path with a folder is used as given."""
    path = Path(text)
    return RESULTS / path if path.parent == Path() else path


def add_options(parser: argparse.ArgumentParser, image_size: int | None = None, threads: bool = True) -> None:
    """The options benchmarks share, after their own: ``--image-size`` (with this default, where the
    benchmark takes one), ``--threads N`` (the thread count torch runs and onnxruntime follows,
    ``export.ort_session``) and ``--json PATH`` (where ``write_result`` writes)."""
    if image_size is not None:
        parser.add_argument("--image-size", type=int, default=image_size, help="input height and width in pixels")
    if threads:
        parser.add_argument("--threads", type=int, help="threads for torch and onnxruntime alike (default: torch's)")
    parser.add_argument("--json", type=result_path, metavar="PATH",
                        help="also write the results as JSON here (a bare file name: into docs/)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then torch's threads set from ``--threads`` when given (a count
    below 1 is a usage error)."""
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    return args


def write_result(path: Path, parser: argparse.ArgumentParser, argv: Sequence[str] | None, **fields: object) -> None:
    """Write a benchmark's JSON atomically: the command that made it (``parser.prog`` and ``argv``,
    the arguments as given; ``None``: ``sys.argv``'s, as argparse reads them), the torch version,
    threads, CPU and allocator environment it ran with, then ``fields``."""
    argv = sys.argv[1:] if argv is None else argv
    text = json.dumps({"command": command_line(f"{parser.prog} {shlex.join(argv)}".rstrip()), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cpu": cpu_model(), "allocator_env": allocator_env(),
                       **fields}, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
    print(f"wrote {path}")
