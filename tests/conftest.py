"""Shared fixtures: tiny models and tiny real data (scikit-learn digits, Fashion-MNIST)."""

import contextlib
import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nam_prune.cli import main
from nam_prune.data import DEFAULT_ROOTS, DataConfig, load_data
from nam_prune.models import ModelSpec, build_model
from nam_prune.surgery import NAMConfig, insert_nam

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never reach for the hub in tests

FASHION_ROOT = Path(DEFAULT_ROOTS["fashion_mnist"])
ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "recipes" / "fashion_quickstart.yaml")
TINY = [  # the quickstart at its smallest real size: a few hundred Fashion-MNIST images, seconds per stage
    "model.name=resnet8", "data.train_subset=512", "data.test_subset=256", "data.batch_size=32",
    "sparsity.epochs=3", "sparsity.optimizer=adamw", "sparsity.lr=0.005",
    "finetune.epochs=3", "finetune.optimizer=adamw", "finetune.lr=0.005",
    "report.latency_runs=2", "report.warmup=0",
]


@dataclass
class CliResult:
    """What a ``nam-prune`` command returned and printed (the fields of ``subprocess.CompletedProcess``)."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: Path = ROOT) -> CliResult:
    """Run ``nam-prune ARGS`` in this process, as the console script does (``cli.main``), in ``cwd``.

    A fresh interpreter per command costs seconds of imports; the few tests that need a real
    process (signals, torchrun, the console script itself) start one."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    code: int | str | None = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as done:
                code = done.code
    finally:
        os.chdir(previous)
    return CliResult(code if isinstance(code, int) else int(code is not None), out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _isolated():
    """Seeded, and with what a command run in-process (``cli``) changes put back: torch's thread
    count (``fit_threads_to_quota`` under a CPU quota) and the ``nam_prune`` logger, which the CLI
    points at its rich console and stops from propagating (``caplog`` reads propagated records)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    logger = logging.getLogger("nam_prune")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    torch.set_num_threads(threads)
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@pytest.fixture
def tiny_nam_resnet():
    """ResNet-8 (width 8) on 1x28x28 with a NAM gate on every BN."""
    model = build_model(ModelSpec("resnet8", num_classes=10, in_channels=1, width=8))
    return insert_nam(model, NAMConfig())


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST missing in {FASHION_ROOT}: apt-get install -y dataset-fashion-mnist")
    return FASHION_ROOT


@pytest.fixture(scope="session")
def fashion_small(fashion_root):
    """A few hundred real Fashion-MNIST images."""
    return load_data(DataConfig(name="fashion_mnist", train_subset=512, test_subset=256, batch_size=64))


def cli_process(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``nam-prune ARGS`` in a process of its own: for signals, torchrun, and what the console
    script itself prints (ultralytics' own log handlers write to the real stdout)."""
    env = {**os.environ, "COLUMNS": "120"}
    command = [sys.executable, "-m", "nam_prune", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
