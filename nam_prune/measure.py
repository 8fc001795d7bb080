"""Stage 6b: what a model costs: params, MACs (torch-pruning's counter) and CPU latency."""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
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
    torchscript`` writes (frozen, channels-last), None where the model cannot be traced;
    ``cpu_busy_elsewhere``: the share of the machine's CPU time that other processes and the host
    (steal) took while the latencies were timed, None where the OS does not tell (not Linux)."""

    params: int
    macs: int
    accuracy: float | None
    latency_ms: float | None
    torchscript_latency_ms: float | None = None
    cpu_busy_elsewhere: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, example_input: torch.Tensor, runs: int, warmup: int) -> float:
    """Median wall time of one forward pass on ``example_input`` on the CPU, in milliseconds."""
    model = copy.deepcopy(model).cpu().eval()
    x = example_input.cpu()
    return median_ms(lambda: model(x), runs, warmup)


BUSY_ELSEWHERE_LIMIT = 0.25
"""Above this share of CPU time taken by others while timing, latency figures are unreliable: two
processes that both run 2 OpenMP threads on 2 cores slow each other by far more than 2x (the
quickstart's dense TorchScript model timed 142 ms instead of 0.7 ms beside a training run)."""


@dataclass(frozen=True)
class CpuTicks:
    """Clock ticks so far, from ``/proc``: busy on the whole machine (every process, and time the
    hypervisor stole), in total on the whole machine, and used by this process."""

    machine_busy: int
    machine_total: int
    own: int

    @classmethod
    def now(cls) -> CpuTicks | None:
        try:
            machine = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # fields from 3 on
            user, nice, system, idle, iowait, irq, softirq, steal = machine
            return cls(user + nice + system + irq + softirq + steal, sum(machine), int(own[11]) + int(own[12]))
        except (OSError, ValueError, IndexError):
            return None


def busy_elsewhere(before: CpuTicks | None, after: CpuTicks | None, min_ticks: int = 20) -> float | None:
    """Share of the machine's CPU time between two snapshots that was not this process's and not
    idle; None if unknown or too short to tell (ticks are 10 ms)."""
    if before is None or after is None or after.machine_total - before.machine_total < min_ticks:
        return None
    others = (after.machine_busy - before.machine_busy) - (after.own - before.own)
    return max(0.0, others / (after.machine_total - before.machine_total))


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
    start = CpuTicks.now()
    latency = cpu_latency_ms(model, example_input, config.latency_runs, config.warmup)
    try:
        scripted = torchscript_latency_ms(model, example_input, config.latency_runs, config.warmup, deploy_mode)
    except NamPruneError as error:
        log.warning("no TorchScript latency: %s", error)
        scripted = None
    return Metrics(params=params, macs=macs, accuracy=accuracy, latency_ms=latency, torchscript_latency_ms=scripted,
                   cpu_busy_elsewhere=busy_elsewhere(start, CpuTicks.now()))
