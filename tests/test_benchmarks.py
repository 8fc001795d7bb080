"""``python -m benchmarks``: the dispatcher (fast), and each benchmark at its smallest real settings
(slow: ``-m slow``), in-process, one thread, writing its JSON into ``tmp_path``. The figures of so
small a run are noise; what is checked is that each benchmark runs end to end and writes what its
README rows are read from, with the command that made the file."""

from __future__ import annotations

import importlib
import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch

import nam_prune.compare as compare_module
from benchmarks import names, summary
from benchmarks.__main__ import main as dispatch
from benchmarks.timing import RESULTS, result_path
from nam_prune.compare import compare
from nam_prune.pipeline import run
from nam_prune.recipe import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
KEPT = ["gate_cost", "int8", "int8_sensitivity", "latency_floor", "latency_target", "nam_gate", "nam_scoring", "profile_ops",
        "prune_overhead", "run_speedup", "speedup", "train_overhead", "yolo_width_control"]
RUNTIMES = [f"{runtime}_{batch}" for batch in ("bs1", "bs32") for runtime in ("torch", "torchscript", "ort")]


def test_help_lists_the_benchmarks_and_an_unknown_name_is_a_usage_error(capsys):
    assert names() == KEPT  # timing is a helper, not a benchmark
    assert dispatch(["--help"]) == 0
    listing = capsys.readouterr().out
    rows = listing.split("benchmarks:\n", 1)[1].splitlines()
    assert [row.split()[0] for row in rows] == KEPT
    assert all(row.split(None, 1)[1] == summary(name) and summary(name) for row, name in zip(rows, KEPT))
    assert dispatch([]) == 2 and capsys.readouterr().out == listing
    assert dispatch(["deploy_defaults", "--json", "x.json"]) == 2  # retired
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "'deploy_defaults'" in captured.err and ", ".join(KEPT) in captured.err


def test_the_dispatcher_hands_the_rest_to_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit:
        dispatch(["nam_gate", "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m benchmarks nam_gate ")


def test_a_bare_json_name_goes_into_docs():
    assert result_path("speedup_new.json") == RESULTS / "speedup_new.json" == ROOT / "docs" / "speedup_new.json"
    assert result_path("runs/x.json") == Path("runs/x.json")


def run_benchmark(name: str, args: list[str], tmp_path: Path) -> dict:
    """``benchmarks.<name>.main(args + --json)`` in-process; its JSON, checked for what every one records."""
    out = tmp_path / f"{name}.json"
    argv = [*args, "--json", str(out)]
    importlib.import_module(f"benchmarks.{name}").main(argv)
    result = json.loads(out.read_text())
    assert result["command"].endswith(f"python -m benchmarks {name} {shlex.join(argv)}")
    assert result["torch"] == torch.__version__ and result["threads"] >= 1 and result["cpu"]
    assert isinstance(result["allocator_env"], dict)
    assert not list(tmp_path.glob(f".{out.name}.*.tmp"))  # written atomically, nothing left beside it
    return result


def positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_speedup(tmp_path):
    result = run_benchmark("speedup", ["--models", "resnet8", "--image-size", "32", "--round-to", "8", "--rounds", "2",
                                       "--runs1", "1", "--runs32", "1", "--warmup", "0", "--threads", "1"], tmp_path)
    dense, stripped, gated = result["rows"]
    assert [row["variant"] for row in result["rows"]] == ["dense", "round_to=8", "round_to=8 +gates"]
    assert dense["macs_speedup"] == 1.0 and positive(*dense["ms"].values()) and len(dense["ms"]) == 8
    for row in (stripped, gated):
        assert row["macs_speedup"] > 1.5  # --keep 0.5
        assert positive(*row["ms"].values(), *row["realised"].values())
        assert row["realised"].keys() == dense["ms"].keys() == row["realised_paired"].keys()
        paired = row["realised_paired"]["torchscript_bs1"]
        assert len(paired["rounds"]) == 2 and positive(paired["median"], *paired["quartiles"])
    assert sum(stripped["channels"].values()) < sum(dense["channels"].values())


def _tiny_run(folder: Path, fashion_root: Path, overrides: tuple[str, ...] = ()) -> Path:
    """A quickstart run folder (dense.pt, model.pt) from 128 images and one epoch a stage, on one thread
    (the conftest restores the count)."""
    torch.set_num_threads(1)
    recipe = load_recipe(ROOT / "recipes" / "fashion_quickstart.yaml", [
        "data.train_subset=128", "data.test_subset=64", "data.batch_size=32", "sparsity.epochs=1", "finetune.epochs=1",
        "recalibrate.batches=1", "report.latency_runs=1", "report.warmup=0", "report.baseline=false",
        f"data.root={fashion_root}", f"output={folder}", *overrides])
    return run(recipe).folder


@pytest.fixture
def tiny_run(tmp_path, fashion_root) -> Path:
    return _tiny_run(tmp_path / "run", fashion_root)


@pytest.mark.slow
def test_latency_target(tmp_path, fashion_root, monkeypatch):
    from nam_prune.prune import latency

    monkeypatch.setattr(latency, "TURN_SECONDS", 0.005)  # what is recorded, not how well it times
    folder = _tiny_run(tmp_path / "run", fashion_root, ("prune.target=latency", "prune.latency_keep=0.7", "prune.runtime=torch"))
    result = run_benchmark("latency_target", [str(folder), "--repeats", "2", "--threads", "1"], tmp_path)
    (row,) = result["rows"]
    assert (row["runtime"], row["batch"], row["target"]) == ("torch", 1, 0.7)
    assert len(row["ratios_here"]) == len(row["dense_ms_here"]) == len(row["pruned_ms_here"]) == 2
    assert positive(row["ratio_in_run"], *row["ratios_here"], *row["dense_ms_here"], *row["pruned_ms_here"])
    assert row["off_target"] == pytest.approx(row["ratio_here"] / 0.7 - 1)
    macs_run = _tiny_run(tmp_path / "macs", fashion_root)
    with pytest.raises(SystemExit, match="the run has no latency target"):
        run_benchmark("latency_target", [str(macs_run)], tmp_path)


@pytest.mark.slow
def test_run_speedup(tiny_run, tmp_path):
    result = run_benchmark("run_speedup", [str(tiny_run), "--runs", "1", "--threads", "1"], tmp_path)
    (row,) = result["rows"]
    assert row["run"] == str(tiny_run) and row["recipe_prune"]["macs_keep"] == 0.5
    assert row["macs_speedup"] > 1.5
    assert list(row["realised"]) == list(row["dense_ms"]) == list(row["pruned_ms"])
    assert sorted(row["realised"]) == sorted(RUNTIMES)
    assert positive(*row["realised"].values(), *row["dense_ms"].values(), *row["pruned_ms"].values())


@pytest.mark.slow
def test_int8_sensitivity(tiny_run, tmp_path):
    """Every top-level module of the run's ResNet-8 gets a score with its convolutions in float; keeping
    all of them in float is the FP32 file, so the module scores lie around the INT8 one."""
    result = run_benchmark("int8_sensitivity", [str(tiny_run / "model.pt"), "--threads", "1"], tmp_path)
    assert result["mode"] == "float" and not result["float_stem"] and result["score_key"] == "accuracy"
    assert result["test_images"] == 64
    assert set(result["modules"]) == set(result["convolutions"]) and len(result["modules"]) >= 3
    assert sum(result["convolutions"].values()) >= 7  # ResNet-8: stem, 3 blocks of 2, 2 downsampling shortcuts
    assert all(0 < score <= 1 for score in [result["fp32"], result["int8"], *result["modules"].values()])


@pytest.mark.slow
def test_int8(tiny_run, tmp_path):
    result = run_benchmark("int8", [str(tiny_run / "model.pt"), "--runs", "1", "--rounds", "2", "--threads", "1"], tmp_path)
    assert (result["model"], result["calibration_images"], result["test_images"]) == (str(tiny_run / "model.pt"), 128, 64)
    assert result["score_key"] == "accuracy"
    assert all(0 <= score <= 1 for score in result["scores"].values()) and set(result["scores"]) == {"fp32", "int8"}
    assert list(result["fp32_ms"]) == list(result["int8_ms"]) == list(result["int8_speedup"]) == ["ort_bs1", "ort_bs32"]
    assert positive(*result["fp32_ms"].values(), *result["int8_ms"].values())
    for ratio in result["int8_speedup"].values():  # paired: one ratio per alternating round
        assert len(ratio["rounds"]) == 2 and positive(ratio["median"], *ratio["quartiles"], *ratio["rounds"])


@pytest.mark.slow
def test_latency_floor(tmp_path):
    result = run_benchmark("latency_floor", ["--model", "resnet18", "--image-size", "32", "--keeps", "0.75,0.5",
                                             "--runs", "1", "--rounds", "2", "--threads", "1"], tmp_path)
    macs = result["macs"]
    assert len(macs) == 3 and macs[0] > macs[1] > macs[2] > 0
    assert positive(*result["dense_ms"].values()) and set(result["dense_ms"]) == {"torchscript", "ort"}
    for fit in result["fits"].values():  # the fit of two timed points' noise may have any sign
        assert all(math.isfinite(value) for value in fit.values())
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert positive(row["ms"], row["realised"]) and row["macs_speedup"] > 1 and math.isfinite(row["ceiling"])


@pytest.mark.slow
def test_profile_ops(tmp_path):
    result = run_benchmark("profile_ops", ["--model", "resnet18", "--image-size", "32", "--batch", "2", "--calls", "1",
                                           "--onednn", "--threads", "1"], tmp_path)
    assert result["macs_speedup"] > 1.5  # cut to half of the MACs
    assert positive(*result["total_ms"].values(), *result["wall_ms"].values())
    assert any(row["op"].startswith("aten::") and row["op"].endswith("px") for row in result["rows"])
    assert all(row["dense_ms"] >= 0 and row["pruned_ms"] >= 0 for row in result["rows"])
    for kernels in result["onednn"].values():
        assert any(key.startswith("convolution:") and positive(k["ms"], k["macs"]) for key, k in kernels.items())


@pytest.mark.slow
def test_train_overhead(tmp_path):
    """Eager paths only: the compiled ones compile ResNet-8 and its gates, minutes on two cores."""
    result = run_benchmark("train_overhead", ["--model", "resnet8", "--classes", "10", "--batch", "2", "--size", "32",
                                              "--steps", "1", "--eager-only", "--threads", "1"], tmp_path)
    assert result["model"] == "resnet8" and result["compiled_graphs"] is None
    assert [row["mode"] for row in result["rows"]] == ["eager gates", "eager gates, torch ops"]
    assert all(positive(row["plain_s"], row["nam_s"], row["ratio"]) for row in result["rows"])


@pytest.mark.slow
def test_nam_gate(tmp_path):
    result = run_benchmark("nam_gate", ["--repeats", "1", "--shapes", "2x8x4x4", "--threads", "1"], tmp_path)
    assert [row["path"] for row in result["rows"]] == ["kernel", "torch ops", "compiled"]
    for row in result["rows"]:
        assert row["shape"] == [2, 8, 4, 4] and row["max_abs_diff"] < 1e-5
        assert positive(row["time_ratio"], row["memory_ratio"])


@pytest.mark.slow
def test_prune_overhead(tmp_path):
    result = run_benchmark("prune_overhead", ["--model", "resnet8", "--image-size", "32", "--repeats", "1",
                                              "--threads", "1"], tmp_path)
    assert result["model"] == "resnet8" and positive(result["ratio"], result["torch_pruning_s"], result["nam_prune_s"])
    assert {label: len(times) for label, times in result["seconds"].items()} == {"torch-pruning": 1, "nam-prune": 1}


@pytest.mark.slow
def test_yolo_width_control(tmp_path, fashion_root):
    if not os.environ.get("CI"):
        pytest.importorskip("ultralytics")
    result = run_benchmark("yolo_width_control", ["--width", "0.1", "--epochs", "1", "--images", "10", "--image-size", "64",
                                                  "--batch", "8", "--out", str(tmp_path / "out")], tmp_path)
    assert result["width_multiple"] == 0.1 and result["epochs"] == 1 and result["images"] == 10
    assert positive(result["params"], result["gflops_at_160"])
    assert 0 <= result["map50_95"] <= result["map50"] <= 1
    assert (tmp_path / "out" / "train" / "weights" / "last.pt").is_file()


@pytest.mark.slow
def test_gate_cost(tmp_path, fashion_root):
    args = ["--model", "resnet8", "--epochs", "1", "--train-images", "128", "--test-images", "64", "--seeds", "0",
            "--except", r"layer\d\.0\.bn2", "--threads", "1"]
    result = run_benchmark("gate_cost", args, tmp_path)
    assert (result["model"], result["epochs"], result["seeds"]) == ("resnet8", 1, [0])
    assert sorted(result["top1"]) == ["gated", "gated_except", "plain"]
    assert all(len(v) == 1 and 0 < v[0] <= 1 for v in result["top1"].values())


@pytest.mark.slow
def test_nam_scoring_recuts_the_compare_models_and_reproduces_its_nam_arm(tmp_path):
    """A tiny digits compare, then its NAM models re-cut (an override after the recipe, as the
    compare had it): compare's own ranking again gives the same arm to the digit, the spread score
    meets the same budget, and compare's criteria are its own again afterwards."""
    tiny = {"model": {"name": "resnet8", "width": 16}, "prune": {"round_to": 1},
            "data": {"name": "digits", "root": "", "train_subset": 256, "test_subset": 128, "batch_size": 64},
            "sparsity": {"epochs": 1}, "finetune": {"epochs": 1}, "recalibrate": {"batches": 2},
            "report": {"latency_runs": 1, "warmup": 0}}
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(json.dumps(tiny))  # JSON is YAML
    criteria = compare_module.CRITERIA, compare_module._training, compare_module._importance
    torch.set_num_threads(1)  # as the benchmark's --threads 1: the arms must match to the digit
    compare(recipe_from_dict({**tiny, "finetune": {"epochs": 1, "lr": 0.02}}), ["nam"], [0.5], [0], tmp_path / "compare")
    result = run_benchmark("nam_scoring", [str(recipe_file), "finetune.lr=0.02", "--from", str(tmp_path / "compare"), "--output",
                                           str(tmp_path / "scoring"), "--scores", "nam_again,nam_std",
                                           "--macs-keep", "0.5", "--seeds", "0", "--threads", "1"], tmp_path)
    arms = {a["criterion"]: a for a in result["arms"]}
    assert set(arms) == {"nam", "nam_again", "nam_std"}
    same = ("macs", "params", "accuracy_pruned", "accuracy_recalibrated", "accuracy")
    assert [arms["nam_again"][k] for k in same] == [arms["nam"][k] for k in same]
    assert abs(arms["nam_std"]["macs_kept"] - 0.5) <= 0.02 and arms["nam_std"]["accuracy"] > 0.1
    assert {row["criterion"] for row in result["summary"]} == {"nam", "nam_again", "nam_std"}
    assert (compare_module.CRITERIA, compare_module._training, compare_module._importance) == criteria
