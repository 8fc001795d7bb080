"""What a user brings: input sizes an architecture needs, resized and channel-adapted data,
image folders, pretrained weights from torch's cache (offline), and checkpoints saved elsewhere."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import cli
from PIL import Image

from nam_prune.artifact import ModelRecord, load, save
from nam_prune.data import DataConfig, fashion_mnist_arrays, load_data
from nam_prune.errors import NamPruneError
from nam_prune.models import ModelSpec, build_model, build_pretrained, check_input, torchvision_weights_file
from nam_prune.prune import PruneConfig, prune_model
from nam_prune.surgery import NAMConfig, insert_nam


def test_too_small_input_names_the_smallest_size_the_model_takes():
    model = build_model(ModelSpec("densenet121", 10, 1))
    with pytest.raises(NamPruneError, match=r"cannot take 28x28 inputs .* smallest size it takes is 32x32: set data.image_size: 32"):
        check_input(model, "densenet121", (1, 28, 28))
    check_input(model, "densenet121", (1, 32, 32))


def test_image_size_and_channels_adapt_fashion_mnist(fashion_root):
    bundle = load_data(DataConfig(train_subset=64, test_subset=32, batch_size=16, image_size=40, channels=3))
    images, labels = next(iter(bundle.test))
    assert bundle.input_shape == (3, 40, 40) and images.shape == (32, 3, 40, 40)
    assert torch.equal(images[:, 0], images[:, 2])  # gray repeated into every channel
    plain = load_data(DataConfig(train_subset=64, test_subset=32, batch_size=16))
    original, same_labels = next(iter(plain.test))
    assert torch.equal(labels, same_labels)
    resized = torch.nn.functional.interpolate(original, size=(40, 40), mode="bilinear", antialias=True)
    assert torch.allclose(images[:, :1], resized, atol=1e-6)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, fashion_root) -> Path:
    """Fashion-MNIST trousers and bags as PNGs of two sizes, train/ and val/."""
    root = tmp_path_factory.mktemp("images")
    images, labels = fashion_mnist_arrays(fashion_root, "t10k")
    for split, start in (("train", 0), ("val", 5000)):
        for label, folder in ((1, "trouser"), (8, "bag")):
            (root / split / folder).mkdir(parents=True)
            picks = np.flatnonzero(labels[start:] == label)[:12] + start
            for i, index in enumerate(picks):
                size = 28 if i % 2 else 36
                Image.fromarray(images[index]).resize((size, size)).save(root / split / folder / f"{i}.png")
    return root


def test_image_folder_is_resized_normalized_and_augmented_only_in_training(image_folder):
    config = DataConfig(name="image_folder", root=str(image_folder), batch_size=24, image_size=32, channels=1)
    bundle = load_data(config)
    assert bundle.num_classes == 2 and bundle.input_shape == (1, 32, 32)
    test_images = torch.cat([x for x, _ in bundle.test])
    train_dataset = bundle.train.dataset
    assert abs(float(test_images.mean())) < 0.3 and 0.7 < float(test_images.std()) < 1.3  # per-data-set statistics
    first = torch.stack([train_dataset[0][0] for _ in range(8)])
    assert not all(torch.equal(first[0], f) for f in first[1:])  # random crop / flip in training
    assert torch.equal(bundle.test.dataset[0][0], bundle.test.dataset[0][0])
    fixed = load_data(DataConfig(name="image_folder", root=str(image_folder), image_size=32, channels=1, augment=False))
    assert torch.equal(fixed.train.dataset[0][0], fixed.train.dataset[0][0])
    rgb = load_data(DataConfig(name="image_folder", root=str(image_folder), image_size=32, normalize="imagenet"))
    assert rgb.input_shape == (3, 32, 32)


@pytest.fixture
def torch_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_pretrained_resnet18_from_the_cache_loads_prunes_and_reloads(torch_cache, tmp_path):
    path, url = torchvision_weights_file("resnet18", "DEFAULT")
    assert path.parent == torch_cache and path.name == Path(url).name == "resnet18-f37072fd.pth"
    published = torchvision.models.resnet18(num_classes=1000).state_dict()  # stands in for the download
    torch_cache.mkdir(parents=True)
    torch.save(published, path)

    spec = ModelSpec("resnet18", num_classes=10, in_channels=1)
    model = build_pretrained(spec, "DEFAULT")
    state = model.state_dict()
    assert torch.equal(state["layer3.1.conv2.weight"], published["layer3.1.conv2.weight"])
    assert torch.allclose(state["conv1.weight"], published["conv1.weight"].sum(1, keepdim=True))  # gray stem
    assert state["fc.weight"].shape == (10, 512)  # a new classifier for 10 classes

    example = torch.zeros(1, 1, 32, 32)
    insert_nam(model, NAMConfig(), example)
    result = prune_model(model, example, PruneConfig(macs_keep=0.5))
    save(tmp_path / "m.pt", model, ModelRecord(spec, (1, 32, 32), NAMConfig(), result.history))
    inputs = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.pt")(inputs), model.eval()(inputs))


def test_pretrained_offline_names_the_file_and_the_cache_folder(torch_cache):
    with pytest.raises(NamPruneError) as error:
        build_pretrained(ModelSpec("resnet18"), "IMAGENET1K_V1")
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and str(torch_cache) in message and "\n" not in message


def test_pretrained_names_a_wrong_weight_and_a_model_without_weights():
    with pytest.raises(NamPruneError, match="choose one of DEFAULT, IMAGENET1K_V1"):
        build_pretrained(ModelSpec("resnet18"), "IMAGENET1K_V9")
    with pytest.raises(NamPruneError, match="needs a torchvision or timm model"):
        build_pretrained(ModelSpec("resnet20"), "DEFAULT")


def test_run_with_pretrained_weights_and_resized_fashion_mnist(torch_cache, tmp_path, fashion_root):
    path, _ = torchvision_weights_file("resnet18", "DEFAULT")
    torch_cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    result = cli(
        "run", "recipes/fashion_quickstart.yaml", "model.name=resnet18", "model.pretrained=DEFAULT",
        "data.image_size=32", "data.channels=3", "data.train_subset=128", "data.test_subset=64",
        "sparsity.epochs=1", "finetune.epochs=1", "report.latency_runs=1", "report.baseline=false",
        "recalibrate.batches=1", f"output={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["after"]["macs"] <= 0.5 * results["before"]["macs"]
    assert "internal error" not in result.stdout + result.stderr


def test_run_with_an_input_too_small_says_which_size_to_set(tmp_path, fashion_root):
    result = cli("run", "recipes/fashion_quickstart.yaml", "model.name=densenet121", f"output={tmp_path / 'r'}")
    assert result.returncode == 2
    assert "set data.image_size: 32" in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "model.pt").exists()


def test_report_reads_a_state_dict_or_a_trusted_pickle_saved_elsewhere(tmp_path):
    model = torchvision.models.mobilenet_v3_small(num_classes=7)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.save(model, tmp_path / "whole.pt")

    refused = cli("report", str(tmp_path / "state.pt"))
    assert refused.returncode == 2 and "pass --model NAME" in refused.stdout + refused.stderr
    plain = cli("report", str(tmp_path / "state.pt"), "--model", "mobilenet_v3_small", "--image-size", "64", "--json")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    summary = json.loads(plain.stdout)
    assert summary["model"]["num_classes"] == 7 and summary["params"] == sum(p.numel() for p in model.parameters())

    pickle_refused = cli("report", str(tmp_path / "whole.pt"))
    assert pickle_refused.returncode == 2 and "pass --trust-pickle" in pickle_refused.stdout + pickle_refused.stderr
    assert "model.trust_pickle" not in pickle_refused.stdout + pickle_refused.stderr
    trusted = cli("report", str(tmp_path / "whole.pt"), "--trust-pickle", "--image-size", "64", "--json")
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert json.loads(trusted.stdout)["macs"] == summary["macs"]
