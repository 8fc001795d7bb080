"""The NAM gates reproduce the published formulas exactly, without the reference's permutes."""

import pytest
import torch
import torch.nn as nn

from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, NAMSpatialGate

SHAPES = [(4, 8, 5, 5), (2, 16, 7, 3), (8, 3, 1, 1), (3, 32, 4, 6)]


class ReferenceChannelAtt(nn.Module):
    """The reference ``Channel_Att`` (Christian-lyc/NAM), written out with its permutes."""

    def __init__(self, channels: int, detach: bool = True):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(channels, affine=True)
        self.detach = detach

    def forward(self, x):
        residual = x
        x = self.bn2(x)
        gamma = self.bn2.weight.data if self.detach else self.bn2.weight
        weight_bn = gamma.abs() / torch.sum(gamma.abs())
        x = x.permute(0, 2, 3, 1).contiguous()
        x = torch.mul(weight_bn, x)
        x = x.permute(0, 3, 1, 2).contiguous()
        return torch.sigmoid(x) * residual


class ReferencePixelAtt(nn.Module):
    """Pixel normalization written the slow way: BatchNorm1d over H*W features of a permuted tensor."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(height * width, affine=True)

    def forward(self, x):
        n, c, h, w = x.shape
        pixels = x.reshape(n, c, h * w).permute(0, 2, 1).contiguous()  # (N, HW, C)
        normed = self.bn(pixels)
        lam = self.bn.weight.data
        weighted = normed * (lam.abs() / lam.abs().sum()).view(1, -1, 1)
        return torch.sigmoid(weighted.permute(0, 2, 1).reshape(n, c, h, w)) * x


def _forward_backward_both(ours, ref, shape, generator):
    """Same input and upstream gradient through both modules; returns both inputs and outputs."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_ref = ours(x_ours), ref(x_ref)
    upstream = torch.randn(out_ref.shape, generator=generator, dtype=torch.float64)
    (out_ours * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    torch.testing.assert_close(out_ours, out_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-6, rtol=0)


def _randomize_bn(bn_weight, bn_bias, generator):
    with torch.no_grad():
        bn_weight.copy_(torch.randn(bn_weight.shape, generator=generator))
        bn_bias.copy_(torch.randn(bn_bias.shape, generator=generator))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("grad_through_weights", [False, True])
def test_channel_gate_matches_reference(shape, train, grad_through_weights):
    g = torch.Generator().manual_seed(0)
    ours = NAMChannelGate(shape[1], grad_through_weights=grad_through_weights).double()
    ref = ReferenceChannelAtt(shape[1], detach=not grad_through_weights).double()
    _randomize_bn(ours.bn.weight, ours.bn.bias, g)
    ref.load_state_dict({k.replace("bn.", "bn2."): v for k, v in ours.state_dict().items()})
    if not train:  # give the running statistics non-trivial values first
        x_warm = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
        ours.train()(x_warm), ref.train()(x_warm)
    ours.train(train), ref.train(train)
    _forward_backward_both(ours, ref, shape, g)
    torch.testing.assert_close(ours.bn.weight.grad, ref.bn2.weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bn.bias.grad, ref.bn2.bias.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bn.running_mean, ref.bn2.running_mean, atol=1e-6, rtol=0)


def test_grad_through_weights_changes_gamma_gradient():
    """With w detached gamma learns only through BN(x); the option adds the path through w."""
    x = torch.randn(4, 6, 3, 3)
    detached, flowing = NAMChannelGate(6), NAMChannelGate(6, grad_through_weights=True)
    flowing.load_state_dict(detached.state_dict())
    with torch.no_grad():
        for gate in (detached, flowing):
            gate.bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
    detached(x).sum().backward()
    flowing(x).sum().backward()
    assert not torch.allclose(detached.bn.weight.grad, flowing.bn.weight.grad, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train", [True, False])
def test_spatial_gate_matches_pixel_batchnorm(shape, train):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(1)
    ours = NAMSpatialGate(h, w).double()
    ref = ReferencePixelAtt(h, w).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(h, w, generator=g))
        ours.bias.copy_(torch.randn(h, w, generator=g))
        ref.bn.weight.copy_(ours.weight.flatten())
        ref.bn.bias.copy_(ours.bias.flatten())
    if not train:
        x_warm = torch.randn(shape, generator=g, dtype=torch.float64) * 2 - 1
        ours.train()(x_warm), ref.train()(x_warm)
        torch.testing.assert_close(ours.running_var.flatten(), ref.bn.running_var, atol=1e-6, rtol=0)
    ours.train(train), ref.train(train)
    _forward_backward_both(ours, ref, shape, g)
    torch.testing.assert_close(ours.weight.grad.flatten(), ref.bn.weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bias.grad.flatten(), ref.bn.bias.grad, atol=1e-6, rtol=0)


def test_spatial_gate_rejects_other_input_size():
    gate = NAMSpatialGate(8, 8)
    with pytest.raises(NamPruneError, match="built for 8x8 inputs but got 16x16"):
        gate(torch.randn(2, 4, 16, 16))


def test_eval_gate_folds_to_affine_sigmoid():
    """At inference the gate is x * sigmoid(a x + b); it equals the unfolded BN path."""
    gate = NAMChannelGate(16)
    with torch.no_grad():
        gate.bn.weight.uniform_(-2, 2)
        gate.bn.bias.uniform_(-1, 1)
    gate.train()(torch.randn(8, 16, 6, 6) * 2 + 0.5)
    gate.eval()
    x = torch.randn(4, 16, 6, 6)
    folded = gate(x)
    gate.tracing = True
    torch.testing.assert_close(folded, gate(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_fused_train_gate_matches_plain_path(shape):
    """train_channel_gate (what use_compiled_gates compiles) equals the module's plain path."""
    from nam_prune.gates import train_channel_gate

    plain, fused = NAMChannelGate(shape[1]).double(), NAMChannelGate(shape[1]).double()
    with torch.no_grad():
        plain.bn.weight.uniform_(-2, 2)
        plain.bn.bias.uniform_(-1, 1)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain = plain.train()(xa)
    bn = fused.bn
    out_fused = train_channel_gate(
        xb, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps
    )
    upstream = torch.randn(shape, dtype=torch.float64)
    (out_plain * upstream).sum().backward()
    (out_fused * upstream).sum().backward()
    torch.testing.assert_close(out_fused, out_plain, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(bn.weight.grad, plain.bn.weight.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(bn.bias.grad, plain.bn.bias.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(bn.running_var, plain.bn.running_var)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.slow
def test_compiled_training_gate_matches_plain_path():
    """nam.compile: the torch.compile'd fused gate gives the plain path's outputs and gradients."""
    from nam_prune.gates import use_compiled_gates

    plain, compiled = NAMChannelGate(16), NAMChannelGate(16)
    compiled.load_state_dict(plain.state_dict())
    x = torch.randn(4, 16, 6, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain = plain.train()(xa)
    use_compiled_gates(True)
    try:
        out_compiled = compiled.train()(xb)
    finally:
        use_compiled_gates(False)
    out_plain.square().sum().backward()
    out_compiled.square().sum().backward()
    torch.testing.assert_close(out_compiled, out_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.bn.weight.grad, plain.bn.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.bn.running_mean, plain.bn.running_mean)
