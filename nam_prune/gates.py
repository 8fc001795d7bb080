"""NAM attention gates: a feature map weighted by its own batch-norm scale factors.

Channel gate (Liu et al., 2021, ``Channel_Att`` in the reference code)::

    out = sigmoid(w * BN(x)) * x,   w = |gamma| / sum |gamma|

and the closing gate nam-prune uses by default, whose channel is off when its gamma is 0::

    out = |gamma| * sigmoid(BN(x)) * x

The reference gate sits near sigmoid(0) = 0.5 for every channel (w averages 1/C), its
gammas get ~1/(4C) of an ordinary BN gamma's gradient and a gamma-0 channel still passes
0.5 x, so removing it is not free; the closing gate has none of these (see docs/ranking.md
for the measurements).

Spatial gate (the paper's pixel normalization): the same with a batch norm over pixel
positions, one scale lambda per pixel, so it needs the H x W it was built for.

Both are written without the reference's NCHW->NHWC permutes and ``.contiguous()``
copies; the numbers are the same (see ``tests/test_gates.py``).

In training, a gate behind a BatchNorm2d needs no statistics of its own: the host's output
has batch mean beta and variance gamma^2 var / (var + eps), so one batch-norm pass over the
host's input serves both (``gated_bn_coefficients``, ``_AffineSigmoidGate``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from nam_prune import gate_kernel
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


def _channel_sums(grad: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``sum(grad)`` and ``sum(grad * x_hat)``: on the CPU in one pass, batch norm's own
    backward reduction; CUDA's version of that op rejects the undefined weight and running stats, so
    there two plain reductions."""
    if grad.device.type != "cpu":
        return grad.sum((0, 2, 3)), (grad * x_hat).sum((0, 2, 3))
    zeros = x_hat.new_zeros(x_hat.shape[1])
    _, weighted, total = torch.ops.aten.native_batch_norm_backward(
        grad, x_hat, None, None, None, zeros, torch.ones_like(zeros), True, 0.0, [False, True, True]
    )
    return total, weighted


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``scale * x + shift`` per channel through inference batch norm: one fused pass over ``x`` on the
    CPU, where ``addcmul`` with broadcast per-channel tensors is slower."""
    return torch.batch_norm(x, scale, shift, torch.zeros_like(scale), torch.ones_like(scale), False, 0.0, 0.0, False)


Coefficients = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
"""``(mean, invstd, *params, eps, *options) -> (a, b, c, d)``: the per-channel form of a training
gate, ``out = (a x_hat + b) * sigmoid(c x_hat + d)`` with ``x_hat = (x - mean) * invstd`` and
``invstd = 1 / sqrt(var + eps)`` over the batch."""


def gated_bn_coefficients(mean, invstd, host_weight, host_bias, gate_weight, gate_bias, host_eps, gate_eps, closing, detach):
    """A BatchNorm2d host (``x_hat`` is its normalized input) followed by its NAM gate.

    The host's output ``u = host_weight x_hat + host_bias`` has batch mean ``host_bias`` and batch
    variance ``host_weight^2 var / (var + host_eps)``, so the gate's BN needs no pass of its own
    over ``u``: ``BN_gate(u) = c x_hat + gate_bias``.
    """
    variance_ratio = 1 - host_eps * invstd.square()  # var / (var + host_eps)
    c = gate_weight * host_weight * torch.rsqrt(host_weight.square() * variance_ratio + gate_eps)
    if closing:
        scale = gate_weight.abs()
        return scale * host_weight, scale * host_bias, c, gate_bias
    w = normalized_scale(gate_weight, detach)
    return host_weight, host_bias, w * c, w * gate_bias


def gate_coefficients(mean, invstd, gate_weight, gate_bias, gate_eps, closing, detach):
    """A gate on its own (after an activation, as in YOLO): ``x = x_hat / invstd + mean``, normalized by its BN."""
    if closing:
        scale = gate_weight.abs()
        return scale / invstd, scale * mean, gate_weight, gate_bias
    w = normalized_scale(gate_weight, detach)
    return 1 / invstd, mean, w * gate_weight, w * gate_bias


class _AffineSigmoidGate(torch.autograd.Function):
    """``out = (a x_hat + b) * sigmoid(c x_hat + d)`` with per-channel ``a, b, c, d`` from a
    ``Coefficients`` function of the batch mean and 1/std of ``x``.

    Every training gate has this form (a host BN and its gate included). On the CPU the fused
    kernel (``gate_kernel``) makes the passes over the map and keeps only ``x``; elsewhere one
    native batch-norm pass gives the statistics and ``x_hat``, and backward keeps ``x_hat``, the
    sigmoid and the affine part (the plain modules keep five maps). Every per-channel gradient
    (parameters, batch mean and 1/std) comes from autograd on C-sized vectors, so it is exact
    for any ``Coefficients``.
    """

    @staticmethod
    def forward(ctx, x, coefficients, eps, options, *params):
        ctx.fused = gate_kernel.applies(x)
        if ctx.fused:
            mean, var = gate_kernel.statistics(x)
            invstd = torch.rsqrt(var + eps)
        else:
            x_hat, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        a, b, c, d = coefficients(mean, invstd, *params, eps, *options)
        if ctx.fused:
            out = gate_kernel.forward(x, [mean, invstd, a, b, c, d])
            maps = (x,)
        else:
            s = torch.sigmoid_(_affine(x_hat, c, d))
            u = _affine(x_hat, a, b)
            out, maps = u * s, (x_hat, s, u)
        ctx.coefficients, ctx.eps, ctx.options, ctx.map_count = coefficients, eps, options, len(maps)
        ctx.save_for_backward(*maps, mean, invstd, *params)
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    @once_differentiable  # the kernel's gradients carry no graph: a second derivative must fail, not come out zero
    def backward(ctx, grad, _grad_mean, _grad_invstd):
        maps, (mean, invstd, *params) = ctx.saved_tensors[: ctx.map_count], ctx.saved_tensors[ctx.map_count :]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (mean, invstd, *params)]
            coefficients = ctx.coefficients(*leaves, ctx.eps, *ctx.options)
        a, b, c, d = (t.detach() for t in coefficients)
        if ctx.fused:
            (x,) = maps
            sum_gu, sum_gu_xhat, sum_gz, sum_gz_xhat = gate_kernel.backward_sums(grad, x, [mean, invstd, a, b, c, d]).to(x.dtype)
        else:
            x_hat, s, u = maps
            grad_u = grad * s
            grad_z = torch.ops.aten.sigmoid_backward(u * grad, s)
            sum_gu, sum_gu_xhat = _channel_sums(grad_u, x_hat)
            sum_gz, sum_gz_xhat = _channel_sums(grad_z, x_hat)
        sums = (sum_gu_xhat, sum_gu, sum_gz_xhat, sum_gz)  # dL/da, dL/db, dL/dc, dL/dd
        varying = [(coefficient, total) for coefficient, total in zip(coefficients, sums) if coefficient.requires_grad]
        grad_mean, grad_invstd, *grad_params = torch.autograd.grad(
            [coefficient for coefficient, _ in varying], leaves, [total for _, total in varying],
            allow_unused=True, materialize_grads=True,
        )
        # x_hat = (x - mean) invstd over the batch: batch norm's backward for dL/dx_hat = a grad_u + c grad_z,
        # plus the coefficients' own dependence on the mean (d/dx = 1/n) and on invstd (d/dx = -invstd^2 x_hat / n)
        count = grad.numel() // grad.shape[1]
        slope = -(invstd * (a * sum_gu_xhat + c * sum_gz_xhat) + grad_invstd * invstd.square()) / count
        offset = (grad_mean - invstd * (a * sum_gu + c * sum_gz)) / count
        if not ctx.needs_input_grad[0]:
            grad_x = None
        elif ctx.fused:
            grad_x = gate_kernel.backward_input(grad, x, [mean, invstd, a, b, c, d, a * invstd, c * invstd, slope, offset])
        else:
            grad_x = _affine(grad_u, a * invstd, offset).addcmul_(grad_z, _channel(c * invstd))
            grad_x.addcmul_(x_hat, _channel(slope))
        return (grad_x, None, None, None, *grad_params)


def affine_sigmoid_gate(x: torch.Tensor, coefficients: Coefficients, eps: float, options: tuple, *params: torch.Tensor):
    """``_AffineSigmoidGate`` written with plain ops: what ``torch.compile`` fuses (``nam.compile: true``)."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    a, b, c, d = coefficients(mean, invstd, *params, eps, *options)
    x_hat = (x - _channel(mean)) * _channel(invstd)
    out = (_channel(a) * x_hat + _channel(b)) * torch.sigmoid(_channel(c) * x_hat + _channel(d))
    return out, mean.detach(), invstd.detach()


_compiled_gate = None


def use_compiled_gates(enabled: bool = True) -> None:
    """Train gates through ``torch.compile(affine_sigmoid_gate, dynamic=True)``.

    Dynamic shapes: one compiled graph serves every layer's shape (no recompilation per
    feature-map size, so no ``recompile_limit``); see ``benchmarks/train_overhead.py``. Maps the
    CPU kernel runs (``gate_kernel.applies``) stay on it.
    """
    global _compiled_gate
    _compiled_gate = torch.compile(affine_sigmoid_gate, dynamic=True) if enabled else None


def _fused_gate(x: torch.Tensor, coefficients: Coefficients, eps: float, options: tuple, *params: torch.Tensor):
    """``(out, batch mean, batch invstd)``: on the CPU kernel where it applies (it beats the compiled
    gate: ``benchmarks/train_overhead.py``, docs/train_overhead*.json), else compiled after ``use_compiled_gates()``."""
    if torch._dynamo.is_compiling():  # traced with the whole model (``fit(..., compiled=True)``); torch >= 2.1
        return affine_sigmoid_gate(x, coefficients, eps, options, *params)
    if _compiled_gate is not None and not gate_kernel.applies(x):
        # parameters are shape-specialized by default: one graph per channel count otherwise
        with torch._dynamo.config.patch(force_parameter_static_shapes=False):
            return _compiled_gate(x, coefficients, eps, options, *params)
    return _AffineSigmoidGate.apply(x, coefficients, eps, options, *params)


def _uses_batch_statistics(bn: nn.Module, x: torch.Tensor) -> bool:
    """A plain BatchNorm2d normalizing a float 4-d batch with its batch statistics (exponential running average)."""
    return (
        type(bn) is nn.BatchNorm2d
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and x.dim() == 4
        and x.dtype == bn.weight.dtype
        and x.numel() // x.shape[1] > 1
    )


@torch.no_grad()
def _update_running_statistics(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What BatchNorm2d's training forward does with its batch statistics (``var`` biased; rebuilt from
    1/std it can come out a rounding error below 0 for a constant channel)."""
    bn.running_mean.lerp_(mean, bn.momentum)
    bn.running_var.lerp_(var.clamp_min(0) * (count / (count - 1)), bn.momentum)
    bn.num_batches_tracked.add_(1)


class NAMChannelGate(nn.Module):
    """Channel attention gate whose own ``BatchNorm2d`` scale is the channel importance.

    Equivalent paths: eval folds the BN into ``x * sigmoid(a x + b)``; training runs the
    fused gate (on the CPU kernel, or ``affine_sigmoid_gate`` compiled after
    ``use_compiled_gates()``) or else the plain module path (behind a host BN, ``NAMGated``
    runs host and gate as one fused function instead);
    torch-pruning's tracing always sees the plain path (it must see ``self.bn``).
    """

    def __init__(self, channels: int, grad_through_weights: bool = False, closing: bool = False, bias: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=True)
        nn.init.constant_(self.bn.bias, bias)
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

    def options(self) -> tuple:
        """The last arguments of ``gate_coefficients`` and ``gated_bn_coefficients``."""
        return (self.closing, not self.grad_through_weights)

    def fused_training(self, x: torch.Tensor) -> bool:
        return not self.tracing and _uses_batch_statistics(self.bn, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # on its own (no host BN to share statistics with) the eager plain path is faster than
        # _AffineSigmoidGate on torch ops (benchmarks/nam_gate.py); compiled or on the kernel, the fused form wins
        if self.fused_training(x) and (_compiled_gate is not None or gate_kernel.applies(x)):
            bn = self.bn
            out, mean, invstd = _fused_gate(x, gate_coefficients, bn.eps, self.options(), bn.weight, bn.bias)
            _update_running_statistics(bn, mean, invstd.square().reciprocal() - bn.eps, x.numel() // x.shape[1])
            return out
        if self.training or self.tracing or self.grad_through_weights:
            return self._plain(x)
        a, b = self.folded()
        out = x * torch.sigmoid(torch.addcmul(_channel(b), x, _channel(a)))
        return out * _channel(self.bn.weight.abs()) if self.closing else out


@torch.no_grad()
def gate_response(gate: NAMChannelGate, nodes: int = 48) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eval-mode gate over its own input distribution, ``u ~ N(running_mean, running_var)`` of its
    BN (the statistics it saw in training), by Gauss-Hermite quadrature: per channel, the ``nodes``
    inputs ``u``, the gate's outputs at them and the quadrature weights (summing to 1), in float64."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    bn = gate.bn
    device = bn.running_mean.device
    points, weights = torch.from_numpy(points).to(device), torch.from_numpy(weights / weights.sum()).to(device)
    mean, var = bn.running_mean.double(), bn.running_var.double().clamp_min(1e-12)
    u = mean[:, None] + var.sqrt()[:, None] * points[None, :]
    a, b = (t.double()[:, None] for t in gate.folded())
    out = u * torch.sigmoid(a * u + b)
    if gate.closing:
        out = out * bn.weight.double().abs()[:, None]
    return u, out, weights


@torch.no_grad()
def affine_fit(gate: NAMChannelGate, nodes: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(e, f)`` that best replace the eval-mode gate by ``e u + f``.

    Least squares over the gate's own input distribution (``gate_response``):
    ``e = Cov(u, gate(u)) / Var(u)``, ``f = E[gate(u)] - e E[u]``. Folded into the host BN,
    it lets ``strip_gates`` hand fine-tuning a model close to the gated one.
    """
    u, out, weights = gate_response(gate, nodes)
    mean, var = gate.bn.running_mean.double(), gate.bn.running_var.double().clamp_min(1e-12)
    expected = out @ weights
    slope = ((u - mean[:, None]) * out) @ weights / var
    dtype = gate.bn.weight.dtype
    return slope.to(dtype), (expected - slope * mean).to(dtype)


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

    ``opening`` blends the gated output into the host's, ``(1 - opening) gated + opening host``:
    fine-tuning raises it to 1 (``finetune.open_gates``), where removing the gates changes nothing.
    """

    opening: float = 0.0  # on the class, so gated models pickled before it existed still load

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
        if self.opening >= 1:
            return self.host(x)
        if not self.opening and self.channel.fused_training(x) and _uses_batch_statistics(self.host, x):
            hosted, out = None, self._fused_host_and_gate(x)
        else:
            hosted = self.host(x)
            out = self.channel(hosted)
        if self.spatial is not None:
            out = self.spatial(out)
        return torch.lerp(out, hosted, self.opening) if self.opening else out

    def _fused_host_and_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Host BN and channel gate in one pass over the batch statistics (``gated_bn_coefficients``)."""
        host, gate = self.host, self.channel.bn
        options = (gate.eps, *self.channel.options())
        params = (host.weight, host.bias, gate.weight, gate.bias)
        out, mean, invstd = _fused_gate(x, gated_bn_coefficients, host.eps, options, *params)
        count = x.numel() // x.shape[1]
        with torch.no_grad():  # the gate's BN saw the host output: batch mean host.bias, variance below
            variance_ratio = 1 - host.eps * invstd.square()
            _update_running_statistics(host, mean, variance_ratio / invstd.square(), count)
            _update_running_statistics(gate, host.bias, host.weight.square() * variance_ratio, count)
        return out


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


def set_gate_opening(model: nn.Module, opening: float) -> None:
    """Blend every gate of ``model`` this far (0 = gated, 1 = the host alone) into its host's output."""
    for module in model.modules():
        if isinstance(module, NAMGated):
            module.opening = opening


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
    "set_gate_opening",
    "spatial_gates",
    "normalized_scale",
]
