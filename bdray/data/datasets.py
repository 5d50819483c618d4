"""Datasets by name, each read from a local root in its usual on-disk layout.

Nothing is downloaded: a missing dataset is a :class:`DatasetNotFoundError` that says where bdray
looked and how to get the files.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bdray.data.base import DatasetPair, ImageSet
from bdray.registry import Registry

DatasetLoader = Callable[..., DatasetPair]
DATASETS: Registry[DatasetLoader] = Registry("dataset")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class DatasetNotFoundError(FileNotFoundError):
    pass


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    return DATASETS.register(name)


def get_dataset(name: str, **kwargs: Any) -> DatasetPair:
    """Load dataset ``name`` (``root=`` and dataset-specific keywords) as a train/test pair."""
    return DATASETS.get(name)(**kwargs)


def list_datasets() -> list[str]:
    return DATASETS.names()


# --- Fashion-MNIST -------------------------------------------------------------------------------

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(root: Path, stem: str) -> Path | None:
    # Debian ships the gz files flat in root; torchvision keeps them under FashionMNIST/raw.
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {body.size}")
    return body.reshape(shape)


@register_dataset("fashion_mnist")
def fashion_mnist(root: str | None = None) -> DatasetPair:
    base = Path(root or FASHION_MNIST_ROOT)
    paths = {key: _find_idx(base, stem) for key, stem in _MNIST_FILES.items()}
    missing = [_MNIST_FILES[k] + ".gz" for k, p in paths.items() if p is None]
    if missing:
        raise DatasetNotFoundError(
            f"fashion_mnist: {', '.join(missing)} not found in {base} (nor {base}/FashionMNIST/raw). "
            "Install it with `apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_ROOT}) or set data.root to a folder holding the four IDX files."
        )
    arrays = {key: read_idx(p) for key, p in paths.items()}  # type: ignore[arg-type]
    stats = dict(num_classes=10, mean=(0.286,), std=(0.353,))
    return DatasetPair(
        train=ImageSet(arrays["train_images"][:, None], arrays["train_labels"].astype(np.int64),
                       name="fashion_mnist/train", **stats),
        test=ImageSet(arrays["test_images"][:, None], arrays["test_labels"].astype(np.int64),
                      name="fashion_mnist/test", **stats),
    )


# --- synthetic -----------------------------------------------------------------------------------


@register_dataset("synthetic")
def synthetic(
    root: str | None = None,
    *,
    num_classes: int = 10,
    channels: int = 1,
    image_size: int = 28,
    train_size: int = 2000,
    test_size: int = 1000,
    noise: float = 40.0,
    seed: int = 0,
) -> DatasetPair:
    """Class-conditional smooth templates plus pixel noise: learnable in seconds by a tiny CNN.

    The bottom-right corner is kept dark, as in Fashion-MNIST, so a corner patch is a clean signal.
    """
    del root  # generated, nothing to read
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, channels, 4, 4))
    reps = -(-image_size // 4)
    templates = np.kron(coarse, np.ones((1, 1, reps, reps)))[:, :, :image_size, :image_size]
    corner = max(2, image_size // 5)
    templates[:, :, -corner:, -corner:] *= 0.1

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        images = templates[labels] + rng.normal(0, noise, size=(n, channels, image_size, image_size))
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train_x, train_y = draw(train_size)
    test_x, test_y = draw(test_size)
    return DatasetPair(
        train=ImageSet(train_x, train_y, num_classes, "synthetic/train"),
        test=ImageSet(test_x, test_y, num_classes, "synthetic/test"),
    )
