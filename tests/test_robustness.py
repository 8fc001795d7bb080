"""Never lose a run, never crash with a traceback: resume after kill -9, Ctrl-C, NaN, bad inputs, fuzz."""

import json
import pickle
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
import yaml
from conftest import QUICKSTART, ROOT, TINY, CliResult, cli, cli_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nam_prune
from nam_prune.artifact import ModelRecord, save
from nam_prune.checkpoint import read_checkpoint
from nam_prune.data import _cifar10
from nam_prune.errors import NamPruneError
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import PruneConfig, prune_model
from nam_prune.recipe import load_recipe, recipe_from_dict
from nam_prune.surgery import NAMConfig, insert_nam

RECIPE = QUICKSTART


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nam_prune", *args]


def _ctrl_c_as_from_a_terminal() -> None:
    """The child starts with SIGINT at its default and unblocked, as under a shell. In the full suite
    it was not (a run ignored every SIGINT and finished with rc 0; the pytest process's Python-level
    handler was unchanged, so a library set it below Python), and Python keeps an inherited ignore."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_checkpoint(folder: Path, stage: str) -> subprocess.Popen:
    process = subprocess.Popen(
        _command("run", RECIPE, *TINY, f"output={folder}"), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_from_a_terminal,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        last = folder / "last.pt"
        if last.is_file():
            progress = read_checkpoint(last)["progress"]  # never half-written: writes are atomic
            if progress["stage"] == stage and progress["epoch"] >= 1:
                return process
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"run never checkpointed {stage}: {process.stderr.read()[-2000:]}")


def _metrics(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    return {s: {k: results[s][k] for k in ("params", "macs", "accuracy")} for s in ("before", "pruned", "after")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fashion_root):
    folder = tmp_path_factory.mktemp("whole") / "run"
    result = cli_process("run", RECIPE, *TINY, f"output={folder}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (folder / "last.pt").exists()
    return _metrics(folder)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sparsity", "finetune"])
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, uninterrupted, stage):
    folder = tmp_path / "run"
    process = _start_and_wait_for_checkpoint(folder, stage)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (folder / "results.json").exists()
    resumed = cli_process("run", RECIPE, *TINY, f"output={folder}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    assert _metrics(folder) == uninterrupted


def test_ctrl_c_keeps_checkpoint_and_says_how_to_resume(tmp_path, fashion_root):
    folder = tmp_path / "run"
    process = _start_and_wait_for_checkpoint(folder, "sparsity")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    # press again while the run has not started to stop (it says "interrupted" at once when it does):
    # a SIGINT landing while Python runs a finalizer is printed as "Exception ignored" and lost
    for _ in range(40):
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        if process.poll() is not None or any("interrupted" in line for line in lines):
            break
    process.wait(timeout=120)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert process.returncode == 130
    assert "--resume" in stderr and "Traceback" not in stderr
    assert read_checkpoint(folder / "last.pt")["progress"]["epoch"] >= 1


def test_resume_needs_a_checkpoint_and_the_same_recipe(tmp_path, fashion_root):
    result = cli("run", RECIPE, *TINY, f"output={tmp_path / 'none'}", "--resume")
    assert result.returncode == 2 and "nothing to resume" in result.stderr
    folder = tmp_path / "run"
    process = _start_and_wait_for_checkpoint(folder, "sparsity")
    process.kill()
    process.wait()
    other = cli("run", RECIPE, *TINY, "finetune.lr=0.001", f"output={folder}", "--resume")
    assert other.returncode == 2 and "different recipe" in other.stderr


def test_nan_loss_names_epoch_and_step(tmp_path, fashion_root):
    result = cli("run", RECIPE, *TINY, "sparsity.optimizer=sgd", "sparsity.lr=1e30", f"output={tmp_path / 'nan'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "loss became" in result.stderr and "at epoch 1, step" in result.stderr


def test_debug_shows_traceback():
    result = cli_process("--debug", "run", "recipes/missing.yaml")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_unwritable_output_folder(tmp_path, fashion_root):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("run", RECIPE, *TINY, f"output={blocker / 'run'}")
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last_line.startswith("error: cannot create run folder")


def test_pickled_weights_need_the_trust_flag(tmp_path, fashion_root):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 2, 3)), path)
    result = cli("run", RECIPE, *TINY, f"model.weights={path}", f"output={tmp_path / 'r'}")
    assert result.returncode == 2 and "model.trust_pickle: true" in result.stderr
    trusted = cli("run", RECIPE, *TINY, f"model.weights={path}", "model.trust_pickle=true", f"output={tmp_path / 'r'}")
    assert trusted.returncode == 2 and "does not match the model architecture" in trusted.stderr
    assert "missing: conv1.weight" in trusted.stderr


class _ItemOutput(nn.Module):
    """A model whose forward leaves the autograd graph (returns a Python float)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return float(self.head(self.bn(self.conv(x))).mean())


def test_compiling_without_a_cpp_compiler_is_a_clear_error(tmp_path, fashion_root, monkeypatch):
    """nam.compile on the CPU needs a C++ compiler: a one-line error before any run folder is made."""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    recipe = recipe_from_dict({"output": str(tmp_path / "run"), "device": "cpu", "nam": {"compile": True},
                               "data": {"root": str(fashion_root)}})
    with pytest.raises(NamPruneError, match="needs a C\\+\\+ compiler"):
        nam_prune.run(recipe)
    assert not (tmp_path / "run").exists()


def test_untraceable_model_is_a_clear_error():
    model = insert_nam(_ItemOutput(), NAMConfig())
    with pytest.raises(NamPruneError, match="torch-pruning could not trace the model"):
        prune_model(model, torch.zeros(1, 1, 8, 8), PruneConfig(target="channels", channel_ratio=0.5))


@pytest.mark.parametrize("override", ["prune.max_pruning_ratio=1.0", "prune.channel_ratio=1", "prune.macs_keep=0"])
def test_budgets_that_would_empty_a_layer_are_rejected(override):
    with pytest.raises(NamPruneError, match="out of range"):
        recipe_from_dict({}, [override])


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)),
    max_leaves=8,
)
known_sections = st.sampled_from(["model", "nam", "data", "sparsity", "prune", "finetune", "report", "name", "seed"])
recipe_trees = st.one_of(
    yaml_values,
    st.dictionaries(known_sections, yaml_values, max_size=4),
    st.dictionaries(
        known_sections,
        st.dictionaries(
            st.sampled_from(["epochs", "lr", "macs_keep", "name", "spatial", "scope", "milestones", "x"]), yaml_values, max_size=3
        ),
        max_size=3,
    ),
)
overrides = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz._=0123456789-: [],\n\t", max_size=30), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=recipe_trees, extra=overrides)
def test_fuzzed_recipes_never_crash(tree, extra):
    """Any YAML document and overrides give a Recipe or a one-line NamPruneError, nothing else."""
    text = yaml.safe_dump(tree, allow_unicode=True)
    try:
        recipe_from_dict(yaml.safe_load(text), extra)
    except NamPruneError as error:
        assert "\n" not in str(error).strip()


# Bad inputs from a sweep of the CLI: each was an internal error, a four-line usage block, a silent
# no-op or a lost file before it ended in one line, exit code 2 and nothing written.


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    spec = ModelSpec("resnet8", in_channels=1, width=8)
    model = insert_nam(build_model(spec), NAMConfig(), torch.zeros(1, 1, 28, 28))
    path = tmp_path_factory.mktemp("saved") / "model.pt"
    save(path, model.eval(), ModelRecord(spec, (1, 28, 28), NAMConfig(), []))
    return path


def _one_line_error(result: CliResult, expected: str) -> None:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("INFO")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr


def test_export_will_not_overwrite_the_checkpoint_it_reads(saved_model):
    before = saved_model.read_bytes()
    _one_line_error(cli("export", str(saved_model), "-o", str(saved_model)), "would overwrite")
    assert saved_model.read_bytes() == before


def test_usage_errors_are_one_line(saved_model):
    _one_line_error(cli("export", str(saved_model), "--format", "tflite"), "Invalid value for '--format'")


def test_paths_the_os_refuses_are_one_line(saved_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _one_line_error(cli("report", str(saved_model), "--plots", str(blocker / "plots")), "Not a directory")
    _one_line_error(cli("run", RECIPE, *TINY, f"output={blocker}"), "cannot create run folder")


def test_check_refuses_an_unwritable_output_before_checking(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = cli("check", "resnet18", "--json", str(blocker / "out.json"))
    _one_line_error(result, "cannot write to")
    assert "MACs before" not in result.stdout  # refused before any model was built and cut


def test_check_refuses_an_unknown_name_before_checking():
    result = cli("check", "resnet18", "resnet5O")
    _one_line_error(result, "unknown model.name 'resnet5O' (did you mean")
    assert "MACs before" not in result.stdout  # refused before resnet18 was built and cut


def test_an_opset_above_the_exporters_is_one_line_and_no_graph_dump(saved_model, tmp_path):
    result = cli("export", str(saved_model), "--opset", "99", "-o", str(tmp_path / "m.onnx"))
    _one_line_error(result, "opset 99 is above the highest")
    assert result.stdout == "" and not (tmp_path / "m.onnx").exists()


def test_report_refuses_model_for_a_nam_checkpoint(saved_model):
    _one_line_error(cli("report", str(saved_model), "--model", "resnet50"), "drop --model")


def test_a_plain_pickle_is_refused_without_torch_warnings(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    _one_line_error(cli("report", str(path)), "cannot read checkpoint")


def test_an_unreachable_budget_fails_before_training_and_leaves_no_folder(tmp_path, fashion_root):
    folder = tmp_path / "run"
    for override in ("prune.round_to=1000", "prune.ignore=[no.such.layer]"):
        result = cli("run", RECIPE, *TINY, override, f"output={folder}")
        _one_line_error(result, "cannot reach" if "round_to" in override else "unknown modules: no.such.layer")
        assert "sparsity epoch" not in result.stderr and not folder.exists()


@pytest.mark.parametrize(
    ("tree", "message"),
    [({"name": "../../elsewhere"}, "plain folder name"),
     ({"model": {"name": "resnet20"}, "yolo": {"imgsz": 64}}, "the yolo: section is for")],
)
def test_recipes_that_would_be_silently_misread_are_refused(tree, message):
    with pytest.raises(NamPruneError, match=message):
        recipe_from_dict(tree)


def test_an_empty_recipe_file_is_refused(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(NamPruneError, match="is empty"):
        load_recipe(tmp_path / "empty.yaml")


def test_an_unknown_timm_name_is_one_line():
    pytest.importorskip("timm")
    with pytest.raises(NamPruneError, match="timm has no model 'nosuchnet'"):
        build_model(ModelSpec("timm:nosuchnet"))


def test_a_failed_cifar_download_says_where_to_put_it_and_leaves_no_folder(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    root = tmp_path / "cifar"
    with pytest.raises(NamPruneError, match="CIFAR-10 download failed .*put torchvision's 'cifar-10-batches-py'"):
        _cifar10(root, download=True, augment=False)
    assert not root.exists()


def _main_in_process(monkeypatch, *args: str) -> BaseException:
    """What ``nam_prune.cli.main`` raises for ``nam-prune ARGS``, run in this process (the logger
    the CLI configures is put back afterwards)."""
    import logging

    from nam_prune import cli as cli_module

    logger = logging.getLogger("nam_prune")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    monkeypatch.setattr(sys, "argv", ["nam-prune", *args])
    try:
        cli_module.main()
    except BaseException as error:  # SystemExit, or the re-raised error under --debug
        return error
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)
    pytest.fail("main() returned without raising SystemExit")


def test_debug_shows_the_chained_cause_and_the_plain_error_stays_one_line(tmp_path, monkeypatch, capsys):
    import traceback

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    error = _main_in_process(monkeypatch, "--debug", "report", str(corrupt))
    assert isinstance(error, NamPruneError) and isinstance(error.__cause__, pickle.UnpicklingError)
    shown = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert "The above exception was the direct cause of the following exception" in shown
    assert "UnpicklingError" in shown and "cannot read checkpoint" in shown
    capsys.readouterr()
    exit_ = _main_in_process(monkeypatch, "report", str(corrupt))
    assert isinstance(exit_, SystemExit) and exit_.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot read checkpoint"), lines


def test_check_gives_every_model_a_row_when_one_fails(monkeypatch, tmp_path):
    """A model that fails (here a simulated bug while cutting resnet18) is a row with its one-line
    reason; the models after it are still checked, and the exit status says something failed."""
    from nam_prune import check as check_module

    real_prune = check_module.prune_model

    def prune_or_fail(model, *args, **kwargs):
        if model.fc.in_features == 512:  # resnet18, not the tiny CIFAR ResNet
            raise RuntimeError("shape '[1, 2, 63]' is invalid\nsecond line")
        return real_prune(model, *args, **kwargs)

    monkeypatch.setattr(check_module, "prune_model", prune_or_fail)
    result = cli("check", "resnet18", "resnet8", "--json", str(tmp_path / "out.json"))
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    rows = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [r["model"] for r in rows] == ["resnet18", "resnet8"]
    assert rows[0]["status"] == f"{check_module.INTERNAL_ERROR}: RuntimeError: shape '[1, 2, 63]' is invalid"
    assert rows[1]["status"] == "ok" and rows[1]["macs_after"]["global"] <= 0.5 * rows[1]["macs_before"]


def test_a_sweep_worker_that_dies_is_a_row_and_the_sweep_goes_on(monkeypatch):
    """``check --sweep`` runs each model in a worker process: one killed by the kernel (out of
    memory) gets a one-line row, and the next model starts a fresh worker."""
    from nam_prune import check as check_module

    class DeadPool:
        def submit(self, *args, **kwargs):
            raise check_module.BrokenProcessPool("killed")

        def shutdown(self, **kwargs):
            pass

    with check_module.IsolatedChecks() as isolated:
        isolated._pool = DeadPool()
        died = isolated.check("resnet8", 32, 0.5, "cifar")
        assert died.status.startswith("the check's process died (out of memory at 32 px")
        assert isolated._pool is None
        survived = isolated.check("resnet8", 32, 0.5, "cifar")
    assert survived.status == "ok" and survived.macs_after["global"] <= 0.5 * survived.macs_before


def test_torch_running_out_of_memory_is_a_reason_not_an_internal_error(monkeypatch):
    from nam_prune import check as check_module

    def exhausted(spec):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(check_module, "build_model", exhausted)
    assert check_module.check_model("resnet8", 32).status == "ran out of memory checking it at 32 px; not supported"


def test_a_sweep_model_that_runs_too_long_is_stopped_and_the_sweep_goes_on(monkeypatch):
    """A model whose check does not end (torch-pruning's groups can grow without bound) is a row once
    ``WORKER_SECONDS`` pass, its worker killed; the next model gets a fresh one."""
    from nam_prune import check as check_module

    monkeypatch.setattr(check_module, "WORKER_SECONDS", 0.01)
    with check_module.IsolatedChecks() as isolated:
        stopped = isolated.check("resnet18", 64, 0.5, "torchvision")
        assert stopped.status == "not checked in 0.01 s at 64 px (stopped); not supported"
        assert isolated._pool is None
        monkeypatch.setattr(check_module, "WORKER_SECONDS", 300)
        survived = isolated.check("resnet8", 32, 0.5, "cifar")
        assert isolated._pool is None  # every model gets a fresh worker: one's leftovers cannot fail the next
    assert survived.status == "ok" and survived.macs_after["global"] <= 0.5 * survived.macs_before


def test_a_checkpoint_from_before_a_new_recipe_key_still_resumes(tmp_path):
    """A ``last.pt`` written before a recipe key existed (``export``, ``prune.latency_keep``) holds
    that key's default: it is the same recipe and resumes; a changed value still is not."""
    from nam_prune.checkpoint import write_checkpoint
    from nam_prune.pipeline import _resume_point
    from nam_prune.recipe import load_recipe

    recipe = load_recipe(RECIPE, [*TINY, f"output={tmp_path / 'run'}"])
    older = recipe.to_dict()
    del older["export"], older["prune"]["latency_keep"], older["prune"]["runtime"], older["yolo"]["close_mosaic"]
    (tmp_path / "run").mkdir()
    write_checkpoint(tmp_path / "run" / "last.pt", {"recipe": older})
    folder, _ = _resume_point(recipe, recipe.to_dict())
    assert folder == tmp_path / "run"
    changed = load_recipe(RECIPE, [*TINY, "finetune.lr=0.001", f"output={tmp_path / 'run'}"])
    with pytest.raises(NamPruneError, match=r"different recipe \(finetune.lr: 0.005 there, 0.001 here\); resume with"):
        _resume_point(changed, changed.to_dict())
    write_checkpoint(tmp_path / "run" / "last.pt", {"state_dict": {}})  # not written by run: nothing to compare with
    with pytest.raises(NamPruneError, match=r"records no recipe, so it cannot be resumed: run without --resume"):
        _resume_point(recipe, recipe.to_dict())
