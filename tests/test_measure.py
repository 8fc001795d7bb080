"""Latency figures say when they cannot be trusted: another process on the CPU while they were timed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nam_prune.measure import BUSY_ELSEWHERE_LIMIT, CpuTicks, ReportConfig, busy_elsewhere, measure
from nam_prune.models import ModelSpec, build_model
from nam_prune.report import summary_table


def test_busy_elsewhere_is_the_share_not_ours_and_not_idle():
    before, after = CpuTicks(100, 1000, 10, cpus=2), CpuTicks(300, 1200, 110, cpus=2)
    assert busy_elsewhere(before, after) == pytest.approx(0.5)  # 200 busy ticks, 100 ours, of 200
    assert busy_elsewhere(before, CpuTicks(300, 1010, 110, cpus=2)) is None  # 10 ticks on 2 CPUs: too short
    assert busy_elsewhere(None, after) is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="CPU accounting is read from Linux's /proc")
def test_latency_timed_beside_busy_processes_is_flagged_under_the_table():
    model = build_model(ModelSpec("resnet8", in_channels=1, width=8))
    example = torch.zeros(1, 1, 28, 28)
    ours = len(os.sched_getaffinity(0))  # one spinner per CPU this process may use
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(ours)]
    try:
        busy = measure(model, example, ReportConfig(latency_runs=20, warmup=2))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert busy.cpu_busy_elsewhere is not None and busy.cpu_busy_elsewhere > BUSY_ELSEWHERE_LIMIT
    caption = summary_table({"dense": busy.to_dict()}).caption
    assert "ms unreliable" in caption and "dense" in caption
    assert summary_table({"dense": {**busy.to_dict(), "cpu_busy_elsewhere": 0.05}}).caption is None
