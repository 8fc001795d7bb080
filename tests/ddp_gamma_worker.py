"""Run under torchrun by tests/test_distributed.py: sparsity-train under DDP, dump this rank's NAM gammas."""

import sys
from pathlib import Path

import torch

from nam_prune import distributed
from nam_prune.data import DataConfig, load_data
from nam_prune.gates import NAMChannelGate
from nam_prune.models import ModelSpec, build_model
from nam_prune.surgery import NAMConfig, insert_nam
from nam_prune.train import TrainConfig, fit

if __name__ == "__main__":
    device = torch.device("cpu")
    distributed.init_from_env(device)
    torch.manual_seed(0)
    data = load_data(DataConfig(name="digits", batch_size=32), seed=0)
    model = insert_nam(build_model(ModelSpec("resnet8", in_channels=1, width=8)), NAMConfig())
    fit(model, data.train, TrainConfig(epochs=1, lr=0.05, penalty=1e-3), device, "ddp")
    gammas = [m.gamma.detach().clone() for m in model.modules() if isinstance(m, NAMChannelGate)]
    torch.save(gammas, Path(sys.argv[1]) / f"gamma_rank{distributed.rank()}.pt")
    distributed.shutdown()
