"""The package's shape: one prune verb driven by its config, no import cycles, no YOLO in the
core, and the defects found while restructuring (each pinned by a test)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nam_prune import cli as cli_module
from nam_prune import distributed
from nam_prune.artifact import ModelRecord, save
from nam_prune.checkpoint import FORMAT, FORMAT_VERSION, read_checkpoint
from nam_prune.data import DataConfig, load_data
from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate
from nam_prune.models import ModelSpec, build_model
from nam_prune.pipeline import _resume_point
from nam_prune.prune import PruneConfig, count_macs_params, prune_model
from nam_prune.recipe import recipe_from_dict
from nam_prune.surgery import NAMConfig, insert_nam

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nam_prune"
X = torch.zeros(1, 1, 28, 28)


def _gated_resnet8() -> torch.nn.Module:
    model = insert_nam(build_model(ModelSpec("resnet8", 10, 1, 8)), NAMConfig())
    with torch.no_grad():
        for gate in model.modules():
            if isinstance(gate, NAMChannelGate):
                gate.gamma.uniform_(0.05, 1.0)
    return model


def _gate_widths(model: torch.nn.Module) -> int:
    return sum(m.bn.num_features for m in model.modules() if isinstance(m, NAMChannelGate))


def test_prune_model_takes_a_channel_target_from_its_config():
    model = _gated_resnet8()
    before = _gate_widths(model)
    result = prune_model(model, X, PruneConfig(target="channels", channel_ratio=0.3))
    assert result.params_after < result.params_before
    assert 0.6 * before <= _gate_widths(model) <= 0.8 * before
    assert model(X).shape == (1, 10)


def test_prune_model_takes_a_macs_target_in_steps_from_its_config():
    model = _gated_resnet8()
    macs = count_macs_params(model, X)[0]
    steps = []
    result = prune_model(model, X, PruneConfig(target="macs", macs_keep=0.5, steps=2, round_to=1), train_between=steps.append)
    assert steps == [1]  # training runs between the two steps, not after the last
    assert 0.47 * macs <= count_macs_params(model, X)[0] <= 0.5 * macs
    assert len(result.history) == 2 and all(result.history)  # both steps are in the replayable history


def _imports(path: Path, package: str = "nam_prune") -> set[str]:
    """Every ``package`` module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(package))
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_inside_the_package():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    for name in graph:  # a package's __init__ re-exports its modules; importing it is importing them
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in graph[name]:
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*trail, name, target])}"
            if target not in state:
                visit(target, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_core_never_imports_the_yolo_family():
    for path in PACKAGE.rglob("*.py"):
        if "yolo" in path.relative_to(PACKAGE).parts:
            continue
        assert not any(m.startswith("nam_prune.yolo") for m in _imports(path)), path
        assert not _imports(path, "ultralytics"), path


def test_ultralytics_loads_only_for_a_yolo_model():
    code = (
        "import sys, nam_prune; from nam_prune.recipe import load_recipe; from nam_prune.cli import cli; "
        "load_recipe('recipes/fashion_quickstart.yaml'); "
        "assert not [m for m in sys.modules if m.startswith('ultralytics')], 'ultralytics was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]


def _write_last(folder: Path, recipe_dict: dict) -> None:
    spec = ModelSpec("resnet8", 10, 1, 8)
    save(folder / "last.pt", build_model(spec), ModelRecord(spec, (1, 28, 28)), recipe=recipe_dict, progress={})


def test_resume_finds_the_latest_interrupted_numbered_run(tmp_path):
    recipe = recipe_from_dict({"output": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_text("a finished run")
    for name in ("run-2", "run-10"):
        (tmp_path / name).mkdir()
        _write_last(tmp_path / name, recipe.to_dict())
    (tmp_path / "run-3").mkdir()  # finished: no last.pt
    folder, payload = _resume_point(recipe, recipe.to_dict())
    assert folder == tmp_path / "run-10"
    assert payload["recipe"] == recipe.to_dict()


def test_resume_with_nothing_interrupted_is_a_one_line_error(tmp_path):
    recipe = recipe_from_dict({"output": str(tmp_path / "run")})
    with pytest.raises(NamPruneError, match="nothing to resume"):
        _resume_point(recipe, recipe.to_dict())


def test_nproc_relaunch_keeps_debug_and_verbose(monkeypatch):
    seen = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, argv: seen.append((nproc, argv)))
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: False)
    recipe = str(ROOT / "recipes" / "fashion_quickstart.yaml")
    result = CliRunner().invoke(cli_module.cli, ["--debug", "-v", "run", recipe, "seed=1", "--nproc", "2"])
    assert result.exit_code == 0, result.output
    assert seen == [(2, ["--debug", "-v", "run", recipe, "seed=1"])]


@pytest.mark.parametrize(
    "key", ["data.batch_size=0", "data.workers=-1", "data.train_subset=-5", "data.test_subset=-1"]
)
def test_data_sizes_out_of_range_are_one_line_errors(key):
    name, value = key.split("=")
    section, field = name.split(".")
    with pytest.raises(NamPruneError, match=f"{name} = {value} is out of range"):
        recipe_from_dict({section: {field: int(value)}})


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(NamPruneError, match=r"nam-prune\[digits\]"):
        load_data(DataConfig(name="digits"))


def test_checkpoint_from_a_newer_format_says_so(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1, "state_dict": {}}, path)
    with pytest.raises(NamPruneError, match="newer nam-prune"):
        read_checkpoint(path)


def test_documented_commands_have_their_dependencies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert "matplotlib" in runtime  # compare and report --plots draw
    assert "<" not in runtime  # no upper bound without a known break
    assert any(dep.startswith("scikit-learn") for dep in project["optional-dependencies"]["digits"])
    assert "nam-prune[digits]" in (ROOT / "README.md").read_text()


def test_module_docs_name_only_files_and_commands_that_exist():
    """A docstring that sends the reader to ``benchmarks/X.py`` names a file that is there, and the
    model sweep it cites is the ``check --sweep`` command the CLI has."""
    import re

    from nam_prune import check

    cited = set()
    for path in (ROOT / "nam_prune").rglob("*.py"):
        cited.update(re.findall(r"benchmarks/\w+\.py", path.read_text()))
    assert cited and all((ROOT / name).is_file() for name in cited), sorted(n for n in cited if not (ROOT / n).is_file())
    assert "nam-prune check --sweep --json docs/model_sweep.json --markdown docs/model_sweep.md" in " ".join(check.__doc__.split())
    options = {p.name for p in cli_module.check.params}
    assert {"sweep", "json_path", "markdown"} <= options


def test_docstrings_carry_no_measured_figures():
    """Measured timings and accuracy deltas go stale in docstrings: they live in docs/ and the README."""
    import re

    stale = re.compile(r"measured[^.]*\d|\d(\.\d+)?x (faster|slower|against)|(\+-|±) \d|\d+ ?ms (alone|beside)")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in (ROOT / "nam_prune").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if stale.search(line) and not re.search(r"f\"|log\.|\.format\(|help=", line)
    ]
    assert not found, "\n".join(found)
