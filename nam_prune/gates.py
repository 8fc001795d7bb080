"""NAM attention gates: a feature map weighted by its own batch-norm scale factors.

Channel gate (Liu et al., 2021, ``Channel_Att`` in the reference code)::

    out = sigmoid(w * BN(x)) * x,   w = |gamma| / sum |gamma|

Spatial gate (the paper's pixel normalization): the same with a batch norm over pixel
positions, one scale lambda per pixel, so it needs the H x W it was built for.

Both are written without the reference's NCHW->NHWC permutes and ``.contiguous()``
copies; the numbers are the same (see ``tests/test_gates.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nam_prune.errors import NamPruneError


def normalized_scale(scale: torch.Tensor, detach: bool) -> torch.Tensor:
    """Return ``|scale| / sum |scale|``; detached like the reference (``gamma.data``) unless asked."""
    magnitude = scale.detach().abs() if detach else scale.abs()
    return magnitude / magnitude.sum()


class NAMChannelGate(nn.Module):
    """Channel attention gate whose own ``BatchNorm2d`` scale is the channel importance."""

    def __init__(self, channels: int, grad_through_weights: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=True)
        self.grad_through_weights = grad_through_weights

    @property
    def gamma(self) -> torch.Tensor:
        return self.bn.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = normalized_scale(self.bn.weight, detach=not self.grad_through_weights)
        return x * torch.sigmoid(self.bn(x) * w.view(1, -1, 1, 1))


class NAMSpatialGate(nn.Module):
    """Pixel attention gate: batch norm over pixel positions (statistics over batch and channels).

    The statistics are computed with reductions that broadcast over channels, so the
    gate never reshapes the channel axis and torch-pruning can prune through it.
    """

    def __init__(
        self,
        height: int,
        width: int,
        grad_through_weights: bool = False,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.grad_through_weights = grad_through_weights
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(height, width))
        self.bias = nn.Parameter(torch.zeros(height, width))
        self.register_buffer("running_mean", torch.zeros(height, width))
        self.register_buffer("running_var", torch.ones(height, width))
        self.bypass = False  # set while torch-pruning traces: the gate couples no channels

    @property
    def gamma(self) -> torch.Tensor:
        return self.weight

    def _pixel_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var, mean = torch.var_mean(x, dim=(0, 1), correction=0)
            with torch.no_grad():
                count = x.shape[0] * x.shape[1]
                unbiased = var * (count / max(count - 1, 1))
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise NamPruneError(
                f"spatial NAM gate was built for {self.height}x{self.width} inputs but got "
                f"{x.shape[-2]}x{x.shape[-1]}; feed the input size given at insertion "
                "(data image size) or set nam.spatial: false"
            )
        w = normalized_scale(self.weight, detach=not self.grad_through_weights)
        return x * torch.sigmoid(self._pixel_norm(x) * w)


class NAMGated(nn.Module):
    """A host layer (usually a BatchNorm2d) followed by NAM gates on its output.

    Replacing the host keeps the parent model's forward code untouched, which is what
    makes insertion work on any ``nn.Module`` whose layers are attributes.
    """

    def __init__(
        self,
        host: nn.Module,
        channel: NAMChannelGate,
        spatial: NAMSpatialGate | None = None,
    ) -> None:
        super().__init__()
        self.host = host
        self.channel = channel
        self.spatial = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.channel(self.host(x))
        return self.spatial(out) if self.spatial is not None else out


def channel_gates(model: nn.Module) -> list[tuple[str, NAMChannelGate]]:
    """All channel gates of a model, found through any wrapper (DDP, DataParallel, compile)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NAMChannelGate)]


def spatial_gates(model: nn.Module) -> list[tuple[str, NAMSpatialGate]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NAMSpatialGate)]


__all__ = [
    "NAMChannelGate",
    "NAMSpatialGate",
    "NAMGated",
    "channel_gates",
    "spatial_gates",
    "normalized_scale",
]
