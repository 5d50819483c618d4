"""Shard directories as a Ray Data stream: read_parquet -> decode (+ plan or test trigger) -> uint8 rows.

The stream yields ``image`` as uint8 (C, H, W) and int64 ``label`` (plus ground-truth columns on
request); normalization belongs to the consumer, because float32 rows would move 4x the bytes through
Ray's object store. Decoding and poisoning run in Ray tasks, so on a machine with spare cores
JPEG decode runs in parallel with training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from bdray.data.shards import (
    Manifest,
    PlanRows,
    Verify,
    decode_images,
    load_attack,
    open_shards,
    poison_rows,
    read_plan,
    trigger_rows,
)

if TYPE_CHECKING:
    import ray.data

    from bdray.attacks.base import Attack

COLUMNS = ("image", "label", "true_label", "is_poison", "is_cover", "index")


class RowTransform:
    """The map_batches UDF: decode a pyarrow batch, apply the plan or a test trigger, keep ``columns``.

    A plain callable object (not a class), so Ray runs it as tasks and pickles the attack and the plan
    rows (a few KB at 1% poisoning) once per task rather than holding actors.
    """

    def __init__(self, manifest: Manifest, columns: Sequence[str], attack: Attack | None = None,
                 plan: PlanRows | None = None, test_trigger: Attack | None = None,
                 block_rows: int | None = None) -> None:
        holder = manifest.image_manifest()
        self.mode = manifest.mode
        self.image_format = holder.image_format
        self.image_shape = holder.image_shape
        self.columns = tuple(columns)
        self.attack = attack
        self.plan = plan
        self.test_trigger = test_trigger
        self.block_rows = block_rows

    def __call__(self, batch: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        # Decoded in slices of ``block_rows``, each yielded as its own output block: a task reads a
        # whole shard file (one task per file keeps Ray's per-task cost small) but only ever holds
        # one decoded slice, and the blocks it streams stay small whatever the shard size.
        step = self.block_rows or batch.num_rows or 1
        for start in range(0, batch.num_rows, step):
            yield self._rows(batch.slice(start, step))

    def _rows(self, batch: pa.Table) -> dict[str, np.ndarray]:
        n = batch.num_rows
        images = decode_images(batch.column("image"), self.image_format, self.image_shape)
        index = batch.column("index").to_numpy() if "index" in batch.column_names else np.zeros(n, np.int64)
        if self.mode == "materialized":
            out = {"label": batch.column("label").to_numpy()}
            for name in ("true_label", "is_poison", "is_cover"):
                if name in batch.column_names:
                    out[name] = batch.column(name).to_numpy()
        else:
            true = batch.column("label").to_numpy()
            if self.test_trigger is not None:
                images, label, keep = trigger_rows(images, true, index, self.test_trigger)
                index, true = index[keep], true[keep]
                out = {"label": label, "is_poison": np.ones(len(keep), bool), "is_cover": np.zeros(len(keep), bool)}
            elif self.mode == "planned":
                images, label, is_poison, is_cover = poison_rows(images, true, index, self.plan, self.attack)
                out = {"label": label, "is_poison": is_poison, "is_cover": is_cover}
            else:
                out = {"label": true, "is_poison": np.zeros(n, bool), "is_cover": np.zeros(n, bool)}
            out["true_label"] = true
        out["image"] = images
        out["index"] = index
        return {name: out[name] for name in self.columns}


def _parquet_columns(mode: str, columns: Sequence[str], test_trigger: bool) -> list[str]:
    if mode != "materialized":
        return ["image", "label", "index"]
    wanted = {"image", "label", *columns} | ({"true_label", "index"} if test_trigger else set())
    return [c for c in COLUMNS if c in wanted]


def to_ray_dataset(
    path: str | os.PathLike,
    *,
    columns: Sequence[str] = ("image", "label"),
    test_trigger: Attack | None = None,
    attack: Attack | None = None,
    filesystem: pafs.FileSystem | None = None,
    verify: Verify = "fast",
    batch_size: int | None = None,
    rows_per_block: int | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset over a shard directory (local path, URI, or a path in ``filesystem``).

    Yields ``columns`` (any of :data:`COLUMNS`): ``image`` uint8 (C, H, W), int64 ``label`` (the
    training label) and the ground truth on request. Row order is not guaranteed (sort by ``index``).

    - ``test_trigger`` (on a clean ``source`` set) keeps the samples whose label the attack changes,
      stamps the test-time trigger and relabels them: the rows of an ASR evaluation.
    - ``attack`` overrides the attack rebuilt from a planned set's manifest.
    - ``rows_per_block`` splits the stream into blocks of at most this many rows before decoding
      (a streaming split, no barrier). Each shard file is already read by its own task, so this only
      helps a set of very few large shards; on 16 JPEG shards it cost 40% of the throughput here.
    - ``batch_size``: rows per ``map_batches`` call (not the consumer's batch size). Default: each
      block the reader makes (a whole shard file up to Ray's block size), so read and decode fuse into
      one task per file; the task decodes and emits :func:`block_rows` rows at a time, so what it
      holds and what it puts into the object store stay under ``BLOCK_BYTES`` whatever the shard size.
    - ``verify="full"`` hashes every file before reading.

    When Ray Train workers consume the stream, leave Ray Data at least one CPU (``ray.init`` with more
    logical CPUs than the workers take, or fractional worker CPUs): otherwise the read never starts.
    """
    import ray.data

    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ValueError(f"unknown columns {unknown}; valid columns are {COLUMNS}")
    manifest = open_shards(path, filesystem=filesystem, verify=verify)
    if test_trigger is not None and manifest.mode != "source":
        raise ValueError(f"{path}: test_trigger applies to a clean source set (mode 'source'), this one is "
                         f"'{manifest.mode}'; write the evaluation split with write_source")
    plan = None
    if manifest.mode == "planned":
        attack = attack or load_attack(manifest)
        plan = read_plan(manifest)
    # Ray 2.60's default Parquet reader (datasource V2) bin-packs files into ~128 MiB read units, so
    # small shards arrive as one block decoded by one task, and its ListFiles step cost 10-17 s per
    # execution here; the V1 reader gives each file its own task (4096 JPEG rows: 5 s against 17 s).
    # The switch is read when the dataset is created (it keeps a copy of the context), so restore it.
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        files = manifest.image_files()
        # One block per file: left to itself the reader split each file into 5 blocks (Ray's minimum
        # parallelism of 200), which keeps the read from fusing with the decode below.
        ds = ray.data.read_parquet(files, filesystem=manifest.filesystem, partitioning=None,
                                   override_num_blocks=len(files))
    finally:
        context.use_datasource_v2 = previous
    ds = ds.select_columns(_parquet_columns(manifest.mode, columns, test_trigger is not None))
    if rows_per_block:
        # Streaming split (no barrier): memory stays bounded as the data grows, unlike repartition(n).
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    c, h, w = manifest.image_manifest().image_shape
    rows = block_rows(c * h * w)
    fn: Any = RowTransform(manifest, columns, attack=attack, plan=plan, test_trigger=test_trigger, block_rows=rows)
    # batch_size None: the UDF takes each block the read makes, so read and decode fuse into one task
    # per file (a fixed batch size split them into two operators and halved the decode parallelism).
    ds = ds.map_batches(fn, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True)
    # The whole stream is one fused operator, and Ray Data's per-operator reservation kept half of
    # the CPUs for operators that are not there: on 2 CPUs the decode ran one task at a time (task
    # time 6.4 s in 6.9 s of wall time, 1,500 images/s; without the reservation 2,350). Set on this
    # dataset's own copy of the context, so no other dataset in the process changes.
    ds.context.op_resource_reservation_enabled = False
    # Ray's output buffer emits a block once it holds more than this many bytes: set to one slice's
    # pixels, each full slice the UDF yields leaves the task as its own block (at Ray's default of
    # 128 MiB three 38 MB slices of 224x224 images were merged, a copy, before the put).
    ds.context.target_max_block_size = rows * c * h * w
    return ds


#: Upper bound on a decoded output block; see :func:`block_rows`.
BLOCK_BYTES = 64 * 2**20


def block_rows(row_bytes: int) -> int:
    """Rows per decoded output block: the largest power of two whose block fits ``BLOCK_BYTES``.

    A power of two so that a consumer's batch of 64-512 rows lines up with the blocks (a batch that
    spans two blocks is a copy in the consumer). 224x224 RGB: 256 rows (38 MB); 32x32 RGB: 16,384;
    28x28 gray: 65,536 (a whole shard at the default 4,096 rows a shard).
    """
    fit = max(1, BLOCK_BYTES // max(1, row_bytes))
    return 1 << (fit.bit_length() - 1)
