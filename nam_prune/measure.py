"""Stage 6b: what a model costs: params, MACs (torch-pruning's counter) and CPU latency."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
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
    ``cpu_busy_elsewhere``: the share of CPU time on this process's CPUs (``CpuTicks``) that other
    processes and the host (steal) took while the latencies were timed, None where the OS does not
    tell (not Linux) or the window was too short."""

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


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time per period this process may use (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), or None when unlimited or unknown.

    The tightest limit on the way from the process's own cgroup (``membership``) up to the mount's
    root counts (a systemd slice or a Kubernetes pod sets it on a parent), and the root's own: where
    the runtime shows a container its cgroup as the root, the host path in ``membership`` is missing.
    """
    try:
        lines = os.fsdecode(membership.read_bytes()).splitlines()
    except OSError:
        lines = []
    own = [fields for fields in (line.split(":", 2) for line in lines) if len(fields) == 3]
    paths = [(cgroup, path) for _, controllers, path in own if not controllers]  # v2
    paths += [(cgroup / "cpu", path) for _, controllers, path in own if "cpu" in controllers.split(",")]  # v1
    for root in (cgroup, cgroup / "cpu"):
        paths.append((root, "/"))
    limits = []
    for root, path in paths:
        leaf = root / path.strip("/")
        with contextlib.suppress(OSError):
            if leaf.is_dir():
                limits += [q for folder in (leaf, *leaf.parents) if folder.is_relative_to(root) and (q := _limit_in(folder))]
    return min(limits, default=None)


def _limit_in(folder: Path) -> float | None:
    """The CPU limit set in one cgroup folder; None if it sets none or cannot be read."""
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else _positive_share(int(quota), int(period))
        if (folder / "cpu.cfs_quota_us").is_file():
            quota, period = (int((folder / name).read_text()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
            return _positive_share(quota, period)
    except (OSError, ValueError):
        pass
    return None


def _positive_share(quota: int, period: int) -> float | None:
    """quota / period, or None for the unlimited -1 and for values no kernel writes."""
    return quota / period if quota > 0 and period > 0 else None


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def fit_threads_to_quota() -> None:
    """Under a CPU quota (``docker --cpus``, a Kubernetes CPU limit) torch still starts a thread per
    physical core it sees, and the quota then stalls them all mid-operation: training slows and
    latency figures swing. Run as many threads as the quota pays for, unless the user chose
    (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``; torchrun sets the first for its workers)."""
    quota = cpu_quota()
    if quota is None or any(os.environ.get(name) for name in THREAD_VARIABLES):
        return
    threads = max(1, math.ceil(quota))
    if threads < torch.get_num_threads():
        log.info("CPU quota of %.2f CPUs: %d torch threads instead of %d (set OMP_NUM_THREADS to choose)",
                 quota, threads, torch.get_num_threads())
        torch.set_num_threads(threads)


BUSY_ELSEWHERE_LIMIT = 0.25
"""Above this share of CPU time taken by others while timing, latency figures are unreliable: two
processes that both run 2 OpenMP threads on 2 cores slow each other by far more than twice: OpenMP
threads spin-wait on each other, so a pre-empted thread stalls the whole parallel region."""


@dataclass(frozen=True)
class CpuTicks:
    """Clock ticks so far on the CPUs this process may run on (its affinity set, not the whole host:
    a busy unrelated core elsewhere does not slow our threads): busy (every process, and time the
    hypervisor stole), in total, and used by this process. A container's CPU quota is not seen here
    (``fit_threads_to_quota`` sizes the thread pool to it)."""

    busy: int
    total: int
    own: int
    cpus: int

    @classmethod
    def now(cls) -> CpuTicks | None:
        try:
            mine = {f"cpu{index}" for index in os.sched_getaffinity(0)}
            busy = total = 0
            for line in Path("/proc/stat").read_text().splitlines():
                name, *values = line.split()
                if name in mine:
                    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
                    busy += user + nice + system + irq + softirq + steal
                    total += user + nice + system + idle + iowait + irq + softirq + steal
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # fields from the 3rd on
            return cls(busy, total, int(own[11]) + int(own[12]), len(mine))  # utime + stime
        except (AttributeError, OSError, ValueError, IndexError):  # not Linux
            return None


def busy_elsewhere(before: CpuTicks | None, after: CpuTicks | None, min_ticks_per_cpu: int = 10) -> float | None:
    """Share of our CPUs' time between two snapshots that was neither idle nor this process's;
    None if unknown or too short to tell (a tick is 10 ms)."""
    if before is None or after is None or after.total - before.total < min_ticks_per_cpu * after.cpus:
        return None
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others / (after.total - before.total))


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
