"""Stage 2a: the NAM sparsity penalty ``p * sum|gamma| + p * sum|lambda|``.

Applied as an L1 subgradient (``p * sign``) added to the gate scales' gradients after the
backward pass. The gates are found with ``model.modules()``, which walks through
DataParallel, DistributedDataParallel and ``torch.compile`` wrappers alike; the reference
code walks ``model._modules`` for ``layer1..4`` and silently does nothing once wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from nam_prune.gates import NAMChannelGate, NAMSpatialGate, channel_gates


def gate_scales(model: nn.Module) -> list[torch.Tensor]:
    """The penalised parameters: every channel gate's gamma and every spatial gate's lambda."""
    return [m.gamma for m in model.modules() if isinstance(m, (NAMChannelGate, NAMSpatialGate))]


def batchnorm_scales(model: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm2d gamma: what network slimming (Liu et al., 2017) penalises."""
    return [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]


@torch.no_grad()
def apply_sparsity_penalty(
    model: nn.Module, strength: float, scales: Callable[[nn.Module], list[torch.Tensor]] = gate_scales
) -> float:
    """Add ``strength * sign(scale)`` to each penalised scale's gradient; return the penalty value."""
    total = 0.0
    for scale in scales(model):
        if strength > 0 and scale.grad is not None:
            scale.grad.add_(torch.sign(scale), alpha=strength)
        total += float(scale.abs().sum())
    return strength * total


@dataclass
class GammaStats:
    """How sparse the channel gates are: the number logged each epoch."""

    channels: int
    near_zero: int
    threshold: float
    dead_layers: list[str]

    def __str__(self) -> str:
        return f"{self.near_zero}/{self.channels} NAM gamma < {self.threshold:g}"


@torch.no_grad()
def gamma_stats(model: nn.Module, threshold: float = 1e-2) -> GammaStats:
    """Count near-zero NAM gammas and name the gates whose gammas are *all* near zero."""
    gates = [(name, m.gamma.abs()) for name, m in channel_gates(model)]
    if not gates:
        return GammaStats(0, 0, threshold, [])
    flat = torch.cat([g for _, g in gates])
    dead = [name for name, g in gates if bool((g < threshold).all())]
    return GammaStats(flat.numel(), int((flat < threshold).sum()), threshold, dead)
