"""Stage 2a: the sparsity penalty on the NAM gate scales (gamma, and lambda of spatial gates).

``l1`` is the paper's ``p * sum|gamma|``: it shrinks every gamma of a layer together.
``polarization`` (Zhuang et al., NeurIPS 2020) is ``p * (t * sum|gamma| - sum|gamma - mean(gamma)|)``
per layer, with the scales kept in [0, 1]: it pushes the unimportant gammas to exactly 0 and the
rest towards 1, so a cut at the gap removes channels that were already off. Both are applied as
subgradients added to the scales' gradients after the backward pass. The gates are found with ``model.modules()``, which walks through
DataParallel, DistributedDataParallel and ``torch.compile`` wrappers alike; the reference
code walks ``model._modules`` for ``layer1..4`` and silently does nothing once wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn

from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, NAMSpatialGate, channel_gates


def gate_scales(model: nn.Module) -> list[torch.Tensor]:
    """The penalised parameters: every channel gate's gamma and every spatial gate's lambda."""
    return [m.gamma for m in model.modules() if isinstance(m, (NAMChannelGate, NAMSpatialGate))]


def batchnorm_scales(model: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm2d gamma: what network slimming (Liu et al., 2017) penalises."""
    return [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]


Regularizer = Literal["polarization", "l1"]
RegularizerChoice = Literal["auto", "polarization", "l1"]
"""What a recipe may ask for: ``auto`` is resolved per model (``surgery.resolved_regularizer``)."""
Scales = Callable[[nn.Module], list[torch.Tensor]]


@torch.no_grad()
def apply_sparsity_penalty(
    model: nn.Module,
    strength: float,
    scales: Scales = gate_scales,
    regularizer: Regularizer = "l1",
    spread: float = 1.2,
) -> float:
    """Add the regularizer's subgradient times ``strength`` to each penalised scale's gradient
    (``spread`` is polarization's t); return the penalty value."""
    if regularizer not in ("polarization", "l1"):  # "auto" is resolved per model before training
        raise NamPruneError(f"sparsity regularizer {regularizer!r} reached the penalty unresolved: expected polarization or l1")
    total = 0.0
    for scale in scales(model):
        if regularizer == "polarization":
            centred = scale - scale.mean()
            side = torch.sign(centred)
            step = spread * torch.sign(scale) - side + side.mean()
            value = spread * scale.abs().sum() - centred.abs().sum()
        else:
            step, value = torch.sign(scale), scale.abs().sum()
        if strength > 0 and scale.grad is not None:
            scale.grad.add_(step, alpha=strength)
        total += float(value)
    return strength * total


@torch.no_grad()
def clamp_scales(model: nn.Module, scales: Scales = gate_scales) -> None:
    """Keep polarized scales in [0, 1] (after every optimizer step), as Zhuang et al. do."""
    for scale in scales(model):
        scale.clamp_(0.0, 1.0)


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
