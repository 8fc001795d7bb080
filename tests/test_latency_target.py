"""``prune.target: latency``: the cut share is searched on paired timings of candidate cuts.

No test asserts a timing (our machines are noisy): they check what the search records, that the
model it hands back is the cut it timed, and the one-line errors. The ±10% check against an
independent timing is ``python -m benchmarks latency_target``.
"""

import importlib.util
import statistics

import pytest
import torch
from conftest import QUICKSTART, TINY, cli

from nam_prune.errors import NamPruneError
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import PruneConfig, check_prunable, count_macs_params, prune_model
from nam_prune.prune.latency import LatencyMeter
from nam_prune.recipe import load_recipe
from nam_prune.surgery import NAMConfig, insert_nam

X = torch.zeros(1, 1, 28, 28)


@pytest.fixture(autouse=True)
def _short_turns(monkeypatch):
    """Turns of a few ms: these tests check what the search does, not how well it times."""
    from nam_prune.prune import latency

    monkeypatch.setattr(latency, "TURN_SECONDS", 0.005)
    monkeypatch.setattr(latency, "PAUSE_SECONDS", 0.001)


def _gated_resnet8() -> torch.nn.Module:
    model = insert_nam(build_model(ModelSpec("resnet8", num_classes=10, in_channels=1, width=32)), NAMConfig(), X)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.05)
    return model.eval()


@pytest.mark.parametrize("runtime", ["torch", pytest.param("torchscript", marks=pytest.mark.slow)])
def test_a_latency_target_records_its_search_and_cuts_what_it_timed(runtime, monkeypatch):
    """The search on a stand-in timing, a cut's share of the dense MACs (what a real timing reads depends on
    what else the machine runs); each cut is still put in its runtime's form."""
    model = _gated_resnet8()
    dense_macs = count_macs_params(model, X)[0]

    def macs_share(meter, cut):
        meter.call(cut)
        share = count_macs_params(meter.deployed(cut), X)[0] / dense_macs
        return share, 1.0, share

    monkeypatch.setattr(LatencyMeter, "ratio", macs_share)
    result = prune_model(model, X, PruneConfig(target="latency", latency_keep=0.6, runtime=runtime, round_to=8))
    search = result.latency
    assert (search.runtime, search.batch, search.target) == (runtime, 1, 0.6)
    assert search.threads == torch.get_num_threads() and search.dense_ms == 1.0
    fractions = [t["fraction"] for t in search.trials]
    assert fractions[0] == 1.0 and 0.0 not in fractions  # the deepest cut first; the uncut model runs at 1
    assert all(t["ratio"] > 0 and t["ms"] > 0 for t in search.trials)
    means = {f: statistics.mean(t["ratio"] for t in search.trials if t["fraction"] == f) for f in fractions}
    assert result.fraction == min(means, key=lambda f: abs(means[f] - 0.6))  # the cut closest to its target, on means
    assert fractions.count(result.fraction) >= 2  # timed again before it was taken
    assert search.ratio == pytest.approx(0.6, abs=0.03)  # the model handed back, as deployed


def test_latency_ms_and_keep_are_exclusive_and_one_is_needed():
    with pytest.raises(NamPruneError, match="needs one of prune.latency_keep"):
        PruneConfig(target="latency")
    with pytest.raises(NamPruneError, match="needs one of prune.latency_keep"):
        PruneConfig(target="latency", latency_keep=0.5, latency_ms=1.0)


def test_a_runtime_that_is_not_installed_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(NamPruneError, match=r"pip install 'nam-prune\[onnx\]'"):
        PruneConfig(target="latency", latency_keep=0.5, runtime="onnxruntime")


def test_an_unreachable_latency_is_refused_before_training():
    """A microsecond is below any cut: the check times the deepest cut and says so in one line."""
    config = PruneConfig(target="latency", latency_ms=0.001, runtime="torch")
    with pytest.raises(NamPruneError, match=r"cannot reach .* of the dense latency on torch at batch 1"):
        check_prunable(_gated_resnet8(), X, config)


def test_a_recipe_with_an_unreachable_latency_stops_before_training(tmp_path):
    done = cli("run", QUICKSTART, *TINY, "prune.target=latency", "prune.latency_ms=0.0001", "prune.runtime=torch",
               f"output={tmp_path / 'run'}")
    errors = [line for line in done.stderr.strip().splitlines() if not line.startswith("INFO")]
    assert done.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: cannot reach"), done.stderr
    assert not (tmp_path / "run").exists()


def test_the_recipe_keys_are_validated():
    with pytest.raises(NamPruneError, match="prune.runtime = 'tensorrt' is not allowed"):
        load_recipe(QUICKSTART, ["prune.target=latency", "prune.latency_keep=0.5", "prune.runtime=tensorrt"])
    with pytest.raises(NamPruneError, match="prune.latency_keep = 1.5 is out of range"):
        load_recipe(QUICKSTART, ["prune.target=latency", "prune.latency_keep=1.5"])
