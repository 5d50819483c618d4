from bdray.data.base import CleanSplits, DatasetPair, ImageSet, split_clean
from bdray.data.datasets import (
    DATASETS,
    DatasetNotFoundError,
    get_dataset,
    list_datasets,
    register_dataset,
)
from bdray.data.shards import (
    Manifest,
    ShardError,
    open_shards,
    read_imageset,
    write_poisoned,
    write_source,
)
from bdray.data.stream import to_ray_dataset

__all__ = [
    "DATASETS",
    "CleanSplits",
    "DatasetNotFoundError",
    "DatasetPair",
    "ImageSet",
    "Manifest",
    "ShardError",
    "get_dataset",
    "list_datasets",
    "open_shards",
    "read_imageset",
    "register_dataset",
    "split_clean",
    "to_ray_dataset",
    "write_poisoned",
    "write_source",
]
import bdray.data.vision  # noqa: F401  (registers loaders)
