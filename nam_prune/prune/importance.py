"""Stage 3: rank channels by the NAM gates' normalized |gamma| (a torch-pruning ``Importance``)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.gates import NAMChannelGate

Normalizer = Literal["mean", "sum", "max", "none"]


def normalize_scores(magnitude: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """Make one gate's |gamma| comparable with other layers'.

    ``sum`` is NAM's own ``w = |gamma|/sum|gamma|``: it averages 1/C, so in a global
    ranking wide layers always look less important. ``mean`` (``w * C``, the default)
    removes that bias: 1.0 is an average channel in any layer. ``max`` scales by the
    layer's strongest channel; ``none`` compares raw |gamma| (network-slimming style).
    """
    eps = torch.finfo(magnitude.dtype).tiny
    if normalizer == "sum":
        return magnitude / (magnitude.sum() + eps)
    if normalizer == "mean":
        return magnitude / (magnitude.mean() + eps)
    if normalizer == "max":
        return magnitude / (magnitude.max() + eps)
    return magnitude


class NAMImportance(tp.importance.Importance):
    """Score each channel of a torch-pruning group by the NAM gates on it.

    Every NAM gate norm in the group contributes its normalized |gamma| at the
    group's root indices; channels covered by several gates (a residual stream)
    take the mean. Groups with no gate use the host BNs' |gamma| (``fallback='bn'``)
    or are skipped (``None``).
    """

    def __init__(self, model: nn.Module, normalizer: Normalizer = "mean", fallback: str = "bn") -> None:
        self.gate_norms = {m.bn for m in model.modules() if isinstance(m, NAMChannelGate)}
        self.normalizer = normalizer
        self.fallback = fallback

    def magnitude(self, norm: nn.BatchNorm2d, is_gate: bool) -> torch.Tensor:
        """One norm's per-channel score before ``normalize_scores``: its |gamma|."""
        return norm.weight.detach().abs().float().cpu()

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        size = len(group[0].idxs)
        sums = {True: torch.zeros(size), False: torch.zeros(size)}
        counts = {True: torch.zeros(size), False: torch.zeros(size)}
        for item in group:
            norm = item.dep.target.module
            if not isinstance(norm, nn.BatchNorm2d) or norm.weight is None:
                continue
            is_gate = norm in self.gate_norms
            scores = normalize_scores(self.magnitude(norm, is_gate), self.normalizer)
            root = torch.as_tensor([int(i) for i in item.root_idxs], dtype=torch.long)
            local = torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)
            sums[is_gate].index_add_(0, root, scores[local])
            counts[is_gate].index_add_(0, root, torch.ones(len(root)))
        if counts[True].any():
            gate_score = sums[True] / counts[True].clamp(min=1)
            host_score = sums[False] / counts[False].clamp(min=1)
            uncovered = counts[True] == 0
            return torch.where(uncovered, host_score if self.fallback == "bn" else torch.inf, gate_score)
        if self.fallback == "bn" and counts[False].any():
            return sums[False] / counts[False].clamp(min=1)
        return None
