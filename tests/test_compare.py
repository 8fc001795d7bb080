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


def test_every_criterion_meets_its_budget_and_plot_is_written(tmp_path, fashion_root):
    criteria = ["nam", "bn_slimming", "l1", "random", "dense"]
    state = compare(recipe_from_dict(TINY), criteria, [0.3, 0.6], [0], tmp_path)
    assert len(state["arms"]) == 9  # 4 criteria x 2 budgets + the unpruned dense arm
    arms = {(a["criterion"], a["budget"]): a for a in state["arms"]}
    dense = arms.pop(("dense", 0.0))
    assert dense["macs_removed"] == 0 and "accuracy_pruned" not in dense
    assert dense["accuracy"] > 0.3  # 10 classes: chance is 0.1
    for arm in arms.values():
        assert abs(arm["macs_removed"] - arm["budget"]) <= 0.02, arm
        assert arm["macs"] < dense["macs"]
        assert set(arm) >= {"accuracy_trained", "accuracy_pruned", "accuracy_recalibrated", "accuracy"}
    # l1, random and dense train the same plain model (same seed): one cached model, one accuracy
    assert arms[("l1", 0.3)]["accuracy_trained"] == arms[("random", 0.6)]["accuracy_trained"] == dense["accuracy_trained"]
    plot_accuracy_vs_macs(state["summary"], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "compare.json").read_text())["summary"][0]["seeds"] == 1


def test_interrupted_comparison_resumes_with_finished_arms_kept(tmp_path, monkeypatch, fashion_root):
    recipe = recipe_from_dict(TINY)
    real_arm = compare_module._arm
    calls = []

    def interrupted_arm(criterion, budget, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((criterion, budget))
        return real_arm(criterion, budget, *args)

    monkeypatch.setattr(compare_module, "_arm", interrupted_arm)
    with pytest.raises(KeyboardInterrupt):
        compare(recipe, ["nam", "random"], [0.3, 0.5], [0], tmp_path)
    kept = json.loads((tmp_path / "compare.json").read_text())["arms"]
    assert [(a["criterion"], a["budget"]) for a in kept] == calls == [("nam", 0.3), ("nam", 0.5)]
    monkeypatch.setattr(compare_module, "_arm", real_arm)
    rerun = []
    monkeypatch.setattr(compare_module, "_arm", lambda c, b, *a: rerun.append((c, b)) or real_arm(c, b, *a))
    state = compare(recipe, ["nam", "random"], [0.3, 0.5], [0], tmp_path)
    assert rerun == [("random", 0.3), ("random", 0.5)]
    assert len(state["arms"]) == 4 and kept == state["arms"][:2]
