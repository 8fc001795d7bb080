"""Two CPU processes with gloo under torchrun: identical gammas, one set of files, a reloadable result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nam_prune

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.name=resnet8", "data.train_subset=512", "data.test_subset=256", "data.batch_size=32",
    "sparsity.epochs=1", "sparsity.optimizer=adamw", "sparsity.lr=0.005",
    "finetune.epochs=1", "finetune.optimizer=adamw", "finetune.lr=0.005",
    "report.latency_runs=2", "report.warmup=0", "report.baseline=false",
]


@pytest.mark.slow  # the fast run below checks the same through check_replicas_identical after every stage
def test_gammas_stay_bit_identical_across_ranks(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "ddp_gamma_worker.py"), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "gamma_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "gamma_rank1.pt", weights_only=True)
    assert len(rank0) == 9
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))
    assert not all(torch.equal(a, torch.ones_like(a)) for a in rank0)  # the penalty and data moved them


def test_two_process_run_writes_one_reloadable_result(tmp_path, fashion_root):
    command = [sys.executable, "-m", "nam_prune", "run", str(ROOT / "recipes" / "fashion_quickstart.yaml"),
               *TINY, "--nproc", "2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["fashion_quickstart"]
    folder = tmp_path / "runs" / "fashion_quickstart"
    assert sorted(p.name for p in folder.iterdir()) == ["dense.pt", "model.pt", "results.json"]
    results = json.loads((folder / "results.json").read_text())
    assert results["processes"] == 2 and result.stderr.count("saved ") == 1
    assert results["after"]["macs"] <= 0.5 * results["before"]["macs"]
    model = nam_prune.load(folder / "model.pt")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow  # 10 s; the one-line error of a single process is in the fast set (test_end_to_end, test_robustness)
def test_failing_worker_ends_the_job_with_one_line(tmp_path, fashion_root):
    command = [sys.executable, "-m", "nam_prune", "run", str(ROOT / "recipes" / "fashion_quickstart.yaml"),
               *TINY, "sparsity.optimizer=sgd", "sparsity.lr=1e30", "--nproc", "2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "loss became" in result.stderr and "worker rank" in result.stderr
    assert "Traceback" not in result.stderr
