"""Stage 0: the data every stage trains and evaluates on, read from local files only.

Fashion-MNIST comes from its raw idx ``.gz`` files (Debian's ``dataset-fashion-mnist``),
CIFAR-10 from a local copy in torchvision's layout, digits from scikit-learn, and any
other set from an image folder with ``train/`` and ``val/`` sub-folders.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from nam_prune import distributed
from nam_prune.config import bounded
from nam_prune.errors import NamPruneError, first_line

DatasetName = Literal["fashion_mnist", "cifar10", "digits", "image_folder"]

DEFAULT_ROOTS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "cifar10": "data/cifar10",
    "image_folder": "data/images",
    "digits": "",
}
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STATISTICS_IMAGES = 500  # training images an image folder's mean/std is estimated from


@dataclass
class DataConfig:
    """Where the data lives and how much of it to use.

    train_subset / test_subset: number of images to keep (0 = all), drawn with a fixed
    seed so runs are comparable. download: let torchvision fetch CIFAR-10 (needs network).
    batch_size is per process under torchrun. image_size: resize every image to this square
    side (0 = as stored; an image folder then takes its first image's size). channels: 1 or
    3 to convert gray <-> colour (0 = as stored), e.g. 3 for pretrained ImageNet weights.
    augment: random crop and horizontal flip in training (CIFAR-10, image folders).
    normalize: per-channel mean/std of the training images (``dataset``), ImageNet's
    (``imagenet``, what pretrained weights expect) or none (image folders; the built-in sets
    use their published statistics).
    """

    name: DatasetName = "fashion_mnist"
    root: str = ""
    batch_size: int = bounded(128, low=1)
    train_subset: int = bounded(0, low=0)
    test_subset: int = bounded(0, low=0)
    download: bool = False
    workers: int = bounded(0, low=0)
    augment: bool = True
    image_size: int = bounded(0, low=0)
    channels: Literal[0, 1, 3] = 0
    normalize: Literal["dataset", "imagenet", "none"] = "dataset"


@dataclass
class DataBundle:
    """train: shuffled training batches. calibration: the same images in an order of their own,
    for BN recalibration (it never advances the training order, so resumed runs stay exact)."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, int, int]
    calibration: DataLoader


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (gzip or plain): magic, dims, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise NamPruneError(f"{path} is not an unsigned-byte idx file; re-install dataset-fashion-mnist")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise NamPruneError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(tuple(int(d) for d in dims))


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise NamPruneError(
        f"Fashion-MNIST file {stem}.gz not found in {root}: run `apt-get install dataset-fashion-mnist` "
        "(puts it in /usr/share/datasets/fashion-mnist) or set data.root to the folder with the idx files"
    )


FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)


def fashion_mnist_arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST images (N x 28 x 28, uint8) and labels of ``train`` or ``t10k``."""
    images = _read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte"))
    return images, labels


def _fashion_mnist(root: Path) -> tuple[Dataset, Dataset, int]:
    def split(prefix: str) -> TensorDataset:
        images, labels = fashion_mnist_arrays(root, prefix)
        x = (torch.from_numpy(images.copy()).float().div_(255.0).sub_(FASHION_MEAN).div_(FASHION_STD)).unsqueeze(1)
        return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))

    return split("train"), split("t10k"), 10


def _digits() -> tuple[Dataset, Dataset, int]:
    """scikit-learn's 8x8 digits, 1797 images, a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise NamPruneError("data.name: digits needs scikit-learn: pip install 'nam-prune[digits]'") from error

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).sub_(0.5).div_(0.5).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]]), 10


def _cifar10(root: Path, download: bool, augment: bool) -> tuple[Dataset, Dataset, int]:
    from torchvision import datasets, transforms

    if not download and not (root / "cifar-10-batches-py").is_dir():
        raise NamPruneError(
            f"CIFAR-10 not found: put torchvision's 'cifar-10-batches-py' folder in {root.resolve()} "
            "(or set data.root to its parent), or set data.download: true on a machine with internet"
        )
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    root_existed = root.exists()
    try:
        train = datasets.CIFAR10(
            str(root), train=True, download=download, transform=transforms.Compose([*train_tf, transforms.ToTensor(), normalize])
        )
        test = datasets.CIFAR10(
            str(root), train=False, download=download, transform=transforms.Compose([transforms.ToTensor(), normalize])
        )
    except (OSError, RuntimeError) as error:
        reason = f"{type(error).__name__}: {first_line(error, 120)}"
        if not download:
            raise NamPruneError(f"cannot read CIFAR-10 in {root.resolve()} ({reason}): replace it with a fresh copy") from error
        if not root_existed:  # no empty or half-downloaded folder left behind
            shutil.rmtree(root, ignore_errors=True)
        raise NamPruneError(
            f"CIFAR-10 download failed ({reason}): on a machine without internet, put torchvision's "
            f"'cifar-10-batches-py' folder in {root.resolve()} and set data.download: false"
        ) from error
    return train, test, 10


class Adapted(Dataset):
    """Resize (bilinear, antialiased) and convert channels of an image tensor data set on the fly."""

    def __init__(self, dataset: Dataset, size: int, channels: int) -> None:
        self.dataset, self.size, self.channels = dataset, size, channels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        if self.size and tuple(image.shape[-2:]) != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        if self.channels and image.shape[0] != self.channels:
            image = image.mean(0, keepdim=True) if self.channels == 1 else image.expand(self.channels, -1, -1)
        return image, label


def _image_folder(root: Path, config: DataConfig) -> tuple[Dataset, Dataset, int]:
    """``train/`` and ``val/`` (or ``test/``) folders, one sub-folder per class: resized to
    ``image_size`` (else the first image's size), normalized, lightly augmented in training."""
    from torchvision import datasets, transforms

    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise NamPruneError(
            f"image folder {root} needs 'train/' and 'val/' (or 'test/') sub-folders, one folder per class"
        )
    try:
        train = datasets.ImageFolder(str(root / "train"))
        test = datasets.ImageFolder(str(val_dir))
        if config.image_size:
            size = (config.image_size, config.image_size)
        else:
            width, height = train.loader(train.samples[0][0]).size
            size = (height, width)
    except (FileNotFoundError, OSError) as error:
        raise NamPruneError(f"cannot read image folder {root}: {error}") from error
    if train.classes != test.classes:
        raise NamPruneError(f"{root}: train/ and {val_dir.name}/ must hold the same class folders")
    base = [transforms.Resize(size), *([transforms.Grayscale(1)] if config.channels == 1 else [])]
    train.transform = transforms.Compose([*base, transforms.ToTensor()])
    mean, std = _statistics(train, config.normalize)
    normalize = [transforms.Normalize(mean, std)] if mean is not None else []
    augment = [transforms.RandomCrop(size, padding=max(1, size[0] // 8), padding_mode="reflect"),
               transforms.RandomHorizontalFlip()] if config.augment else []
    train.transform = transforms.Compose([*base, *augment, transforms.ToTensor(), *normalize])
    test.transform = transforms.Compose([*base, transforms.ToTensor(), *normalize])
    return train, test, len(train.classes)


def _statistics(train: Dataset, normalize: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Per-channel mean and std for ``data.normalize``, from up to STATISTICS_IMAGES images."""
    if normalize == "none":
        return None, None
    channels = train[0][0].shape[0]
    if normalize == "imagenet":
        if channels == 1:
            return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        return IMAGENET_MEAN, IMAGENET_STD
    step = max(1, len(train) // STATISTICS_IMAGES)  # type: ignore[arg-type]
    pixels = torch.cat([train[i][0].flatten(1) for i in range(0, len(train), step)], dim=1)  # type: ignore[arg-type]
    std = pixels.std(dim=1).clamp(min=1e-3)
    return tuple(pixels.mean(dim=1).tolist()), tuple(std.tolist())


def random_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """``size`` images drawn with ``seed`` (all where ``size`` is 0 or at least the data set's length)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


def load_data(config: DataConfig, seed: int = 0) -> DataBundle:
    """Build train/test loaders; a missing data set stops with a message saying where to put it."""
    root = Path(config.root or DEFAULT_ROOTS[config.name])
    if config.name == "fashion_mnist":
        train, test, classes = _fashion_mnist(root)
    elif config.name == "digits":
        train, test, classes = _digits()
    elif config.name == "cifar10":
        train, test, classes = _cifar10(root, config.download, config.augment)
    else:
        train, test, classes = _image_folder(root, config)
    train = random_subset(train, config.train_subset, seed)
    test = random_subset(test, config.test_subset, seed + 1)
    if config.name != "image_folder" and (config.image_size or config.channels):
        train, test = Adapted(train, config.image_size, config.channels), Adapted(test, config.image_size, config.channels)
    shape = tuple(train[0][0].shape)
    drop_last = len(train) > config.batch_size * distributed.world_size()
    if distributed.active():  # each rank trains on its shard (batch_size is per process) and tests on its slice
        sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=drop_last)
        train_loader = DataLoader(
            train, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers, drop_last=drop_last
        )
        test = Subset(test, list(range(distributed.rank(), len(test), distributed.world_size())))
    else:
        train_loader = DataLoader(
            train,
            batch_size=config.batch_size,
            shuffle=True,
            num_workers=config.workers,
            generator=torch.Generator().manual_seed(seed),
            drop_last=drop_last,
        )
    if distributed.active():
        order = DistributedSampler(train, shuffle=True, seed=seed + 1)
        calibration = DataLoader(train, batch_size=config.batch_size, sampler=order, num_workers=config.workers)
    else:
        calibration = DataLoader(
            train, batch_size=config.batch_size, shuffle=True, num_workers=config.workers,
            generator=torch.Generator().manual_seed(seed + 1),
        )
    test_loader = DataLoader(test, batch_size=max(config.batch_size, 256), num_workers=config.workers)
    return DataBundle(train_loader, test_loader, classes, shape, calibration)  # type: ignore[arg-type]
