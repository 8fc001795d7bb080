"""Stage 4c: a latency target (``prune.target: latency``): how deep to cut, found on real timings.

The channel ranking is the one a MAC target uses; only the share cut differs. Each candidate share
is cut on a copy, put in the form it ships in (gates dropped when ``prune.strip_gates``, the
family's deploy mode) and run on ``prune.runtime`` at ``prune.batch`` with this process's threads,
timed against the dense model in alternating rounds: a slow moment of a shared machine then hits
both, and the ratio is the median over rounds. Halving the MACs rarely halves the latency
(docs/performance.md), which is why the share is searched on timings and not derived from MACs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from nam_prune.errors import NamPruneError
from nam_prune.export import DeployMode, frozen_torchscript, median_ms, ort_session, write_onnx
from nam_prune.surgery import strip_gates

Runtime = Literal["torch", "torchscript", "onnxruntime"]

ROUNDS = 9
"""Alternating rounds per ratio: the median of the paired ratios."""
TURN_SECONDS = 0.1
MAX_RUNS = 2000
"""Timed calls per model per round add up to about ``TURN_SECONDS`` (3 to ``MAX_RUNS`` calls): at a
tenth of a millisecond a turn of 50 calls left paired readings of one model a third apart."""
PAUSE_SECONDS = 0.05
WARMUP = 2
"""Untimed calls before each turn: a runtime's first calls after another model ran are slow."""


def check_runtime(runtime: Runtime) -> None:
    """A latency target on a runtime that is not installed is a one-line error before any work."""
    if runtime == "onnxruntime" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        raise NamPruneError("prune.runtime: onnxruntime needs onnx and onnxruntime: pip install 'nam-prune[onnx]'")


def runtime_call(
    model: nn.Module, example: torch.Tensor, runtime: Runtime, folder: Path, deploy_mode: DeployMode
) -> Callable[[], object]:
    """One forward of ``model`` on ``example`` as ``runtime`` runs it: eager torch, frozen TorchScript
    (what ``export --format torchscript`` writes) or an onnxruntime session (``export``'s ONNX)."""
    if runtime == "torch":
        eager = copy.deepcopy(model).cpu().eval()

        def forward() -> object:
            with deploy_mode(eager):
                return eager(example)

        return forward
    if runtime == "torchscript":
        frozen = frozen_torchscript(model, example, deploy_mode)
        return lambda: frozen(example)
    path = Path(tempfile.mkstemp(suffix=".onnx", dir=folder)[1])
    write_onnx(model, example, path, deploy_mode=deploy_mode)
    session, feed = ort_session(path), {"input": example.numpy()}
    return lambda: session.run(None, feed)


def _turn(call: Callable[[], object], runs: int) -> float:
    """Median ms of one model's turn, after a pause that lets the other model's runtime threads stop
    spinning (onnxruntime's keep a core busy for a while after a call, slowing the next model's)."""
    time.sleep(PAUSE_SECONDS)
    return median_ms(call, runs, WARMUP)


def paired_ratio(reference: Callable[[], object], candidate: Callable[[], object], rounds: int = ROUNDS) -> tuple[float, float, float]:
    """``(candidate / reference latency, reference ms, candidate ms)``: medians over ``rounds`` rounds
    that time both back to back, which one goes first alternating."""
    with torch.inference_mode():
        probe = median_ms(reference, 1, WARMUP) / 1000
        runs = max(3, min(MAX_RUNS, round(TURN_SECONDS / max(probe, 1e-6))))
        ratios, reference_ms, candidate_ms = [], [], []
        for index in range(rounds):
            pair = (reference, candidate) if index % 2 == 0 else (candidate, reference)
            first, second = (_turn(call, runs) for call in pair)
            ref, cand = (first, second) if index % 2 == 0 else (second, first)
            ratios.append(cand / ref)
            reference_ms.append(ref)
            candidate_ms.append(cand)
    return statistics.median(ratios), statistics.median(reference_ms), statistics.median(candidate_ms)


@dataclass
class LatencySearch:
    """What a latency target measured, for ``results.json``: the target as a share of the dense
    model's latency, every timed candidate (share of channels cut, latency share, ms) and the model
    the cut handed back."""

    runtime: str
    batch: int
    threads: int
    target: float
    dense_ms: float = 0.0
    trials: list[dict[str, float]] = field(default_factory=list)
    ratio: float = 0.0
    ms: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class LatencyMeter:
    """Times models against the dense one they were cut from, in their deployed form."""

    def __init__(
        self, dense: nn.Module, example: torch.Tensor, runtime: Runtime, batch: int, strip: bool,
        deploy_mode: DeployMode = contextlib.nullcontext,
    ) -> None:
        check_runtime(runtime)
        self.runtime, self.strip, self.deploy_mode = runtime, strip, deploy_mode
        self.example = example.detach().cpu().expand(batch, *example.shape[1:]).contiguous()
        self._folder = tempfile.TemporaryDirectory(prefix="nam-prune-latency-")
        self.reference = self.call(dense)

    def deployed(self, model: nn.Module) -> nn.Module:
        """A copy as it ships: gates dropped (their fold changes weights, not the architecture timed)."""
        shipped = copy.deepcopy(model).cpu().eval()
        return strip_gates(shipped, fold=False) if self.strip else shipped

    def call(self, model: nn.Module) -> Callable[[], object]:
        return runtime_call(self.deployed(model), self.example, self.runtime, Path(self._folder.name), self.deploy_mode)

    def ratio(self, model: nn.Module) -> tuple[float, float, float]:
        """``model``'s latency as a share of the dense model's, with both in ms (paired)."""
        return paired_ratio(self.reference, self.call(model))

    def close(self) -> None:
        self._folder.cleanup()
