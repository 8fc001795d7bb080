"""Recipes are validated: one line that names the key and what was expected."""

from pathlib import Path

import pytest

from nam_prune.errors import NamPruneError
from nam_prune.recipe import Recipe, changed_keys, load_recipe, recipe_from_dict

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    assert isinstance(load_recipe(path), Recipe)


def test_resnet50_cifar_recipe_settings():
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "resnet50_cifar.yaml")
    assert (recipe.sparsity.lr, recipe.sparsity.momentum, recipe.sparsity.weight_decay) == (0.1, 0.9, 5e-4)
    assert recipe.sparsity.penalty == 1e-4 and recipe.model.name == "resnet50_cifar"


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"prnue": {}}, "unknown key 'prnue' in recipe; did you mean 'prune'?"),
        ({"prune": {"macs_kep": 0.5}}, "unknown key 'prune.macs_kep' in prune; did you mean 'prune.macs_keep'?"),
        ({"prune": {"macs_keep": "half"}}, "prune.macs_keep must be a number, got str 'half'"),
        ({"prune": {"macs_keep": 1.0}}, r"prune.macs_keep = 1.0 is out of range: expected 0 < value < 1"),
        ({"prune": {"channel_ratio": -0.1}}, r"prune.channel_ratio = -0.1 is out of range"),
        ({"sparsity": {"penalty": -1e-4}}, r"sparsity.penalty = -0.0001 is out of range: expected 0 <= value"),
        ({"sparsity": {"epochs": 2.5}}, "sparsity.epochs must be an integer"),
        ({"nam": {"spatial": "yes"}}, "nam.spatial must be true or false"),
        ({"nam": {"gate_bias": "open"}}, "^nam.gate_bias must be a number or one of 'auto', got 'open'$"),
        (
            {"prune": {"scope": "globl"}},
            "prune.scope = 'globl' is not allowed: expected one of 'global', 'local' \\(did you mean 'global'\\?\\)",
        ),
        ({"data": ["fashion_mnist"]}, "data must be a mapping"),
        (["not", "a", "mapping"], "a recipe must be a YAML mapping"),
    ],
)
def test_bad_recipes(tree, message):
    with pytest.raises(NamPruneError, match=message):
        recipe_from_dict(tree)


def test_gate_bias_is_a_number_or_auto():
    assert recipe_from_dict({}).nam.gate_bias == "auto"
    assert recipe_from_dict({"nam": {"gate_bias": "auto"}}).nam.gate_bias == "auto"
    assert recipe_from_dict({"nam": {"gate_bias": 3}}).nam.gate_bias == 3.0


def test_yaml_exponent_without_dot_is_a_number():
    """PyYAML parses 1e-4 as a string; a float field accepts it, an int field does not."""
    recipe = recipe_from_dict({"sparsity": {"penalty": "1e-4"}})
    assert recipe.sparsity.penalty == 1e-4
    with pytest.raises(NamPruneError, match="sparsity.penalty must be a finite number"):
        recipe_from_dict({"sparsity": {"penalty": "nan"}})


def test_overrides_are_parsed_and_validated():
    recipe = recipe_from_dict({"prune": {"macs_keep": 0.5}}, ["prune.macs_keep=0.4", "nam.spatial=true", "name=x"])
    assert (recipe.prune.macs_keep, recipe.nam.spatial, recipe.name) == (0.4, True, "x")
    with pytest.raises(NamPruneError, match="unknown key 'prune.ratio'"):
        recipe_from_dict({}, ["prune.ratio=0.3"])
    with pytest.raises(NamPruneError, match="must look like section.key=value"):
        recipe_from_dict({}, ["prune.macs_keep"])
    with pytest.raises(NamPruneError, match="'name' is a value, not a section"):
        recipe_from_dict({"name": "run"}, ["name.x=1"])
    with pytest.raises(NamPruneError, match="name must be a string, got dict"):
        recipe_from_dict({}, ["name.x=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(NamPruneError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("prune: [unclosed\n")
    with pytest.raises(NamPruneError, match="not valid YAML at line"):
        load_recipe(broken)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"sparsity": {"open_gates": 2}}, "^sparsity.open_gates: gates are opened after the cut; set finetune.open_gates"),
        ({"finetune": {"epochs": 4, "open_gates": 2}, "prune": {"strip_gates": False}}, "set prune.strip_gates: true$"),
        ({"finetune": {"epochs": 2, "open_gates": 3}}, "^finetune.open_gates is 3 but finetune.epochs is 2"),
        ({"finetune": {"epochs": 4, "open_gates": 2}, "nam": {"compile": True}}, "set nam.compile: false or finetune.open_gates: 0$"),
    ],
)
def test_gate_opening_settings_that_cannot_work(tree, message):
    with pytest.raises(NamPruneError, match=message):
        recipe_from_dict(tree)


def test_gate_opening_rises_linearly_to_one_at_the_last_step_of_its_epochs():
    config = recipe_from_dict({"finetune": {"epochs": 5, "open_gates": 2}}).finetune
    openings = [config.gate_opening(step, steps_per_epoch=3) for step in range(9)]
    assert openings == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1])


def test_a_recipe_stored_before_a_family_key_existed_matches_today():
    """compare.json and last.pt keep the recipe they ran; a key added to a family section since
    (``yolo.close_mosaic``) ran with its default, so resuming must not call the recipe another."""
    today = Recipe().to_dict() | {"yolo": {**load_recipe(RECIPES[0]).to_dict()["yolo"]}}
    stored = {**today, "yolo": {k: v for k, v in today["yolo"].items() if k != "close_mosaic"}}
    assert changed_keys(stored, today) == ""
    assert changed_keys({**stored, "yolo": {**stored["yolo"], "imgsz": 320}}, today) == "yolo.imgsz: 320 there, 640 here"
