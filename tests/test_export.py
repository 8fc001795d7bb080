"""Export of a pruned NAM model: ONNX (checker passes, onnxruntime matches torch within 1e-4) and
frozen TorchScript (matches eager torch, loads without nam-prune)."""

import shutil
import subprocess
import sys
import threading
from copy import deepcopy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import cli

from nam_prune import export as export_module
from nam_prune.artifact import ModelRecord, save
from nam_prune.errors import NamPruneError
from nam_prune.export import export_onnx, export_torchscript, frozen_torchscript, ort_session, samples_per_chunk
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import PruneConfig, prune_model
from nam_prune.surgery import NAMConfig, insert_nam

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pruned_once(tmp_path_factory):
    """A pruned, gated ResNet-8 and its checkpoint, built once for the module."""
    spec, nam = ModelSpec("resnet8", in_channels=1, width=8), NAMConfig(spatial=True)
    model = insert_nam(build_model(spec), nam, torch.zeros(1, 1, 28, 28))
    with torch.no_grad():
        for gate in model.modules():
            if hasattr(gate, "gamma"):
                gate.gamma.uniform_(0.1, 1)
    model.train()(torch.randn(16, 1, 28, 28))
    result = prune_model(model.eval(), torch.zeros(1, 1, 28, 28), PruneConfig(macs_keep=0.5, round_to=1))
    path = tmp_path_factory.mktemp("pruned") / "model.pt"
    save(path, model, ModelRecord(spec, (1, 28, 28), nam, result.history))
    return model, path


@pytest.fixture
def pruned(pruned_once, tmp_path):
    """The module's pruned model (a copy) and its checkpoint alone in a folder of this test's."""
    model, path = pruned_once
    copy = tmp_path / "model.pt"
    shutil.copyfile(path, copy)
    return deepcopy(model), copy


def test_export_parity_and_dynamic_batch(pruned, tmp_path):
    model, _ = pruned
    result = export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx", dynamic_batch=True)
    assert result.max_abs_diff < 1e-4
    onnx.checker.check_model(onnx.load(result.path))
    x = torch.randn(3, 1, 28, 28)
    got = ort_session(result.path).run(None, {"input": x.numpy()})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


def test_onnxruntime_uses_as_many_threads_as_torch(pruned, tmp_path):
    """A CPU quota or OMP_NUM_THREADS sizes torch's pool; onnxruntime follows it, so the two compare."""
    model, _ = pruned
    result = export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx")
    for threads in (1, 2):
        torch.set_num_threads(threads)  # conftest restores the count
        assert ort_session(result.path).get_session_options().intra_op_num_threads == threads


@pytest.mark.parametrize("write", [export_onnx, export_torchscript])
def test_an_export_that_fails_its_check_leaves_no_file(pruned, tmp_path, monkeypatch, write):
    """The written file is compared with eager torch before it takes its name: a miss leaves nothing behind."""
    model, _ = pruned
    monkeypatch.setattr(export_module, "_difference", lambda expected, got: 0.5)
    folder = tmp_path / "out"
    with pytest.raises(NamPruneError, match=r"differs from eager torch by 5.00e-01"):
        write(model, torch.zeros(1, 1, 28, 28), folder / "m.exported")
    assert list(folder.iterdir()) == []


def test_export_cli(pruned):
    _, path = pruned
    result = cli("export", str(path), "--format", "onnx", "--opset", "17")
    assert result.returncode == 0, result.stderr
    assert path.with_suffix(".onnx").is_file() and "max |torch - onnxruntime|" in result.stderr
    report = cli("report", str(path), "--json", "--onnx")
    assert report.returncode == 0, report.stderr
    assert '"onnx_latency_ms"' in report.stdout


@pytest.mark.parametrize(
    ("options", "refused"),
    [(["--whole-batch"], "--whole-batch is for --format torchscript and this export is onnx, the default: drop it"),
     (["--format", "torchscript", "--opset", "13", "--dynamic-batch"],
      "--opset and --dynamic-batch are for --format onnx and this export is torchscript: drop them or add --format onnx")],
)
def test_export_refuses_options_of_the_other_format(pruned, options, refused):
    _, path = pruned
    done = cli("export", str(path), *options)
    assert done.returncode == 2 and refused in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and list(path.parent.iterdir()) == [path]


class _HoldsALock(torch.nn.Conv2d):
    """A user module that cannot be copied (it keeps a lock): the export copies the model first."""

    def __init__(self) -> None:
        super().__init__(1, 4, 3)
        self.lock = threading.Lock()


def test_a_model_that_cannot_be_copied_is_a_one_line_error(tmp_path):
    with pytest.raises(NamPruneError, match=r"TorchScript tracing failed \(TypeError: cannot pickle"):
        export_torchscript(_HoldsALock(), torch.zeros(1, 1, 28, 28), tmp_path / "m.torchscript")
    assert list(tmp_path.iterdir()) == []


def test_torchscript_export_matches_eager_and_loads_without_nam_prune(pruned, tmp_path):
    """Plain-PyTorch deployment: the frozen file runs where nam-prune is not even imported."""
    model, path = pruned
    done = cli("export", str(path), "--format", "torchscript")
    assert done.returncode == 0, done.stderr
    exported = path.with_suffix(".torchscript")
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]);"
        "torch.save(m(x), sys.argv[3]); assert 'nam_prune' not in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", script, str(exported), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), model.eval()(x), atol=1e-4)


def test_slices_are_sized_by_the_largest_feature_map_of_one_sample():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    assert samples_per_chunk(conv, torch.zeros(5, 1, 28, 28)) == 16 * 2**20 // (4 * 28 * 28 * 4)  # 1337


def test_torchscript_runs_large_batches_in_slices_with_the_same_outputs(pruned, monkeypatch):
    """Slices of one sample here (a 1-byte bound): the outputs equal one whole-batch eager pass."""
    model, _ = pruned
    monkeypatch.setattr(export_module, "CHUNK_BYTES", 1)
    frozen = frozen_torchscript(model, torch.zeros(1, 1, 28, 28))
    assert "prim::Loop" in str(frozen.graph)
    x = torch.randn(7, 1, 28, 28)
    with torch.inference_mode():
        np.testing.assert_allclose(frozen(x).numpy(), model(x).numpy(), atol=1e-5)


def test_a_whole_batch_export_has_no_slicing_loop(pruned, tmp_path):
    model, _ = pruned
    for batch_chunks, expected in ((True, True), (False, False)):
        result = export_torchscript(model, torch.zeros(1, 1, 28, 28), tmp_path / f"{batch_chunks}.torchscript",
                                    batch_chunks=batch_chunks)
        assert ("prim::Loop" in str(torch.jit.load(str(result.path)).graph)) is expected


class _ChannelsFirst(torch.nn.Module):
    """Returns its features as (channels, batch): slicing the batch would reorder them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3)).t()


def test_a_model_whose_output_is_not_batch_first_is_not_sliced(monkeypatch):
    monkeypatch.setattr(export_module, "CHUNK_BYTES", 1)
    model = _ChannelsFirst().eval()
    frozen = frozen_torchscript(model, torch.zeros(1, 1, 8, 8))
    assert "prim::Loop" not in str(frozen.graph)
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        assert frozen(x).shape == (4, 5)
        np.testing.assert_allclose(frozen(x).numpy(), model(x).numpy(), atol=1e-5)
