"""Ranking by NAM gates and structural pruning through torch-pruning's dependency graph."""

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import NAMImportance, PruneConfig, build_graph, count_macs_params, normalize_scores, prune_model
from nam_prune.prune.planning import ScoredGroup, plan_cut
from nam_prune.surgery import NAMConfig, insert_nam

X = torch.zeros(1, 1, 28, 28)


def _gates(model):
    return [m for m in model.modules() if isinstance(m, NAMChannelGate)]


def test_untrained_gammas_trap_torch_pruning_prunes_nothing(tiny_nam_resnet):
    """All gamma = 1: torch-pruning's own global pruner silently removes nothing..."""
    macs_before, _ = count_macs_params(tiny_nam_resnet, X)
    pruner = tp.pruner.BasePruner(
        tiny_nam_resnet, X, importance=NAMImportance(tiny_nam_resnet), global_pruning=True,
        pruning_ratio=0.5, ignored_layers=[tiny_nam_resnet.fc],
    )
    pruner.step()
    assert count_macs_params(tiny_nam_resnet, X)[0] == macs_before


def test_untrained_gammas_trap_nam_prune_meets_target(tiny_nam_resnet):
    """...while nam-prune spreads the tied cut evenly and meets the MACs target."""
    macs_before = count_macs_params(tiny_nam_resnet, X)[0]
    prune_model(tiny_nam_resnet, X, PruneConfig(macs_keep=0.5, round_to=1))
    macs_after = count_macs_params(tiny_nam_resnet, X)[0]
    assert 0.48 * macs_before <= macs_after <= 0.5 * macs_before
    widths = [g.bn.num_features for g in _gates(tiny_nam_resnet)]
    assert min(widths) >= 1 and tiny_nam_resnet.fc.out_features == 10
    assert tiny_nam_resnet(X).shape == (1, 10)


def test_lowest_gamma_channels_are_the_ones_removed():
    """A plain conv-BN-conv chain: the channels with the smallest NAM gamma go."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    insert_nam(model, NAMConfig())
    gamma = torch.tensor([0.9, 0.01, 0.8, 0.02, 0.7, 0.6, 0.03, 0.5])
    with torch.no_grad():
        model[1].channel.bn.weight.copy_(gamma)
        original = model[0].weight.detach().clone()
    x = torch.zeros(1, 1, 6, 6)
    # the last conv is the head; only conv 0's 8 output channels are prunable: cut 3 of them
    prune_model(model, x, PruneConfig(target="channels", max_pruning_ratio=0.9, channel_ratio=3 / 8, round_to=1))
    kept = [0, 2, 4, 5, 7]
    torch.testing.assert_close(model[0].weight, original[kept])
    torch.testing.assert_close(model[1].channel.bn.weight.detach(), gamma[kept])
    assert model[3].in_channels == 5


def test_macs_before_after_exact():
    """MACs come from torch-pruning's counter and drop exactly with the channels removed."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1, bias=False))
    insert_nam(model, NAMConfig())
    x = torch.zeros(1, 1, 6, 6)
    conv_macs = lambda c: 36 * (9 * c + c * 4)
    macs_before, params_before = count_macs_params(model, x)
    result = prune_model(model, x, PruneConfig(target="channels", channel_ratio=0.5, round_to=1))
    macs_after, params_after = count_macs_params(model, x)
    assert params_before == result.params_before == 8 * 9 + 8 * 2 + 8 * 2 + 8 * 4  # conv, host BN, gate BN, conv
    assert params_after == result.params_after == 4 * 9 + 4 * 2 + 4 * 2 + 4 * 4
    assert macs_before - macs_after == conv_macs(8) - conv_macs(4) + 36 * 4 * 2 * 2  # + BN MACs


def test_normalizers():
    g = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(normalize_scores(g, "sum"), g / 12)
    torch.testing.assert_close(normalize_scores(g, "mean"), g / 3)
    torch.testing.assert_close(normalize_scores(g, "max"), g / 6)
    torch.testing.assert_close(normalize_scores(g, "none"), g)


def test_no_layer_is_emptied_and_max_ratio_holds(tiny_nam_resnet):
    before = [g.bn.num_features for g in _gates(tiny_nam_resnet)]
    with torch.no_grad():  # one layer's gates all ~0: a greedy global ranking would empty it
        _gates(tiny_nam_resnet)[3].gamma.fill_(1e-6)
    prune_model(tiny_nam_resnet, X, PruneConfig(target="channels", max_pruning_ratio=0.75, channel_ratio=0.6))
    after = [g.bn.num_features for g in _gates(tiny_nam_resnet)]
    assert all(a >= b * 0.25 for a, b in zip(after, before))


def test_unreachable_macs_target_is_an_error(tiny_nam_resnet):
    macs, _ = count_macs_params(tiny_nam_resnet, X)
    with pytest.raises(NamPruneError, match="cannot reach"):
        prune_model(tiny_nam_resnet, X, PruneConfig(max_pruning_ratio=0.2, macs_keep=0.1))


def test_pruning_nothing_is_an_error(tiny_nam_resnet):
    with pytest.raises(NamPruneError, match="removed nothing"):
        prune_model(tiny_nam_resnet, X, PruneConfig(target="channels", channel_ratio=0.0))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_prune_to_macs_target(name):
    model = insert_nam(build_model(ModelSpec(name, num_classes=10)), NAMConfig())
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        for gate in _gates(model):
            gate.gamma.uniform_(0, 1)
    macs, _ = count_macs_params(model, x)
    prune_model(model, x, PruneConfig(round_to=8, macs_keep=0.6))
    assert 0.55 * macs <= count_macs_params(model, x)[0] <= 0.6 * macs
    assert model.eval()(x).shape == (1, 10)


def test_rounded_global_cut_takes_all_zero_blocks_before_live_channels():
    """round_to 16: a layer with 9 zero scores of 32 cannot lose 16 channels for free, one with 40
    zeros of 64 can lose 32; flooring each layer's count after ranking channels cut 7 live ones."""
    narrow = ScoredGroup("narrow", True, torch.cat([torch.zeros(9), torch.ones(23)]), min_keep=1)
    wide = ScoredGroup("wide", True, torch.cat([torch.ones(24), torch.zeros(40)]), min_keep=1)
    plan = plan_cut([narrow, wide], fraction=32 / 96, config=PruneConfig(round_to=16))
    assert plan == {"wide": list(range(24, 56))}  # two all-zero blocks of 16; the narrow layer keeps 32
    plan = plan_cut([narrow, wide], fraction=64 / 96, config=PruneConfig(round_to=16))
    assert len(plan["narrow"]) == 16 and len(plan["wide"]) == 48  # live channels only once the zeros are gone


class _SeededScores(tp.importance.Importance):
    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group):
        return torch.rand(len(group[0].idxs), generator=self.generator)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_macs_step_bounds_how_far_below_its_target_a_cut_lands(scope):
    """ResNet-8 at width 32 on 8x8 inputs: with widths rounded to 16 one block is a quarter of a
    32-wide stage's MACs. check_macs_keeps says how coarse the steps are, and every cut to a MAC
    target lands at most that far under it, whatever the ranking."""
    import copy

    from nam_prune.prune import check_macs_keeps

    model = build_model(ModelSpec("resnet8", num_classes=10, in_channels=1, width=32)).eval()
    example = torch.zeros(1, 1, 8, 8)
    dense = count_macs_params(model, example)[0]

    def step(round_to: int) -> float:
        config = PruneConfig(round_to=round_to, max_pruning_ratio=0.8, scope=scope)
        return check_macs_keeps(copy.deepcopy(model), example, config, [0.5], importance=_SeededScores(0))

    fine, coarse = step(1), step(16)
    if scope == "global":  # every layer is a multiple of 16 wide: a step is 16 channels of the costliest group
        assert coarse == pytest.approx(16 * fine) and 0.24 < coarse < 0.26
    else:  # same-width layers step together
        assert coarse > 16 * fine * 0.99 and 0.4 < coarse < 0.5
    for keep in (0.7, 0.5, 0.35):
        for seed in (0, 1):
            pruned = copy.deepcopy(model)
            config = PruneConfig(macs_keep=keep, round_to=16, max_pruning_ratio=0.8, scope=scope)
            prune_model(pruned, example, config, importance=_SeededScores(seed))
            kept = count_macs_params(pruned, example)[0] / dense
            assert keep - coarse <= kept <= keep, (keep, seed, kept)
    with pytest.raises(NamPruneError, match=r"cannot reach .* raise --macs-keep$"):
        check_macs_keeps(model, example, PruneConfig(round_to=16, max_pruning_ratio=0.5), [0.5, 0.1], keep_option="--macs-keep")


def test_split_parts_map_to_the_layers_that_read_them():
    """torch-pruning maps a split's parts to its readers in the order its trace met them (often
    reversed); ``build_graph`` puts them back in part order, so a cut lands in the right reader."""

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.first, self.second = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 5, 1), nn.Conv2d(4, 6, 1)

        def forward(self, x):
            low, high = torch.split(self.stem(x), [4, 4], dim=1)
            return torch.cat([self.first(low), self.second(high)], dim=1)

    model = TwoReaders()
    graph = build_graph(model, torch.zeros(1, 3, 4, 4))
    graph.get_pruning_group(model.stem, graph.get_pruner_of_module(model.stem).prune_out_channels, [0, 1, 6]).prune()
    assert (model.first.in_channels, model.second.in_channels) == (2, 3)
