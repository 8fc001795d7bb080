"""Latency figures say when they cannot be trusted: another process on the CPU while they were timed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nam_prune.measure import (
    BUSY_ELSEWHERE_LIMIT,
    THREAD_VARIABLES,
    CpuTicks,
    ReportConfig,
    busy_elsewhere,
    cpu_quota,
    fit_threads_to_quota,
    measure,
)
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
        busy = measure(model, example, ReportConfig(latency_runs=10, warmup=1))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert busy.cpu_busy_elsewhere is not None and busy.cpu_busy_elsewhere > BUSY_ELSEWHERE_LIMIT
    caption = summary_table({"dense": busy.to_dict()}).caption
    assert "ms unreliable" in caption and "dense" in caption
    assert summary_table({"dense": {**busy.to_dict(), "cpu_busy_elsewhere": 0.05}}).caption is None


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, docker --cpus 1.5
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbled"}, None),
        ({"cpu.max": "-50000 100000"}, None),  # no kernel writes a negative quota: ignored, not 1 thread
        ({}, None),
    ],
)
def test_cpu_quota_reads_both_cgroup_versions(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path, tmp_path / "no_membership_file") == expected


def _cgroup_v1(folder: Path, quota: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.cfs_quota_us").write_text(quota)
    (folder / "cpu.cfs_period_us").write_text("100000")


def test_cpu_quota_takes_the_tightest_limit_up_the_process_cgroup(tmp_path):
    _cgroup_v1(tmp_path / "cpu", "-1")
    _cgroup_v1(tmp_path / "cpu" / "slice", "150000")
    _cgroup_v1(tmp_path / "cpu" / "slice" / "job", "-1")
    membership = tmp_path / "membership"
    membership.write_text("4:memory:/other\n2:cpu,cpuacct:/slice/job\nnot a cgroup line\n")
    assert cpu_quota(tmp_path, membership) == 1.5  # set on the parent slice, none on the job itself
    _cgroup_v1(tmp_path / "cpu", "100000")
    membership.write_text("2:cpu,cpuacct:/docker/abc\n")  # a container shown its own cgroup as the root
    assert cpu_quota(tmp_path, membership) == 1.0
    membership.write_text("2:cpu,cpuacct:/\n0::/\n")  # a hybrid host: no cpu.max at the v2 root
    assert cpu_quota(tmp_path, membership) == 1.0


def test_cpu_quota_reads_a_cgroup_v2_path(tmp_path):
    (tmp_path / "pod" / "box").mkdir(parents=True)
    (tmp_path / "pod" / "cpu.max").write_text("50000 100000\n")
    (tmp_path / "pod" / "box" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "membership").write_text("0::/pod/box\n")
    assert cpu_quota(tmp_path, tmp_path / "membership") == 0.5
    (tmp_path / "pod" / "cpu.max").write_text("50000 0\n")  # malformed: ignored, not a crash
    assert cpu_quota(tmp_path, tmp_path / "membership") is None


def test_threads_follow_the_quota_unless_the_user_chose(monkeypatch):
    """(conftest's autouse fixture restores the thread count afterwards.)"""
    monkeypatch.setattr(sys.modules["nam_prune.measure"], "cpu_quota", lambda: 0.5)  # the package exports a function of that name
    for chosen in THREAD_VARIABLES:
        monkeypatch.delenv(chosen, raising=False)
    torch.set_num_threads(2)
    for chosen in THREAD_VARIABLES:
        monkeypatch.setenv(chosen, "2")
        fit_threads_to_quota()
        assert torch.get_num_threads() == 2
        monkeypatch.delenv(chosen)
    fit_threads_to_quota()
    assert torch.get_num_threads() == 1  # half a CPU's quota still runs one thread
