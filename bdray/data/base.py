"""In-memory image sets and the seeded splits every defense relies on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, C, H, W) plus int64 labels.

    uint8 is kept all the way to the training side: it is 4x smaller in Ray's object store than
    float32 and triggers are defined in pixel space anyway.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str = ""
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.name or 'ImageSet'}: images must be uint8 (N, C, H, W), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"{self.name or 'ImageSet'}: labels shape {self.labels.shape} does not match "
                f"{len(self.images)} images"
            )
        if not self.mean:
            object.__setattr__(self, "mean", (0.5,) * self.channels)
            object.__setattr__(self, "std", (0.5,) * self.channels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(
            self.images[index], self.labels[index], self.num_classes, self.name, self.mean, self.std
        )

    def replace(self, images: np.ndarray | None = None, labels: np.ndarray | None = None) -> ImageSet:
        return ImageSet(
            self.images if images is None else images,
            self.labels if labels is None else labels,
            self.num_classes,
            self.name,
            self.mean,
            self.std,
        )


@dataclass(frozen=True)
class DatasetPair:
    train: ImageSet
    test: ImageSet


@dataclass(frozen=True)
class CleanSplits:
    """BaDExpert's view of the test split.

    ``reserved`` is D_c (what the defender may finetune on), ``calibration`` is held out from the
    reserved clean data to set the threshold, ``evaluation`` is everything else.
    """

    reserved: ImageSet
    calibration: ImageSet
    evaluation: ImageSet


def split_clean(test: ImageSet, reserved: int, calibration: int, seed: int) -> CleanSplits:
    """Draw the reserved clean set and its held-out calibration part from the test split."""
    if reserved + calibration >= len(test):
        raise ValueError(
            f"data.reserved_size + data.calibration_size = {reserved + calibration} must be smaller "
            f"than the test split ({len(test)} images)"
        )
    order = np.random.default_rng(seed).permutation(len(test))
    return CleanSplits(
        reserved=test.subset(np.sort(order[:reserved])),
        calibration=test.subset(np.sort(order[reserved : reserved + calibration])),
        evaluation=test.subset(np.sort(order[reserved + calibration :])),
    )
