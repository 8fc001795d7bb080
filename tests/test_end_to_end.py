"""The whole pipeline on a few hundred real Fashion-MNIST images, through the API and the CLI."""

import json
from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, ROOT, TINY, cli, cli_process

import nam_prune
from nam_prune.data import load_data
from nam_prune.recipe import load_recipe, recipe_from_dict


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, fashion_root):
    """One tiny real run through the console script in its own process, shared by the contract tests below."""
    folder = tmp_path_factory.mktemp("e2e")
    result = cli_process("run", QUICKSTART, *TINY, f"output={folder / 'run'}", cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "run", result


def test_run_writes_model_and_results(quick_run):
    run_dir, _ = quick_run
    results = json.loads((run_dir / "results.json").read_text())
    for stage in ("before", "pruned", "recalibrated", "after", "baseline"):
        assert set(results[stage]) >= {"params", "macs", "accuracy", "latency_ms", "torchscript_latency_ms"}
        assert 0.0 <= results[stage]["accuracy"] <= 1.0
        assert results[stage]["latency_ms"] > 0 and results[stage]["torchscript_latency_ms"] > 0
    assert results["recalibrated"]["macs"] == results["pruned"]["macs"] == results["after"]["macs"]
    assert results["baseline"]["macs"] == results["before"]["macs"]  # the unpruned model, trained as long
    assert results["baseline"]["accuracy"] > 0.4
    assert results["after"]["macs"] <= 0.5 * results["before"]["macs"]
    assert results["after"]["params"] < results["before"]["params"]
    assert results["after"]["accuracy"] > 0.4  # 10 classes: chance is 0.1
    assert results["recipe"]["model"]["name"] == "resnet8"
    assert results["versions"]["torch"] == torch.__version__
    assert any(row["pruned"] > 0 for row in results["layers"])
    assert results["layers"][-1] == {"layer": "fc", "before": 10, "after": 10, "pruned": 0.0}


def test_report_json_agrees_with_results(quick_run):
    run_dir, _ = quick_run
    results = json.loads((run_dir / "results.json").read_text())
    report = cli("report", str(run_dir / "model.pt"), "--json", cwd=run_dir)
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert (summary["params"], summary["macs"]) == (results["after"]["params"], results["after"]["macs"])
    assert summary["pruned"] is True and "accuracy" in summary and summary["accuracy"] is None


def test_report_with_data_reproduces_accuracy(quick_run):
    run_dir, _ = quick_run
    results = json.loads((run_dir / "results.json").read_text())
    recipe = load_recipe(QUICKSTART, TINY)
    model = nam_prune.load(run_dir / "model.pt")
    data = load_data(recipe.data, recipe.seed)
    assert nam_prune.evaluate(model, data.test, torch.device("cpu")) == pytest.approx(results["after"]["accuracy"])


def test_existing_run_folder_is_not_overwritten(tmp_path):
    recipe = recipe_from_dict({"output": str(tmp_path / "r")})
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "model.pt").write_text("keep me")
    from nam_prune.pipeline import run_folder

    assert run_folder(recipe, overwrite=False) == tmp_path / "r-2"
    assert (tmp_path / "r" / "model.pt").read_text() == "keep me"
    assert run_folder(recipe, overwrite=True) == tmp_path / "r"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "recipes/resnet50_cifar.yaml"], "CIFAR-10 not found: put torchvision's 'cifar-10-batches-py'"),
        (["run", "recipes/fashion_quickstart.yaml", "prune.macs_kep=0.4"], "did you mean 'prune.macs_keep'"),
        (["run", "recipes/fashion_quickstart.yaml", "prune.macs_keep=1.5"], "out of range"),
        (["run", "recipes/fashion_quickstart.yaml", "data.root=/nonexistent"], "apt-get install dataset-fashion-mnist"),
        (["run", "recipes/missing.yaml"], "recipe recipes/missing.yaml not found"),
        (["report", "nothing.pt"], "checkpoint nothing.pt does not exist"),
        (["run", "recipes/fashion_quickstart.yaml", "model.name=resnet21"], "unknown model.name 'resnet21'"),
    ],
)
def test_bad_inputs_print_one_line(args, message):
    result = cli(*args, cwd=ROOT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_digits_short_finetune_beats_chance(tmp_path):
    """A second real data set (scikit-learn digits), through the API."""
    result = nam_prune.run(_digits_recipe(tmp_path, finetune={"epochs": 3}))
    assert result.results["after"]["accuracy"] > 0.5
    assert result.results["after"]["macs"] < result.results["before"]["macs"]
    assert (result.folder / "model.pt").is_file()


def test_report_evaluates_on_a_named_data_set(quick_run):
    run_dir, _ = quick_run
    report = cli("report", str(run_dir / "model.pt"), "--data", "fashion_mnist", "--json", cwd=run_dir)
    assert report.returncode == 0, report.stderr
    accuracy = json.loads(report.stdout)["accuracy"]
    assert 0.3 < accuracy <= 1.0  # the full 10,000-image test split


def _digits_recipe(tmp_path, **sections):
    tree = {
        "output": str(tmp_path / "digits"),
        "model": {"name": "resnet8", "width": 8},
        "data": {"name": "digits", "batch_size": 64},
        "sparsity": {"epochs": 1},
        "prune": {"target": "channels", "channel_ratio": 0.3, "round_to": 8},  # the default 16 keeps 8-16-wide layers whole
        "finetune": {"epochs": 1, "lr": 0.05},
        "report": {"latency_runs": 1, "warmup": 0},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return recipe_from_dict(tree)


def test_gates_opened_while_fine_tuning_leave_a_plain_model(tmp_path):
    """finetune.open_gates: the gated model is what the cut is measured on and what fine-tuning starts
    from; the run hands back the plain model, which reloads with the run's accuracy."""
    from nam_prune.gates import NAMGated

    recipe = _digits_recipe(tmp_path, finetune={"epochs": 3, "open_gates": 2})
    result = nam_prune.run(recipe)
    assert not any(isinstance(m, NAMGated) for m in result.model.modules())
    assert result.results["after"]["accuracy"] > 0.5
    model = nam_prune.load(result.folder / "model.pt")
    assert not any(isinstance(m, NAMGated) for m in model.modules())
    data = load_data(recipe.data, recipe.seed)
    assert nam_prune.evaluate(model, data.test, torch.device("cpu")) == pytest.approx(result.results["after"]["accuracy"])
    baseline = result.results["baseline"]  # the dense model fine-tuned as long, its gates opened the same way
    assert baseline["macs"] < result.results["before"]["macs"]  # measured without the gates' own BN
    assert baseline["accuracy"] > 0.5


@pytest.mark.slow
def test_compiled_training_runs_the_whole_model_through_torch_compile(tmp_path):
    """nam.compile: true on a classifier trains a compiled model in every stage and still learns."""
    from torch._dynamo.utils import counters

    counters.clear()
    result = nam_prune.run(_digits_recipe(tmp_path, nam={"compile": True}, finetune={"epochs": 2}))
    assert counters["stats"]["unique_graphs"] >= 2  # sparsity training and the pruned model's fine-tuning
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert result.results["after"]["accuracy"] > 0.5


def test_plain_state_dict_starts_a_run(tmp_path):
    """A torchvision-style state dict (no NAM) is loaded before the gates go in."""
    from nam_prune.models import ModelSpec, build_model

    dense = build_model(ModelSpec("resnet8", num_classes=10, in_channels=1, width=8))
    with torch.no_grad():
        dense.conv1.weight.fill_(0.25)
    torch.save(dense.state_dict(), tmp_path / "plain.pt")
    recipe = _digits_recipe(tmp_path, model={"weights": str(tmp_path / "plain.pt")}, sparsity={"epochs": 0})
    result = nam_prune.run(recipe)
    assert result.results["before"]["params"] > result.results["after"]["params"]
    dense_start = nam_prune.load(result.folder / "dense.pt")
    assert torch.all(dense_start.conv1.weight == 0.25)  # no sparsity epochs: the given weights are kept


def test_iterative_pruning_keeps_max_ratio_of_original_layers(tmp_path):
    recipe = _digits_recipe(
        tmp_path, prune={"steps": 3, "epochs_between_steps": 1, "channel_ratio": 0.6, "max_pruning_ratio": 0.7}
    )
    result = nam_prune.run(recipe)
    for row in result.results["layers"]:
        assert row["after"] >= row["before"] * 0.3 - 1e-9
    removed = 1 - sum(r["after"] for r in result.results["layers"][:-1]) / sum(r["before"] for r in result.results["layers"][:-1])
    assert 0.4 < removed < 0.7
    reloaded = nam_prune.load(result.folder / "model.pt")
    with torch.no_grad():
        x = torch.randn(2, 1, 8, 8)
        assert torch.equal(reloaded(x), result.model.cpu().eval()(x))


def test_report_plots(quick_run, tmp_path):
    """model.pt (gates stripped by default) plots the channels kept; dense.pt, which has its gates, the gammas."""
    run_dir, _ = quick_run
    expected = {"model.pt": ["channels_kept.png"], "dense.pt": ["gamma_hist.png", "gamma_hist_per_layer.png"]}
    for checkpoint, names in expected.items():
        folder = tmp_path / checkpoint
        report = cli("report", str(run_dir / checkpoint), "--plots", str(folder), "--json", cwd=run_dir)
        assert report.returncode == 0, report.stderr
        written = sorted(Path(p).name for p in json.loads(report.stdout)["plots"])
        assert written == names
        for name in written:
            assert (folder / name).read_bytes()[:4] == b"\x89PNG"


def test_spatial_lambda_maps_are_plotted(tmp_path):
    from nam_prune.models import ModelSpec, build_model
    from nam_prune.plots import gamma_plots
    from nam_prune.surgery import NAMConfig, insert_nam

    model = insert_nam(build_model(ModelSpec("resnet8", in_channels=1, width=8)), NAMConfig(spatial=True),
                       torch.zeros(1, 1, 28, 28))
    written = gamma_plots(model, {"metrics": {"prune_threshold": 0.8}}, tmp_path)
    assert len([p for p in written if p.name.startswith("lambda_")]) == 9


def test_a_teacher_pulls_the_student_towards_its_outputs(fashion_small):
    """Distillation through ``fit``: a teacher that always says class 3, weighted far above the labels,
    makes a student trained on real images answer 3 (its labels alone give 10 balanced classes)."""
    from nam_prune.models import ModelSpec, build_model
    from nam_prune.train import TrainConfig, distillation_loss, fit

    logits = torch.randn(4, 10)
    assert distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, -logits).item() > 0.1

    class SaysThree(torch.nn.Module):
        def forward(self, images):
            return torch.nn.functional.one_hot(torch.full((len(images),), 3), 10).float() * 10

    config = TrainConfig(epochs=1, optimizer="adamw", lr=0.005, distill=50.0)
    answers = []
    for teacher in (SaysThree(), None):
        model = build_model(ModelSpec("resnet8", num_classes=10, in_channels=1, width=8))
        fit(model, fashion_small.train, config, torch.device("cpu"), "distil", teacher=teacher)
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(images).argmax(1) for images, _ in fashion_small.test])
        answers.append(float((predicted == 3).float().mean()))
    assert answers[0] > 0.7 and answers[1] < 0.3, answers  # a tenth of the images are 3s


@pytest.mark.slow
def test_finetune_distils_from_a_teacher_checkpoint(quick_run, tmp_path):
    run_dir, _ = quick_run
    dense = str(run_dir / "dense.pt")
    overrides = [*TINY, f"model.weights={dense}", "sparsity.epochs=0", "finetune.epochs=1", f"finetune.teacher={dense}",
                 "report.baseline=false", f"output={tmp_path / 'kd'}"]
    done = cli("run", QUICKSTART, *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert results["recipe"]["finetune"]["teacher"] == dense
    assert results["after"]["accuracy"] > 0.4
    assert results["after"]["macs"] <= 0.5 * results["before"]["macs"]


def test_a_teacher_that_does_not_fit_is_one_line_before_the_run(quick_run, tmp_path):
    run_dir, _ = quick_run
    cases = {
        f"finetune.teacher={tmp_path / 'nothing.pt'}": "does not exist",
        f"sparsity.teacher={run_dir / 'dense.pt'}": "use a model trained on this data",  # Fashion-MNIST's, on digits
    }
    for override, message in cases.items():
        done = cli("run", QUICKSTART, "data.name=digits", override, f"output={tmp_path / 'r'}", cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], done.stderr
        assert not (tmp_path / "r").exists()
