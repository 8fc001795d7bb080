"""NAM attention gates: a feature map weighted by its own batch-norm scale factors.

Channel gate (Liu et al., 2021, ``Channel_Att`` in the reference code)::

    out = sigmoid(w * BN(x)) * x,   w = |gamma| / sum |gamma|

and the closing gate nam-prune uses by default, whose channel is off when its gamma is 0::

    out = |gamma| * sigmoid(BN(x)) * x

The reference gate sits near sigmoid(0) = 0.5 for every channel (w averages 1/C), its
gammas get ~1/(4C) of an ordinary BN gamma's gradient and a gamma-0 channel still passes
0.5 x, so removing it is not free; the closing gate has none of these (see the README's
"Does NAM help?" for the measurements).

Spatial gate (the paper's pixel normalization): the same with a batch norm over pixel
positions, one scale lambda per pixel, so it needs the H x W it was built for.

Both are written without the reference's NCHW->NHWC permutes and ``.contiguous()``
copies; the numbers are the same (see ``tests/test_gates.py``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from nam_prune.errors import NamPruneError


def normalized_scale(scale: torch.Tensor, detach: bool) -> torch.Tensor:
    """Return ``|scale| / sum |scale|``; detached like the reference (``gamma.data``) unless asked.

    A gate whose scales all reached zero gets ``w = 0`` (a constant 0.5 gate) instead of the
    reference's 0/0 = NaN, which would poison the whole loss.
    """
    magnitude = scale.detach().abs() if detach else scale.abs()
    return magnitude / magnitude.sum().clamp_min(torch.finfo(magnitude.dtype).tiny)


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


class _TrainChannelGate(torch.autograd.Function):
    """Train-mode channel gate in one function that saves only ``x`` and per-channel vectors.

    With batch statistics (mean, invstd) and w detached, the gate is
    ``x * sigmoid(a x + b)`` with per-channel ``a = w g invstd``, ``b = w (beta - g mean invstd)``;
    backward recomputes the sigmoid instead of keeping BN(x), z and sigmoid(z) alive, and
    folds the batch-norm gradient into per-channel coefficients (no x-hat tensor).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, w):
        a = w * weight * invstd
        b = w * (bias - mean * weight * invstd)
        out = torch.sigmoid(torch.addcmul(_channel(b), x, _channel(a))).mul_(x)
        ctx.save_for_backward(x, weight, mean, invstd, w, a, b)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, w, a, b = ctx.saved_tensors
        s = torch.sigmoid(torch.addcmul(_channel(b), x, _channel(a)))
        grad_x = grad * s  # direct path: d(x * s)/dx with s held fixed
        grad_z = s.mul_(1 - s).mul_(grad).mul_(x)  # dL/dz, z = w (g x-hat + beta); reuses s's storage
        dims = (0, 2, 3)
        count = x.numel() / x.shape[1]
        sum_gz = grad_z.sum(dims)
        sum_gz_x = (grad_z * x).sum(dims)
        # dL/dgamma = sum(gz w x-hat), dL/dbeta = sum(gz w), with x-hat = (x - mean) invstd
        grad_weight = w * invstd * (sum_gz_x - mean * sum_gz)
        grad_bias = w * sum_gz
        # batch-norm backward through the batch statistics, as per-channel coefficients of gz, x and 1
        c = w * weight * invstd
        k = invstd * (sum_gz_x - mean * sum_gz) / count
        coeff_x = -c * invstd * k
        const = -c * sum_gz / count + c * invstd * k * mean
        grad_x.addcmul_(grad_z, _channel(c)).addcmul_(x, _channel(coeff_x)).add_(_channel(const))
        return grad_x, grad_weight, grad_bias, None, None, None


def train_channel_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Batch statistics, running-stat update (as BatchNorm2d does) and the fused gate."""
    with torch.no_grad():
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        count = x.numel() // x.shape[1]
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var * (count / (count - 1)), momentum)
        num_batches_tracked.add_(1)
        w = normalized_scale(weight, detach=True)
    return _TrainChannelGate.apply(x, weight, bias, mean, torch.rsqrt(var + eps), w)


_compiled_train_gate = None


def use_compiled_gates(enabled: bool = True) -> None:
    """Train channel gates through ``torch.compile(train_channel_gate)``.

    Measured in ``benchmarks/nam_gate.py`` (2 CPU cores): fused kernels take ~0.25x the
    reference's forward+backward time and keep half its activation memory on large maps,
    for a few seconds of compilation per shape. Eager, the plain module path is faster than
    the same function uncompiled (many small passes), so it stays the default.
    """
    global _compiled_train_gate
    _compiled_train_gate = torch.compile(train_channel_gate) if enabled else None


class NAMChannelGate(nn.Module):
    """Channel attention gate whose own ``BatchNorm2d`` scale is the channel importance.

    Equivalent paths: eval folds the BN into ``x * sigmoid(a x + b)``; training runs the
    plain module path, or the compiled ``train_channel_gate`` after ``use_compiled_gates()``;
    torch-pruning's tracing always sees the plain path (it must see ``self.bn``).
    """

    def __init__(self, channels: int, grad_through_weights: bool = False, closing: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=True)
        self.grad_through_weights = grad_through_weights
        self.closing = closing
        self.tracing = False

    @property
    def gamma(self) -> torch.Tensor:
        return self.bn.weight

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(a, b)`` of the eval-mode gate ``x * sigmoid(a x + b)`` (times |gamma| if closing)."""
        bn = self.bn
        invstd = torch.rsqrt(bn.running_var + bn.eps)
        a, b = bn.weight * invstd, bn.bias - bn.running_mean * bn.weight * invstd
        if self.closing:
            return a, b
        w = normalized_scale(bn.weight, detach=True)
        return w * a, w * b

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        if self.closing:
            if self.tracing:  # the same channel coupling; the |gamma| factor only scales
                return x * torch.sigmoid(self.bn(x))
            return x * _channel(self.bn.weight.abs()) * torch.sigmoid(self.bn(x))
        w = normalized_scale(self.bn.weight, detach=not self.grad_through_weights)
        return x * torch.sigmoid(self.bn(x) * _channel(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = not (self.tracing or self.grad_through_weights or self.closing)
        if self.training and _compiled_train_gate is not None and fused:
            bn = self.bn
            if x.numel() // x.shape[1] > 1 and bn.momentum is not None:
                return _compiled_train_gate(
                    x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps
                )
        if self.training or self.tracing or self.grad_through_weights:
            return self._plain(x)
        a, b = self.folded()
        out = x * torch.sigmoid(torch.addcmul(_channel(b), x, _channel(a)))
        return out * _channel(self.bn.weight.abs()) if self.closing else out


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
        self.tracing = False  # set while torch-pruning traces: the gate couples no channels

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
        if self.tracing:
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


@contextlib.contextmanager
def tracing_mode(model: nn.Module):
    """Run every gate through its plain module path, the form torch-pruning traces and counts.

    Channel gates call their ``bn`` module (so it is pruned with its channels and its
    MACs are counted); spatial gates become identities (they couple no channels).
    """
    gates = [m for m in model.modules() if isinstance(m, (NAMChannelGate, NAMSpatialGate))]
    for gate in gates:
        gate.tracing = True
    try:
        yield
    finally:
        for gate in gates:
            gate.tracing = False


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
