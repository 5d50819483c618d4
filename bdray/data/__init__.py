from bdray.data.base import CleanSplits, DatasetPair, ImageSet, split_clean
from bdray.data.datasets import (
    DATASETS,
    DatasetNotFoundError,
    get_dataset,
    list_datasets,
    register_dataset,
)

__all__ = [
    "DATASETS",
    "CleanSplits",
    "DatasetNotFoundError",
    "DatasetPair",
    "ImageSet",
    "get_dataset",
    "list_datasets",
    "register_dataset",
    "split_clean",
]
import bdray.data.vision  # noqa: F401  (registers loaders)
