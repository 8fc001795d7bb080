"""insert_nam puts gates into models that were not written with them."""

import pytest
import torch
import torch.nn as nn
import torchvision

from nam_prune.data import DataConfig, load_data
from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, NAMGated, NAMSpatialGate
from nam_prune.models import ModelSpec, build_model
from nam_prune.surgery import NAMConfig, insert_nam, resolved_regularizer
from nam_prune.train import TrainConfig, fit


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "every_bn", "block_end"),
    [("resnet18", 20, 8), ("mobilenet_v2", 52, 17), ("resnet50", 53, 16), ("resnet20", 21, 9)],
)
def test_insert_counts_and_forward(name, every_bn, block_end):
    spec = ModelSpec(name, num_classes=7, in_channels=3, width=16)
    x = torch.randn(2, 3, 32, 32)
    for placement, expected in (("every_bn", every_bn), ("block_end", block_end)):
        model = insert_nam(build_model(spec), NAMConfig(placement=placement))
        assert _count(model, NAMChannelGate) == expected
        assert model.eval()(x).shape == (2, 7)


def test_insert_is_idempotent(tiny_nam_resnet):
    before = _count(tiny_nam_resnet, NAMChannelGate)
    insert_nam(tiny_nam_resnet, NAMConfig())
    assert _count(tiny_nam_resnet, NAMChannelGate) == before
    assert not any(isinstance(m.host, NAMGated) for m in tiny_nam_resnet.modules() if isinstance(m, NAMGated))


def test_spatial_gates_record_input_size():
    model = build_model(ModelSpec("resnet8", in_channels=1, width=8))
    insert_nam(model, NAMConfig(spatial=True), torch.zeros(1, 1, 28, 28))
    sizes = sorted({(g.height, g.width) for g in model.modules() if isinstance(g, NAMSpatialGate)})
    assert sizes == [(7, 7), (14, 14), (28, 28)]
    with pytest.raises(NamPruneError, match="built for 28x28 inputs but got 32x32"):
        model(torch.zeros(1, 1, 32, 32))


def test_user_module_with_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 6, 6))
    insert_nam(model, NAMConfig())
    assert isinstance(model[1], NAMGated) and model[1].channel.bn.num_features == 8


def test_model_without_batchnorm_is_refused():
    with pytest.raises(NamPruneError, match="no BatchNorm2d"):
        insert_nam(torchvision.models.alexnet(num_classes=3), NAMConfig())


def test_block_end_needs_residual_blocks():
    with pytest.raises(NamPruneError, match="every_bn"):
        insert_nam(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), NAMConfig(placement="block_end"))


def test_auto_gate_bias_is_zero_for_resnets_and_the_papers_gate_and_open_elsewhere():
    """nam.gate_bias: auto picks what measured best per family (docs/ranking.md)."""
    from nam_prune.surgery import OPEN_GATE_BIAS, resolved

    def biases(model: nn.Module, gate: str = "closing") -> set[float]:
        insert_nam(model, NAMConfig(gate=gate))
        return {float(b) for m in model.modules() if isinstance(m, NAMChannelGate) for b in m.bn.bias.detach().unique()}

    resnet = ModelSpec("resnet8", num_classes=10, in_channels=1, width=8)
    assert biases(build_model(resnet)) == {0.0}
    assert biases(torchvision.models.mobilenet_v2(num_classes=10)) == {OPEN_GATE_BIAS} == {6.0}
    assert biases(torchvision.models.mobilenet_v2(num_classes=10), gate="reference") == {0.0}
    assert biases(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))) == {6.0}
    assert resolved(build_model(resnet), NAMConfig()).gate_bias == 0.0  # what records store: the number used
    assert resolved(build_model(resnet), NAMConfig(gate_bias=3)).gate_bias == 3


def test_auto_regularizer_is_polarization_on_gated_resnets_and_l1_elsewhere():
    """sparsity.regularizer: auto follows the measurements (docs/ranking.md): polarization for closing
    gates on ResNets, L1 for open-gate architectures and the paper's gate, and fit trains with it."""
    resnet = ModelSpec("resnet8", num_classes=10, in_channels=1, width=8)

    def gated(model: nn.Module, gate: str = "closing") -> nn.Module:
        return insert_nam(model, NAMConfig(gate=gate))

    assert resolved_regularizer(gated(build_model(resnet)), "auto") == "polarization"
    assert resolved_regularizer(gated(torchvision.models.mobilenet_v2(num_classes=10)), "auto") == "l1"
    assert resolved_regularizer(gated(build_model(resnet), gate="reference"), "auto") == "l1"
    assert resolved_regularizer(build_model(resnet), "auto") == "polarization"  # a gate-free control
    assert resolved_regularizer(gated(torchvision.models.mobilenet_v2(num_classes=10)), "polarization") == "polarization"
    # fit applies the resolved form: polarization clamps the gate scales into [0, 1], L1 does not
    torch.manual_seed(0)
    digits = load_data(DataConfig(name="digits", root="", batch_size=64, train_subset=256, test_subset=64), seed=0)
    config = TrainConfig(epochs=1, penalty=5e-3, lr=0.5)
    for model, clamped in ((gated(build_model(resnet)), True), (gated(build_model(resnet), gate="reference"), False)):
        for gate in (m for m in model.modules() if isinstance(m, NAMChannelGate)):
            nn.init.constant_(gate.bn.weight, 1.5)
        fit(model, digits.train, config, torch.device("cpu"), "sparsity")
        top = max(float(m.bn.weight.detach().max()) for m in model.modules() if isinstance(m, NAMChannelGate))
        assert (top <= 1.0) == clamped, top


def test_gate_bias_starts_a_closing_gate_near_the_identity():
    """nam.gate_bias: at 0 a closing gate starts as sigmoid(x_hat) * x, about halving its input (a SiLU on
    every gated layer); a bias of 6 starts it within a few percent of x, and a zero gamma still closes it."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    change = {}
    for bias in (0.0, 6.0):
        gated = insert_nam(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)), NAMConfig(gate_bias=bias))
        gate = next(m for m in gated.modules() if isinstance(m, NAMChannelGate))
        assert torch.equal(gate.bn.bias, torch.full((8,), bias))
        factor = gate.train()(x) / x  # what the gate multiplies each value by
        change[bias] = (1 - factor).abs().median().item()
    assert change[0.0] > 0.3 and change[6.0] < 0.03, change
    with torch.no_grad():
        gate.bn.weight.zero_()
    assert gate(x).abs().max() == 0
