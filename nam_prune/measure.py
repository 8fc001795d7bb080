"""Stage 6b: what a model costs: params, MACs (torch-pruning's counter) and CPU latency."""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from nam_prune.config import bounded
from nam_prune.errors import NamPruneError
from nam_prune.export import DeployMode, median_ms, torchscript_latency_ms
from nam_prune.prune.graph import count_macs_params

log = logging.getLogger("nam_prune")


@dataclass
class ReportConfig:
    """Latency is the median of ``latency_runs`` CPU forward passes at batch 1, after ``warmup``.

    baseline: also fine-tune the unpruned sparsity-trained model with the fine-tune settings,
    so the report reads the pruned model against a dense one trained as long.
    """

    latency_runs: int = bounded(30, low=1)
    warmup: int = bounded(5, low=0)
    baseline: bool = True


@dataclass
class Metrics:
    """``latency_ms``: eager torch; ``torchscript_latency_ms``: the form ``export --format
    torchscript`` writes (frozen, channels-last), None where the model cannot be traced."""

    params: int
    macs: int
    accuracy: float | None
    latency_ms: float | None
    torchscript_latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, example_input: torch.Tensor, runs: int, warmup: int) -> float:
    """Median wall time of one forward pass on ``example_input`` on the CPU, in milliseconds."""
    model = copy.deepcopy(model).cpu().eval()
    x = example_input.cpu()
    return median_ms(lambda: model(x), runs, warmup)


def gflops(macs: int) -> float:
    """GFLOPs as ultralytics reports them: two floating-point operations per multiply-accumulate."""
    return 2 * macs / 1e9


def measure(
    model: nn.Module,
    example_input: torch.Tensor,
    config: ReportConfig | None = None,
    accuracy: float | None = None,
    deploy_mode: DeployMode = contextlib.nullcontext,
) -> Metrics:
    """Params, MACs and CPU latency (eager and frozen TorchScript) of ``model`` on ``example_input``."""
    config = config or ReportConfig()
    macs, params = count_macs_params(model, example_input)
    latency = cpu_latency_ms(model, example_input, config.latency_runs, config.warmup)
    try:
        scripted = torchscript_latency_ms(model, example_input, config.latency_runs, config.warmup, deploy_mode)
    except NamPruneError as error:
        log.warning("no TorchScript latency: %s", error)
        scripted = None
    return Metrics(params=params, macs=macs, accuracy=accuracy, latency_ms=latency, torchscript_latency_ms=scripted)
