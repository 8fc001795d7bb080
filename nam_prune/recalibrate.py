"""Re-estimate batch-norm running statistics after pruning and at the end of every training stage.

Running statistics lag the weights: after a cut they describe channels that no longer
exist, and after a short schedule (a few dozen optimizer steps at momentum 0.1) they still
describe the early weights, so an eval-mode model can predict one class while the same
weights score well in train mode. Resetting them and averaging over N batches in train
mode, without gradients (adaptive BN, Li et al., ECCV 2020; ``torch.optim.swa_utils.update_bn``
does the same for SWA) fixes both. Spatial gates' pixel statistics are re-estimated too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from nam_prune import distributed
from nam_prune.config import bounded
from nam_prune.gates import NAMSpatialGate


@dataclass
class RecalibrateConfig:
    """batches: training batches averaged into the statistics (0 turns recalibration off)."""

    batches: int = bounded(25, low=0)


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, config: RecalibrateConfig, device: torch.device) -> int:
    """Reset every BN's (and spatial gate's) running statistics and re-estimate them as the plain
    average over ``config.batches`` batches of ``loader`` (each an (images, ...) tuple); returns the
    batches used (0, and nothing changed, when ``config.batches`` is 0). Under torchrun the ranks
    average their estimates, so every rank ends with the same statistics."""
    batches = config.batches
    if batches == 0:
        return 0
    norms = _norms(model)
    spatial = [m for m in model.modules() if isinstance(m, NAMSpatialGate)]
    momenta = [m.momentum for m in norms], [m.momentum for m in spatial]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches seen
    model.train()
    used = 0
    try:
        for images, *_ in loader:
            if used == batches:
                break
            used += 1
            for gate in spatial:  # running += (batch - running) / k: the same cumulative average
                gate.momentum = 1.0 / used
            model(images.to(device, non_blocking=True))
    finally:
        for norm, momentum in zip(norms, momenta[0]):
            norm.momentum = momentum
        for gate, momentum in zip(spatial, momenta[1]):
            gate.momentum = momentum
        model.train(was_training)
    distributed.average_buffers([t for m in norms for t in (m.running_mean, m.running_var)])
    distributed.average_buffers([t for m in spatial for t in (m.running_mean, m.running_var)])
    return used
