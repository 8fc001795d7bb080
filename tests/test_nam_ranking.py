"""The closing gate, the polarization penalty and BN recalibration: the parts that make the NAM
ranking carry information and the cut nearly free."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from nam_prune.gates import NAMChannelGate
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import PruneConfig, prune_model
from nam_prune.recalibrate import RecalibrateConfig, recalibrate_bn
from nam_prune.sparsity import apply_sparsity_penalty, clamp_scales
from nam_prune.surgery import NAMConfig, insert_nam
from nam_prune.train import TrainConfig, evaluate, fit

CPU = torch.device("cpu")


def _closing_reference(gate: NAMChannelGate, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return x * gate.bn.weight.abs().view(1, -1, 1, 1) * torch.sigmoid(bn(x))


@pytest.mark.parametrize("training", [True, False])
def test_closing_gate_is_abs_gamma_times_sigmoid_of_bn(training):
    torch.manual_seed(0)
    gate = NAMChannelGate(6, closing=True).double()
    with torch.no_grad():
        gate.bn.weight.uniform_(-1, 1)
        gate.bn.bias.uniform_(-1, 1)
        gate.bn.running_mean.uniform_(-0.5, 0.5)
        gate.bn.running_var.uniform_(0.5, 2)
    reference_bn = copy.deepcopy(gate.bn)
    x = torch.randn(4, 6, 5, 5, dtype=torch.double)
    gate.train(training)
    reference_bn.train(training)
    torch.testing.assert_close(gate(x), _closing_reference(gate, reference_bn, x))


def test_closing_gate_channel_with_zero_gamma_is_off():
    gate = NAMChannelGate(4, closing=True)
    with torch.no_grad():
        gate.bn.weight[2] = 0.0
    x = torch.randn(3, 4, 6, 6)
    for mode in (True, False):
        assert gate.train(mode)(x)[:, 2].abs().max() == 0  # removing it changes nothing


def test_polarization_step_and_clamp():
    scale = nn.Parameter(torch.tensor([0.9, 0.1, 0.5, 0.7]))
    scale.grad = torch.zeros(4)
    model = nn.Module()
    value = apply_sparsity_penalty(model, 0.5, lambda _: [scale], regularizer="polarization", spread=1.2)
    side = torch.sign(scale.detach() - scale.detach().mean())  # mean 0.55: [+, -, -, +]
    expected = 1.2 * torch.ones(4) - side + side.mean()
    torch.testing.assert_close(scale.grad, 0.5 * expected)
    assert value == pytest.approx(0.5 * (1.2 * 2.2 - (0.35 + 0.45 + 0.05 + 0.15)))
    with torch.no_grad():
        scale.copy_(torch.tensor([1.3, -0.2, 0.5, 0.7]))
    clamp_scales(model, lambda _: [scale])
    assert scale.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.7])


def test_l1_step_is_the_papers():
    scale = nn.Parameter(torch.tensor([0.9, -0.1]))
    scale.grad = torch.zeros(2)
    apply_sparsity_penalty(nn.Module(), 1e-2, lambda _: [scale], regularizer="l1")
    torch.testing.assert_close(scale.grad, torch.tensor([1e-2, -1e-2]))


def test_pruning_zero_gamma_channels_of_closing_gates_changes_nothing():
    """The point of the closing gate: channels whose gamma reached 0 were already off."""
    torch.manual_seed(0)
    model = insert_nam(build_model(ModelSpec("resnet8", 10, 1, 8)), NAMConfig(gate="closing"))
    gates = [m for m in model.modules() if isinstance(m, NAMChannelGate)]
    with torch.no_grad():
        for gate in gates:  # a quarter of every gate's channels polarized to exactly 0
            gate.bn.weight.fill_(1.0)
            gate.bn.weight[: gate.bn.num_features // 4] = 0.0
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    before, channels = model(x), sum(g.bn.num_features for g in gates)
    prune_model(model, torch.zeros(1, 1, 28, 28), PruneConfig(target="channels", channel_ratio=0.25, round_to=1))
    assert sum(g.bn.num_features for g in gates) == channels - channels // 4
    assert all(bool((g.bn.weight > 0).all()) for g in gates)  # exactly the zero channels went
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_recalibration_is_the_plain_average_over_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    batches = [torch.randn(8, 1, 6, 6) * (i + 1) + i for i in range(4)]
    loader = DataLoader(TensorDataset(torch.cat(batches), torch.zeros(32)), batch_size=8)
    model.eval()
    assert recalibrate_bn(model, loader, RecalibrateConfig(batches=3), CPU) == 3
    with torch.no_grad():
        outputs = [model[0](b) for b in batches[:3]]
    means = torch.stack([o.mean((0, 2, 3)) for o in outputs]).mean(0)
    variances = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outputs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means)
    torch.testing.assert_close(model[1].running_var, variances)
    assert model[1].momentum == 0.1 and not model.training  # settings and mode restored


def test_recalibration_recovers_a_cut_model_on_real_data(fashion_small):
    """After a cut the BN statistics describe channels that are gone: eval-mode accuracy collapses
    and re-estimating them on a few training batches brings it back (adaptive BN)."""
    torch.manual_seed(0)
    model = insert_nam(build_model(ModelSpec("resnet8", 10, 1, 8)), NAMConfig())
    fit(model, fashion_small.train, TrainConfig(epochs=6, lr=0.05), CPU, "train")
    recalibrate_bn(model, fashion_small.calibration, RecalibrateConfig(batches=8), CPU)
    trained = evaluate(model, fashion_small.test, CPU)
    prune_model(model, torch.zeros(1, 1, 28, 28), PruneConfig(target="channels", channel_ratio=0.5, max_pruning_ratio=0.6, round_to=1))
    stale = evaluate(model, fashion_small.test, CPU)
    recalibrate_bn(model, fashion_small.calibration, RecalibrateConfig(batches=8), CPU)
    recalibrated = evaluate(model, fashion_small.test, CPU)
    assert trained > 0.3, trained  # 10 classes: chance is 0.1
    assert recalibrated > stale + 0.1, (trained, stale, recalibrated)


def test_recalibration_reads_its_batches_from_the_config():
    """``recalibrate_bn`` takes the recipe's ``RecalibrateConfig``: ``batches`` 0 leaves the statistics
    alone, 2 averages exactly the first two batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    batches = [torch.full((4, 1, 2, 2), float(i)) + torch.arange(4.0).view(4, 1, 1, 1) for i in range(3)]
    loader = DataLoader(TensorDataset(torch.cat(batches), torch.zeros(12)), batch_size=4)
    assert recalibrate_bn(model, loader, RecalibrateConfig(batches=0), CPU) == 0
    assert model[1].running_mean.tolist() == [0.0, 0.0] and model[1].num_batches_tracked == 0
    assert recalibrate_bn(model, loader, RecalibrateConfig(batches=2), CPU) == 2
    # batch i: four 2x2 maps of i + (0, 1, 2, 3): means 1.5 and 2.5, each unbiased variance 20 / 15
    torch.testing.assert_close(model[1].running_mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(model[1].running_var, torch.tensor([4 / 3, 4 / 3]))
