"""Shared fixtures: tiny models and tiny real data (scikit-learn digits, Fashion-MNIST)."""

import os
from pathlib import Path

import pytest
import torch

from nam_prune.data import DEFAULT_ROOTS, DataConfig, load_data
from nam_prune.models import ModelSpec, build_model
from nam_prune.surgery import NAMConfig, insert_nam

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never reach for the hub in tests

FASHION_ROOT = Path(DEFAULT_ROOTS["fashion_mnist"])


@pytest.fixture(autouse=True)
def _deterministic():
    """Seeded, and with torch's thread count restored: a CLI call in-process under a CPU quota
    (``fit_threads_to_quota``) would otherwise change it for every later test."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
