"""nam-prune compare: matched budgets for every criterion, resume after an interruption, the plot."""

import json

import pytest

import nam_prune.compare as compare_module
from nam_prune.compare import compare
from nam_prune.plots import plot_accuracy_vs_macs
from nam_prune.recipe import recipe_from_dict

TINY = {
    # 28x28 inputs and width 16: on 8x8 digits one residual channel moves the MACs by more than 2%
    "model": {"name": "resnet20", "width": 16},
    "data": {"name": "fashion_mnist", "train_subset": 256, "test_subset": 256, "batch_size": 64},
    "sparsity": {"epochs": 1, "lr": 0.05},
    "finetune": {"epochs": 1, "lr": 0.05},
    "prune": {"max_pruning_ratio": 0.9, "round_to": 1},  # width-8 models: cut channel by channel
    "report": {"latency_runs": 1, "warmup": 0},
}


@pytest.mark.parametrize(
    ("criteria", "keeps"),
    [(["nam", "l1", "random", "dense"], [0.4]),  # the smallest real comparison: one budget, three rankings
     pytest.param(["nam", "bn_slimming", "l1", "random", "dense"], [0.7, 0.4], marks=pytest.mark.slow)],
)
def test_every_criterion_meets_its_budget_and_plot_is_written(tmp_path, fashion_root, criteria, keeps):
    state = compare(recipe_from_dict(TINY), criteria, keeps, [0], tmp_path)
    assert len(state["arms"]) == (len(criteria) - 1) * len(keeps) + 1  # every pruned arm + the unpruned dense arm
    arms = {(a["criterion"], a["macs_keep"]): a for a in state["arms"]}
    dense = arms.pop(("dense", 1.0))
    assert dense["macs_kept"] == 1 and "accuracy_pruned" not in dense
    assert dense["accuracy"] > 0.3  # 10 classes: chance is 0.1
    for arm in arms.values():
        assert abs(arm["macs_kept"] - arm["macs_keep"]) <= 0.02, arm
        assert arm["macs"] < dense["macs"]
        assert set(arm) >= {"accuracy_trained", "accuracy_pruned", "accuracy_recalibrated", "accuracy"}
    # l1, random and dense train the same plain model (same seed): one cached model, one accuracy
    assert arms[("l1", keeps[0])]["accuracy_trained"] == arms[("random", 0.4)]["accuracy_trained"] == dense["accuracy_trained"]
    plot_accuracy_vs_macs(state["summary"], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "compare.json").read_text())["summary"][0]["seeds"] == 1


@pytest.mark.slow  # 12 s; run's own resume stays in the fast set (test_robustness)
def test_interrupted_comparison_resumes_with_finished_arms_kept(tmp_path, monkeypatch, fashion_root):
    recipe = recipe_from_dict(TINY)
    real_arm = compare_module._arm
    calls = []

    def interrupted_arm(criterion, keep, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((criterion, keep))
        return real_arm(criterion, keep, *args)

    monkeypatch.setattr(compare_module, "_arm", interrupted_arm)
    with pytest.raises(KeyboardInterrupt):
        compare(recipe, ["nam", "random"], [0.7, 0.5], [0], tmp_path)
    kept = json.loads((tmp_path / "compare.json").read_text())["arms"]
    assert [(a["criterion"], a["macs_keep"]) for a in kept] == calls == [("nam", 0.7), ("nam", 0.5)]
    monkeypatch.setattr(compare_module, "_arm", real_arm)
    rerun = []
    monkeypatch.setattr(compare_module, "_arm", lambda c, b, *a: rerun.append((c, b)) or real_arm(c, b, *a))
    state = compare(recipe, ["nam", "random"], [0.7, 0.5], [0], tmp_path)
    assert rerun == [("random", 0.7), ("random", 0.5)]
    assert len(state["arms"]) == 4 and kept == state["arms"][:2]


# The digits quickstart of issue 32: ResNet-8 at width 32 on 8x8 images, widths rounded to 16. One
# block of 16 channels of a 32-wide layer is a quarter of its MACs, so no arm lands within 2%.
DIGITS = {
    "model": {"name": "resnet8", "width": 32},
    "data": {"name": "digits", "root": "", "train_subset": 256, "test_subset": 128, "batch_size": 64},
    "sparsity": {"epochs": 1, "penalty": 5e-3},
    "finetune": {"epochs": 1, "lr": 0.05},
    "prune": {"max_pruning_ratio": 0.8, "round_to": 16},
    "recalibrate": {"batches": 2},
    "report": {"latency_runs": 1, "warmup": 0},
}


def test_arms_match_to_the_step_round_to_allows_and_record_the_share_kept(tmp_path, monkeypatch):
    from rich.console import Console

    from nam_prune.compare import summary_table
    from nam_prune.tasks import ClassificationTask

    stages: list[tuple[str, bool]] = []
    train = ClassificationTask.train

    def recorded(self, model, config, stage, *args, warm_up=False, **kwargs):
        stages.append((stage, warm_up))
        return train(self, model, config, stage, *args, warm_up=warm_up, **kwargs)

    monkeypatch.setattr(ClassificationTask, "train", recorded)
    state = compare(recipe_from_dict(DIGITS), ["nam", "random"], [0.5], [0], tmp_path)
    # only the training of the model as built warms up (yolo.warmup_epochs), as run's sparsity stage
    assert [warm for _, warm in stages] == [True, False, True, False], stages
    tolerance = state["macs_tolerance"]
    assert 0.02 + 0.2 < tolerance < 0.02 + 0.3  # a 16-channel block of the 32-wide stage: ~25% of the MACs
    assert json.loads((tmp_path / "compare.json").read_text())["macs_tolerance"] == tolerance
    for arm in state["arms"]:
        assert arm["macs_keep"] == 0.5 and 0.5 - tolerance <= arm["macs_kept"] <= 0.5, arm
        assert arm["macs"] < 0.5 * 3.1e6  # of the dense ~3.0M (gates stripped after the cut)
        assert {"accuracy_pruned", "accuracy_recalibrated", "accuracy"} <= set(arm)
    rows = {row["criterion"]: row for row in state["summary"]}
    assert rows["nam"]["macs_kept"] == state["arms"][0]["macs_kept"] and rows["random"]["macs_keep"] == 0.5
    wide = Console(width=200, record=True)
    wide.print(summary_table(state["summary"], "accuracy", tolerance))
    table = wide.export_text()
    assert f"MACs kept within ±{100 * tolerance:.1f}% of the target" in table
    assert f"{100 * rows['nam']['macs_kept']:.1f}% (target 50%)" in table


def test_an_unreachable_budget_is_one_line_before_any_training(tmp_path, monkeypatch):
    from nam_prune.errors import NamPruneError

    monkeypatch.setattr(compare_module, "_trained", lambda *args: pytest.fail("trained before checking the budgets"))
    with pytest.raises(NamPruneError, match=r"^nam at --macs-keep 0.05: cannot reach .* or raise --macs-keep$") as raised:
        compare(recipe_from_dict(DIGITS), ["nam", "random"], [0.5, 0.05], [0], tmp_path / "out")
    assert "\n" not in str(raised.value) and isinstance(raised.value.__cause__, NamPruneError)
    assert not (tmp_path / "out").exists()


def test_a_compare_json_written_with_budgets_is_read_as_shares_kept(tmp_path, monkeypatch):
    """compare.json before --macs-keep held ``budget`` (share removed) and ``macs_removed`` per arm."""
    recipe = recipe_from_dict(DIGITS)
    old = {"criterion": "random", "budget": 0.7, "seed": 0, "macs": 900_000, "params": 50_000, "macs_removed": 0.69,
           "accuracy_pruned": 0.2, "accuracy_recalibrated": 0.5, "accuracy": 0.8, "latency_ms": 0.3, "accuracy_trained": 0.9}
    (tmp_path / "compare.json").write_text(json.dumps({"recipe": recipe.to_dict(), "arms": [old]}))
    monkeypatch.setattr(compare_module, "_trained", lambda *args: pytest.fail("a cached arm was trained again"))
    state = compare(recipe, ["random"], [0.3], [0], tmp_path)
    (arm,) = state["arms"]
    assert "budget" not in arm and "macs_removed" not in arm
    assert arm["macs_keep"] == 0.3 and arm["macs_kept"] == pytest.approx(0.31)
    assert state["summary"][0]["macs_keep"] == 0.3 and state["summary"][0]["accuracy"] == 0.8


def _invoke_compare(monkeypatch, *args: str):
    """``nam-prune compare`` through click in this process, the comparison itself replaced by a
    recorder; returns click's result and the shares kept it was given."""
    import logging

    from click.testing import CliRunner

    from nam_prune import cli

    given = []
    state = {"summary": [], "score_key": "accuracy"}
    monkeypatch.setattr(compare_module, "compare", lambda recipe, criteria, keeps, seeds, folder: given.append(keeps) or state)
    monkeypatch.setattr(compare_module, "print_summary", lambda state: None)
    monkeypatch.setattr("nam_prune.plots.plot_accuracy_vs_macs", lambda *args: None)
    logger = logging.getLogger("nam_prune")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    try:
        result = CliRunner().invoke(cli.cli, ["compare", "recipes/fashion_quickstart.yaml", *args])
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)
    return result, given


def test_compare_takes_shares_kept_and_converts_the_deprecated_budgets(monkeypatch):
    result, given = _invoke_compare(monkeypatch, "--macs-keep", "0.5,0.3")
    assert result.exit_code == 0, result.output
    assert given == [[0.5, 0.3]] and "deprecated" not in result.output
    result, given = _invoke_compare(monkeypatch)
    assert given == [[0.7, 0.5, 0.3]]  # the default: the old default budgets 0.3, 0.5, 0.7 removed
    result, given = _invoke_compare(monkeypatch, "--budgets", "0.5,0.7")
    assert result.exit_code == 0, result.output
    assert given == [[0.5, 0.3]]
    warnings = [line for line in result.output.splitlines() if "deprecated" in line]
    assert warnings == ["warning: --budgets (shares of the MACs removed) is deprecated: use --macs-keep 0.5,0.3"]
    result, given = _invoke_compare(monkeypatch, "--macs-keep", "0.5", "--budgets", "0.5")
    assert result.exit_code == 2 and given == []
    assert "give only --macs-keep" in result.output


def test_group_sl_and_taylor_meet_their_budget_and_learn(tmp_path, fashion_root):
    state = compare(recipe_from_dict(TINY), ["group_sl", "taylor"], [0.5], [0], tmp_path)
    arms = {a["criterion"]: a for a in state["arms"]}
    assert set(arms) == {"group_sl", "taylor"}
    for arm in arms.values():
        assert abs(arm["macs_kept"] - 0.5) <= state["macs_tolerance"], arm
        assert {"accuracy_trained", "accuracy_pruned", "accuracy_recalibrated", "accuracy"} <= set(arm)
        assert arm["accuracy"] > 0.15, arm  # 10 classes: chance is 0.1 (4 steps of training, 4 of fine-tuning)
    # group_sl trains a model of its own (with the regularizer); taylor ranks the plain model l1 and random share
    assert {p.name for p in tmp_path.glob("trained_*.pt")} == {"trained_group_sl_seed0.pt", "trained_plain_seed0.pt"}


def test_gradient_criteria_are_refused_for_detectors_before_anything_trains(tmp_path, monkeypatch):
    from nam_prune.errors import NamPruneError

    monkeypatch.setattr(compare_module, "_trained", lambda *args: pytest.fail("trained before refusing"))
    recipe = recipe_from_dict({**TINY, "model": {"name": "yolov8n.yaml"}})
    with pytest.raises(NamPruneError, match=r"^group_sl, taylor: not available for yolov8n.yaml: .*classifiers") as raised:
        compare(recipe, ["nam", "group_sl", "taylor"], [0.5], [0], tmp_path / "out")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def _group_norms(model, example):
    """Each prunable group's per-channel L2 norm over the whole group (unnormalized), by root name."""
    import torch_pruning as tp

    from nam_prune.prune import PruneConfig, build_graph
    from nam_prune.prune.planning import prunable_groups

    graph = build_graph(model, example)
    norm = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    names = {m: n for n, m in model.named_modules()}
    return {names[g[0].dep.target.module]: norm(g) for g in prunable_groups(model, graph, PruneConfig())}


def test_group_sparsity_shrinks_the_weak_channels_groups_against_plain_training():
    import copy

    import torch
    import torch_pruning as tp
    from torch.utils.data import DataLoader, TensorDataset

    from nam_prune.models import ModelSpec, build_model
    from nam_prune.prune import GroupSparsity, PruneConfig
    from nam_prune.train import TrainConfig, fit

    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet8", 10, 1, 16))
    example = torch.randn(1, 1, 28, 28)
    loader = DataLoader(TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))), batch_size=16)
    config = TrainConfig(epochs=2, lr=0.05, momentum=0.0, weight_decay=0.0, schedule="constant")
    before = _group_norms(model, example)
    plain, regularized = copy.deepcopy(model), copy.deepcopy(model)
    sparsity = GroupSparsity(regularized, example, PruneConfig(), None, 0.05, tp.importance.GroupMagnitudeImportance(p=2))
    assert {type(g[0].dep.target.module) for g in sparsity._groups} == {torch.nn.Conv2d}  # never the head
    fit(plain, loader, config, torch.device("cpu"), "plain")
    fit(regularized, loader, config, torch.device("cpu"), "group_sl", after_backward=sparsity)
    after_plain, after_regularized = _group_norms(plain, example), _group_norms(regularized, example)
    weak, strong = [], []
    for root, norms in before.items():
        ratio = after_regularized[root] / after_plain[root]
        order = torch.argsort(norms)
        quarter = max(1, len(order) // 4)
        weak.append(ratio[order[:quarter]].mean())
        strong.append(ratio[order[-quarter:]].mean())
    weak, strong = torch.stack(weak), torch.stack(strong)
    assert bool((weak < 1).all()) and bool((strong < 1).all())  # every group shrinks against plain training
    assert bool((weak < strong).all())  # in every layer the weak channels' groups most (gamma up to 16 against 1)


def test_taylor_ranks_on_the_task_gradients_and_leaves_none_behind(fashion_root):
    from dataclasses import replace

    import torch
    import torch_pruning as tp

    from nam_prune.compare import _Arm, _prune_config
    from nam_prune.prune import build_graph, count_macs_params
    from nam_prune.prune.planning import prunable_groups
    from nam_prune.tasks import ClassificationTask

    recipe = recipe_from_dict(TINY)
    task = ClassificationTask(recipe, torch.device("cpu"))
    model, record = task.build(None)
    scores = []

    class Recorded(tp.importance.GroupTaylorImportance):
        def __call__(self, group):
            scores.append(super().__call__(group))
            return scores[-1]

    dense_macs = count_macs_params(model, record.example_input())[0]
    arm = _Arm(task, model, record, 0, (0.5, 0.1, dense_macs), gradient_batches=2)
    arm.cut(_prune_config(recipe, 0.5), replace(recipe.finetune, epochs=0), Recorded(), strip=recipe.prune.strip_gates)
    assert scores and all(bool((s > 0).any()) for s in scores)  # |w * dL/dw| is not zero anywhere a gradient flows
    assert all(p.grad is None for p in model.parameters())  # nothing leaks into fine-tuning
    assert abs(arm.kept - 0.5) <= 0.1
    # the same group of an unranked copy with zero gradients scores zero: the scores come from the gradients
    probe = task.build(None)[0]
    for parameter in probe.parameters():
        parameter.grad = torch.zeros_like(parameter)
    graph = build_graph(probe, record.example_input())
    group = next(iter(prunable_groups(probe, graph, _prune_config(recipe, 0.5))))
    assert float(tp.importance.GroupTaylorImportance(normalizer=None)(group).abs().sum()) == 0.0


def test_summary_pairs_each_criterion_with_nam_seed_by_seed():
    """Seeds move all arms together (seed 1 is 10 points worse for both): the paired difference keeps
    NAM's 2-point lead with no spread, where the unpaired means' spreads would swamp it."""
    from nam_prune.compare import summarize

    def arm(criterion, keep, seed, accuracy):
        return {"criterion": criterion, "macs_keep": keep, "seed": seed, "accuracy": accuracy}

    arms = [arm("nam", 0.5, 0, 0.80), arm("nam", 0.5, 1, 0.70), arm("random", 0.5, 0, 0.78),
            arm("random", 0.5, 1, 0.68), arm("random", 0.5, 2, 0.50), arm("dense", 1.0, 0, 0.81)]
    rows = {row["criterion"]: row for row in summarize(arms, ["nam", "random", "dense"], [0.5], [0, 1, 2])}
    assert rows["random"]["nam_minus"] == pytest.approx(0.02) and rows["random"]["nam_minus_std"] == pytest.approx(0.0)
    assert rows["random"]["nam_minus_seeds"] == 2  # seed 2 has no NAM arm to pair with
    assert rows["random"]["accuracy_std"] > 0.1
    assert "nam_minus" not in rows["nam"] and "nam_minus" not in rows["dense"]
