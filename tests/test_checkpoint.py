"""Weights-only checkpoints: a pruned model reloads with identical outputs; unsafe files are refused."""

import pickle
import random
import zipfile

import pytest
import torch

import nam_prune
from nam_prune.artifact import ModelRecord, save
from nam_prune.checkpoint import atomic_write, check_writable, read_checkpoint, write_checkpoint
from nam_prune.errors import NamPruneError
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import PruneConfig, build_graph, prune_model
from nam_prune.surgery import NAMConfig, insert_nam

X = torch.randn(3, 1, 28, 28)


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """A pruned, gated ResNet-8 saved once for the module (tests read the file, never write it)."""
    spec = ModelSpec("resnet8", num_classes=10, in_channels=1, width=8)
    nam = NAMConfig(spatial=True)
    model = insert_nam(build_model(spec), nam, torch.zeros(1, 1, 28, 28))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.1, 1.0)
    model.train()(X)  # non-trivial running statistics
    model.eval()
    result = prune_model(model, torch.zeros(1, 1, 28, 28), PruneConfig(target="channels", channel_ratio=0.4))
    path = tmp_path_factory.mktemp("pruned") / "model.pt"
    save(path, model, ModelRecord(spec, (1, 28, 28), nam, result.history), metrics={"note": "test"})
    return path, model


def test_pruned_model_reloads_with_identical_outputs(pruned_checkpoint):
    path, model = pruned_checkpoint
    reloaded = nam_prune.load(path)
    with torch.no_grad():
        assert torch.equal(reloaded(X), model(X))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_checkpoint_is_plain_weights_only(pruned_checkpoint):
    payload = torch.load(pruned_checkpoint[0], weights_only=True)
    assert payload["format"] == "nam-prune" and payload["pruning_history"]
    assert payload["versions"]["torch"] == torch.__version__


class _CreatesFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "nam-prune", "payload": _CreatesFile(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(NamPruneError, match="refused to load"):
        nam_prune.load(path)
    assert not marker.exists()


def test_raw_pickle_is_refused(tmp_path):
    path = tmp_path / "raw.pt"
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps(_CreatesFile(str(marker))))
    with pytest.raises(NamPruneError):
        nam_prune.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped", *[f"garbage{seed}" for seed in range(20)]])
def test_damaged_checkpoints(pruned_checkpoint, tmp_path, damage):
    data = pruned_checkpoint[0].read_bytes()
    if damage.startswith("garbage"):  # random bytes make torch raise many different exception types
        content = random.Random(int(damage[7:])).randbytes(256)
    else:
        flipped = data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:]
        content = {"empty": b"", "truncated": data[: len(data) // 2], "flipped": flipped}[damage]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(NamPruneError, match="empty|corrupt"):
        nam_prune.load(bad)


def test_other_architecture_is_named(pruned_checkpoint, tmp_path):
    payload = torch.load(pruned_checkpoint[0], weights_only=True)
    payload["model"]["width"] = 16
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    with pytest.raises(NamPruneError, match="does not match the model architecture: .*wrong shape"):
        nam_prune.load(other)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert not zipfile.is_zipfile(target)


def test_check_writable_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "out.json")
    check_writable(tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []  # neither the missing folders nor a probe file stay
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for inside in (blocker / "out.json", blocker / "sub" / "out.json"):
        with pytest.raises(NamPruneError, match="Not a directory"):
            check_writable(inside)
    with pytest.raises(NamPruneError, match="NUL"):
        check_writable(tmp_path / "a\0b" / "out.json")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_stripped_model_reloads(tmp_path, monkeypatch):
    from nam_prune import surgery
    from nam_prune.surgery import strip_gates

    spec = ModelSpec("resnet8", num_classes=10, in_channels=1, width=8)
    model = insert_nam(build_model(spec), NAMConfig())
    result = prune_model(model, torch.zeros(1, 1, 28, 28), PruneConfig(target="channels", channel_ratio=0.3))
    strip_gates(model.eval())
    assert not any(type(m).__name__.startswith("NAM") for m in model.modules())
    path = tmp_path / "stripped.pt"
    save(path, model, ModelRecord(spec, (1, 28, 28), NAMConfig(), result.history, stripped=True))
    monkeypatch.setattr(surgery, "affine_fit", None)  # loading restores the architecture only: nothing to fold
    with torch.no_grad():
        assert torch.equal(nam_prune.load(path)(X), model(X))


def test_format_2_files_replay_their_group_history(tmp_path):
    """Files written before format 3 record torch-pruning's group roots; they still load as saved."""
    spec = ModelSpec("resnet8", num_classes=10, in_channels=1, width=8)
    example = torch.zeros(1, 1, 28, 28)
    model = build_model(spec).eval()
    graph = build_graph(model, example)
    graph.get_pruning_group(model.layer1[0].conv1, graph.get_pruner_of_module(model.layer1[0].conv1).prune_out_channels,
                            [0, 3]).prune()
    graph.get_pruning_group(model.conv1, graph.get_pruner_of_module(model.conv1).prune_out_channels, [1]).prune()
    path = tmp_path / "old.pt"
    save(path, model, ModelRecord(spec, (1, 28, 28)))
    payload = read_checkpoint(path)
    payload.update(format_version=2, pruning_history=[[n, o, list(i)] for n, o, i in graph.pruning_history()])
    write_checkpoint(path, payload)
    assert read_checkpoint(path)["format_version"] == 2
    reloaded = nam_prune.load(path)
    with torch.no_grad():
        assert torch.equal(reloaded(X), model(X))
