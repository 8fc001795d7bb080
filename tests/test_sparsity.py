"""The penalty reaches the gates through any wrapper: the reference silently skips wrapped models."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate
from nam_prune.sparsity import apply_sparsity_penalty, batchnorm_scales, gamma_stats

LR, P = 0.5, 0.01


def _step_only_penalty(wrapped: nn.Module, inner: nn.Module) -> list[torch.Tensor]:
    """One SGD step where the data loss has zero gradient, so gamma moves by -lr * p * sign(gamma)."""
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    before = [g.gamma.detach().clone() for g in inner.modules() if isinstance(g, NAMChannelGate)]
    out = wrapped(torch.randn(4, 1, 28, 28))
    (out * 0).sum().backward()
    apply_sparsity_penalty(wrapped, P)
    optimizer.step()
    after = [g.gamma.detach() for g in inner.modules() if isinstance(g, NAMChannelGate)]
    return [a - b for a, b in zip(after, before)]


def _set_signed_gammas(model):
    with torch.no_grad():
        for i, gate in enumerate(m for m in model.modules() if isinstance(m, NAMChannelGate)):
            gate.gamma.copy_(torch.linspace(-1, 1, gate.gamma.numel()) + 0.01 * i)


@pytest.mark.parametrize("wrapper", ["plain", "data_parallel", "ddp"])
def test_penalty_moves_gammas_of_wrapped_model(tiny_nam_resnet, wrapper, tmp_path):
    _set_signed_gammas(tiny_nam_resnet)
    signs = [torch.sign(g.gamma.detach().clone()) for g in tiny_nam_resnet.modules() if isinstance(g, NAMChannelGate)]
    if wrapper == "data_parallel":
        wrapped = nn.DataParallel(tiny_nam_resnet)
    elif wrapper == "ddp":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
        wrapped = nn.parallel.DistributedDataParallel(tiny_nam_resnet)
    else:
        wrapped = tiny_nam_resnet
    try:
        deltas = _step_only_penalty(wrapped, tiny_nam_resnet)
    finally:
        if wrapper == "ddp":
            dist.destroy_process_group()
    assert len(deltas) == 9  # stem + 3 blocks x 2 + 2 shortcut BNs
    for delta, sign in zip(deltas, signs):
        torch.testing.assert_close(delta, -LR * P * sign)


def test_penalty_value_and_gamma_stats(tiny_nam_resnet):
    gates = [m for m in tiny_nam_resnet.modules() if isinstance(m, NAMChannelGate)]
    with torch.no_grad():
        gates[0].gamma.zero_()
    channels = sum(g.gamma.numel() for g in gates)
    value = apply_sparsity_penalty(tiny_nam_resnet, 1e-3)
    assert value == pytest.approx(1e-3 * (channels - gates[0].gamma.numel()))
    stats = gamma_stats(tiny_nam_resnet)
    assert (stats.channels, stats.near_zero) == (channels, gates[0].gamma.numel())
    assert stats.dead_layers == ["bn1.channel"]  # a gate whose gammas all reached zero is named


def test_dead_gate_is_reported_during_training(tiny_nam_resnet, caplog):
    from torch.utils.data import DataLoader, TensorDataset

    from nam_prune.train import TrainConfig, fit

    gate = next(m for m in tiny_nam_resnet.modules() if isinstance(m, NAMChannelGate))
    with torch.no_grad():
        gate.gamma.zero_()
    data = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))), batch_size=4)
    with caplog.at_level("WARNING", logger="nam_prune"):
        fit(tiny_nam_resnet, data, TrainConfig(epochs=1, lr=1e-6), torch.device("cpu"), "sparsity")
    assert "every NAM gamma of bn1.channel is below" in caplog.text


def test_epoch_summary_names_gates_and_penalty_only_where_they_exist(tiny_nam_resnet, caplog):
    """Fine-tuning a stripped (gate-free) model logs loss and accuracy, not "penalty 0, 0/0 NAM gamma";
    a gated model under a penalty still logs both."""
    import logging

    from torch.utils.data import DataLoader, TensorDataset

    from nam_prune.models import ModelSpec, build_model
    from nam_prune.train import TrainConfig, fit

    data = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))), batch_size=4)
    plain = build_model(ModelSpec("resnet8", num_classes=10, in_channels=1, width=8))
    logger = logging.getLogger("nam_prune")
    logger.addHandler(caplog.handler)  # captured even where an in-process CLI call stopped propagation
    try:
        with caplog.at_level("INFO", logger="nam_prune"):
            fit(plain, data, TrainConfig(epochs=1, lr=1e-6), torch.device("cpu"), "finetune")
            fit(tiny_nam_resnet, data, TrainConfig(epochs=1, lr=1e-6, penalty=1e-4), torch.device("cpu"), "sparsity")
    finally:
        logger.removeHandler(caplog.handler)
    summaries = {r.getMessage().split(" ")[0]: r.getMessage() for r in caplog.records if " epoch 1/1: " in r.getMessage()}
    finetune, sparsity = summaries["finetune"], summaries["sparsity"]
    assert finetune.startswith("finetune epoch 1/1: loss ") and "penalty" not in finetune and "gamma" not in finetune
    channels = sum(g.gamma.numel() for g in tiny_nam_resnet.modules() if isinstance(g, NAMChannelGate))
    assert ", penalty " in sparsity and sparsity.endswith(f"/{channels} NAM gamma < 0.01")


def test_scale_lr_moves_only_the_penalised_scales_faster() -> None:
    from nam_prune.surgery import NAMConfig, insert_nam
    from nam_prune.train import TrainConfig, make_optimizer

    model = insert_nam(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), NAMConfig())
    gammas = {id(g.gamma) for g in model.modules() if isinstance(g, NAMChannelGate)}
    config = TrainConfig(epochs=1, optimizer="adamw", lr=1e-3, penalty=0.1, scale_lr=20.0)
    groups = make_optimizer(model, config).param_groups
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(2e-2)]
    assert {id(p) for p in groups[1]["params"]} == gammas and not gammas & {id(p) for p in groups[0]["params"]}
    plain = make_optimizer(model, TrainConfig(epochs=1, optimizer="adamw", lr=1e-3, scale_lr=20.0)).param_groups
    assert len(plain) == 1  # no penalty: nothing to move faster


@pytest.mark.parametrize("tie, advice", [(0.0, "lower sparsity.penalty"), (0.5, "train with sparsity.epochs > 0")])
def test_tied_scores_warning_says_which_fix_applies(caplog, tie: float, advice: str) -> None:
    from nam_prune.prune.planning import ScoredGroup, warn_if_untrained

    scores = torch.tensor([tie] * 6 + [0.9, 0.8])
    with caplog.at_level("WARNING", logger="nam_prune"):
        warn_if_untrained([ScoredGroup("conv", True, scores, min_keep=1)])
    assert advice in caplog.text


def test_an_unresolved_regularizer_never_reaches_the_penalty():
    """``auto`` is resolved per model before training (fit, detector_sparsity); reaching the penalty
    unresolved would silently train L1 unclamped, so it is an error instead."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(NamPruneError, match="'auto' reached the penalty unresolved"):
        apply_sparsity_penalty(model, 5e-3, batchnorm_scales, "auto")
