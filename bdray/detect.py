"""BaDExpert as a deployable input filter: load a saved detector, screen batches, split shard sets.

- :class:`Filter` loads a detector directory written by the pipeline (``runs/<name>/detector``) after
  checking its integrity, and screens a batch of images in one pass: the batch goes to the device
  once, M, B and M' run on it there, and only M's label and the three confidences come back. When B
  and M' were trained with ``trainable_blocks`` (their first blocks frozen at M's weights), the
  shared prefix runs once and only the three suffixes run on its output.
- :func:`filter_shards` runs the filter over a Parquet shard directory (``bdray.data.shards``) as a
  Ray Data stream, one filter per actor, and writes the accepted and the rejected rows as two sets of
  Parquet shards with ``pred_label`` and ``score`` beside the input's columns (layout below).

Output of :func:`filter_shards`, written into a hidden sibling and renamed into place::

    out/filter.json                 input and detector hashes, threshold, counts, every file's sha256
    out/accepted/part-00000.parquet image (raw uint8 C*H*W bytes), label, index, [true_label, is_poison,
    out/rejected/part-00000.parquet  is_cover], pred_label, score; row order follows the stream
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.nn import functional as F

from bdray.atomic import atomic_directory, sha256_file
from bdray.data.shards import (
    COMPRESSION,
    DEFAULT_ROWS_PER_SHARD,
    ROW_GROUP_ROWS,
    Verify,
    encode_images,
    image_type,
    open_shards,
)
from bdray.defenses.badexpert import DETECTOR_JSON, BaDExpert, eq3_score, read_artifact_metadata
from bdray.models import ModelSpec
from bdray.models.blocks import same_prefix, split_model
from bdray.train.loop import to_float

FILTER_FORMAT = "bdray.filter"
FILTER_VERSION = 1
SUMMARY_FILE = "filter.json"
_WEIGHT_FILES = ("model.safetensors", "expert.safetensors", "auxiliary.safetensors")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)  # array fields: a generated __eq__ would be ambiguous
class FilterResult:
    """The filter's verdict on a batch, one entry per image."""

    labels: np.ndarray  # int64 (N,): M's predicted class
    reject: np.ndarray  # bool (N,): True = judged a backdoor input (score > threshold)
    score: np.ndarray  # float64 (N,): -Eq. 3, higher = more suspicious (the detector's own score)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def accept(self) -> np.ndarray:
        return ~self.reject


class Filter:
    """M, B and M' of a saved BaDExpert detector, screening batches of images.

    Images are uint8 (N, C, H, W) in 0..255 or float (N, C, H, W) in [0, 1], as every bdray model
    takes them (the models normalize internally). On CUDA the pass runs under bf16 autocast with
    channels_last activations; on the CPU it computes exactly what ``BaDExpert.score`` does.

    ``trainable_blocks`` (the detector's ``defense.trainable_blocks``) says B and M' share all but
    their last k blocks with M. The filter checks that those prefixes are bit-identical and then runs
    the prefix once per batch and the three suffixes on its output (``shared_blocks`` > 0); if they
    differ it warns and runs the three models in full.
    """

    def __init__(
        self,
        model: nn.Module,
        expert: nn.Module,
        auxiliary: nn.Module,
        *,
        gamma: float,
        threshold: float,
        image_shape: Sequence[int],
        device: str | torch.device | None = None,
        batch_size: int = 1024,
        content_hash: str | None = None,
        trainable_blocks: int | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = self.device.type == "cuda"
        self.amp = on_gpu
        self.channels_last = on_gpu
        # One container, so a single .to() moves all three models and their order is fixed: M, B, M'.
        self.models = nn.ModuleList([model, expert, auxiliary]).to(self.device).eval()
        if self.channels_last:
            self.models.to(memory_format=torch.channels_last)
        self.gamma = float(gamma)
        self.threshold = float(threshold)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.batch_size = int(batch_size)
        self.content_hash = content_hash
        self.prefix: nn.Module | None = None  # M's first blocks, when B and M' share them
        self.suffixes: nn.ModuleList | None = None  # the last blocks of M, B, M' (the same modules as in models)
        self.shared_blocks = 0
        if trainable_blocks is not None:
            self._share_prefix(int(trainable_blocks))

    def _share_prefix(self, trainable_blocks: int) -> None:
        try:
            splits = [split_model(m, trainable_blocks) for m in self.models]
            identical = same_prefix(self.models, trainable_blocks)
        except ValueError as exc:
            warnings.warn(f"trainable_blocks={trainable_blocks}: {exc}; running M, B and M' in full", stacklevel=3)
            return
        if not identical:
            warnings.warn(f"trainable_blocks={trainable_blocks}, but the first blocks of M, B and M' are not "
                          "identical; running M, B and M' in full", stacklevel=3)
            return
        if len(splits[0][0]):  # k = every block leaves no prefix to share
            self.prefix = splits[0][0]
            self.suffixes = nn.ModuleList([suffix for _, suffix in splits])
            self.shared_blocks = len(self.prefix)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
             batch_size: int = 1024) -> Filter:
        """Load a detector directory; refuses one whose detector.json or weight files changed since saving.

        The weights are read as safetensors (no unpickling). A version-1 directory (saved before
        content hashes) loads with a warning; save it again to protect its threshold too.
        """
        detector = BaDExpert.load(path)
        meta = detector.metadata_ or {}
        if detector.threshold_ is None:
            raise ValueError(f"{Path(path) / DETECTOR_JSON}: threshold is null; calibrate the detector before "
                             "saving it for deployment")
        return cls.from_detector(detector, ModelSpec(meta["model_spec"]), device=device, batch_size=batch_size,
                                 content_hash=meta.get("content_hash"))

    @classmethod
    def from_detector(cls, detector: BaDExpert, spec: ModelSpec, *, device: str | torch.device | None = None,
                      batch_size: int = 1024, content_hash: str | None = None) -> Filter:
        """A filter over a fitted and calibrated detector held in memory (its models are shared, not copied)."""
        if detector.model_ is None or detector.threshold_ is None:
            raise RuntimeError("Filter.from_detector needs a fitted and calibrated BaDExpert")
        size = int(spec["image_size"])
        return cls(detector.model_, detector.expert_, detector.auxiliary_, gamma=detector.config.gamma,
                   threshold=detector.threshold_, image_shape=(int(spec["in_channels"]), size, size), device=device,
                   batch_size=batch_size, content_hash=content_hash,
                   trainable_blocks=getattr(detector.config, "trainable_blocks", None))

    # -- screening -------------------------------------------------------------------------------
    def __call__(self, images: np.ndarray | torch.Tensor) -> FilterResult:
        x = check_images(images, self.image_shape)
        preds, confs = [], []
        for start in range(0, len(x), self.batch_size):
            probs = self._one_pass(x[start : start + self.batch_size])  # (3, B, K) on the device
            pred = probs[0].argmax(1)  # (B,): M's class
            # (3, B): each model's confidence in M's class: what Eq. 3 compares
            conf = probs.gather(2, pred.view(1, -1, 1).expand(3, -1, 1)).squeeze(2)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
        if not preds:
            return FilterResult(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.float64))
        conf = torch.cat(confs, 1).numpy()
        score = -eq3_score(conf[1], conf[2], self.gamma)
        return FilterResult(torch.cat(preds).numpy().astype(np.int64), score > self.threshold, score)

    def probabilities(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Softmax outputs of M, B and M' from the shared pass: float32 (3, N, K)."""
        x = check_images(images, self.image_shape)
        parts = [self._one_pass(x[s : s + self.batch_size]).cpu() for s in range(0, len(x), self.batch_size)]
        return torch.cat(parts, 1).numpy() if parts else np.zeros((3, 0, 0), np.float32)

    @torch.no_grad()
    def _one_pass(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 or float on the host -> (3, B, K) float32 softmax of M, B, M' on the device."""
        # One transfer, still uint8 where the input is (4x fewer bytes); scaling to [0, 1] runs on the device.
        x = to_float(x.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.prefix is not None and self.suffixes is not None:
                h = self.prefix(x)  # what M, B and M' all compute first, computed once
                logits = torch.stack([suffix(h) for suffix in self.suffixes])  # (3, B, K)
            else:
                logits = torch.stack([m(x) for m in self.models])  # (3, B, K)
        # Softmax in float32 even under autocast: Eq. 3 divides confidences, bf16 would move the score.
        return F.softmax(logits.float(), dim=2)


def check_images(images: np.ndarray | torch.Tensor, image_shape: Sequence[int]) -> torch.Tensor:
    """``images`` as a CPU/GPU tensor after checking shape, dtype and range; ValueError says what is wrong."""
    c, h, w = (int(s) for s in image_shape)
    expected = f"(N, {c}, {h}, {w})"
    if isinstance(images, np.ndarray):
        with warnings.catch_warnings():
            # Arrays from Ray batches are read-only; the filter never writes to its input.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            try:
                x = torch.from_numpy(images)
            except TypeError:
                raise ValueError(f"images: expected dtype uint8 (0..255) or float (0..1), got {images.dtype}") from None
    elif isinstance(images, torch.Tensor):
        x = images
    else:
        raise TypeError(f"images: expected a numpy array or torch tensor {expected}, got {type(images).__name__}")
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[1:] != (c, h, w):
        hint = ""
        if shape == (c, h, w):
            hint = "; a single image needs a batch axis (images[None])"
        elif len(shape) == 4 and shape[1:] == (h, w, c):
            hint = "; these look channels-last (N, H, W, C): transpose to (N, C, H, W)"
        raise ValueError(f"images: expected shape {expected} for this detector, got {shape}{hint}")
    if x.dtype == torch.uint8:
        return x
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"images: expected dtype uint8 (0..255) or float (0..1), got {_dtype_name(images)}")
    if x.numel():
        low, high = float(x.min()), float(x.max())
        finite = bool(torch.isfinite(x).all())
        if not finite or low < 0.0 or high > 1.0:
            raise ValueError(f"images: float pixels must lie in [0, 1] (the models normalize internally), got "
                             f"min {low:.4g}, max {high:.4g}{'' if finite else ', and NaN/inf'}; pass 0..255 "
                             "images as uint8 or divide them by 255")
    return x


def _dtype_name(images: np.ndarray | torch.Tensor) -> str:
    return str(images.dtype).removeprefix("torch.")


# -- the filter over shard sets, on Ray Data ----------------------------------------------------------


def _artifact_files(path: str | os.PathLike) -> dict[str, bytes]:
    """A detector directory's files as bytes, checked against detector.json (read once, then verified)."""
    directory = Path(path)
    meta = read_artifact_metadata(directory)
    files = {DETECTOR_JSON: (directory / DETECTOR_JSON).read_bytes()}
    for name in _WEIGHT_FILES:
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing (detector.json lists it)")
        files[name] = file.read_bytes()
        if hashlib.sha256(files[name]).hexdigest() != meta["sha256"][name.removesuffix(".safetensors")]:
            raise ValueError(f"{file}: sha256 does not match detector.json (corrupted or replaced)")
    if json.loads(files[DETECTOR_JSON]) != meta:
        raise ValueError(f"{directory / DETECTOR_JSON}: changed while it was being read")
    return files


def output_schema(image_shape: Sequence[int], ground_truth: bool) -> pa.Schema:
    """Columns of the accepted/rejected shards: the input's, then the filter's ``pred_label`` and ``score``."""
    fields = [pa.field("image", image_type("raw", image_shape), nullable=False),
              pa.field("label", pa.int64(), nullable=False), pa.field("index", pa.int64(), nullable=False)]
    if ground_truth:
        fields += [pa.field("true_label", pa.int64(), nullable=False),
                   pa.field("is_poison", pa.bool_(), nullable=False), pa.field("is_cover", pa.bool_(), nullable=False)]
    fields += [pa.field("pred_label", pa.int64(), nullable=False), pa.field("score", pa.float64(), nullable=False)]
    return pa.schema(fields)


class FilterActor:
    """The map_batches UDF: one :class:`Filter` per Ray actor, so the models load once, not per batch."""

    def __init__(self, files: Any, schema: pa.Schema, batch_size: int = 1024, threads: int = 1) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        if isinstance(files, ray.ObjectRef):
            files = ray.get(files)
        # The artifact travels through the object store (workers need not see the driver's disk) and is
        # verified again here by Filter.load.
        with tempfile.TemporaryDirectory(prefix="bdray-detector-") as tmp, warnings.catch_warnings():
            # The driver already warned about a version-1 artifact; once per actor would only repeat it.
            warnings.simplefilter("ignore", UserWarning)
            for name, blob in files.items():
                Path(tmp, name).write_bytes(blob)
            self.filter = Filter.load(tmp, batch_size=batch_size)
        self.schema = schema

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        result = self.filter(batch["image"])
        columns = {"image": encode_images(batch["image"], "raw"), "pred_label": result.labels, "score": result.score}
        arrays = [columns[name] if name in columns else pa.array(batch[name]) for name in self.schema.names]
        table = pa.table(arrays, schema=self.schema)
        # The verdict rides along for the driver's split and is dropped before writing.
        return table.append_column("reject", pa.array(result.reject))


class _ShardWriter:
    """Rows of one side (accepted or rejected) into part-NNNNN.parquet files of at most ``rows_per_shard``."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int) -> None:
        self.directory, self.schema, self.rows_per_shard = directory, schema, rows_per_shard
        directory.mkdir(parents=True)
        self.files: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_file = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None or self.rows_in_file == self.rows_per_shard:
                self._open()
            take = min(table.num_rows, self.rows_per_shard - self.rows_in_file)
            self.writer.write_table(table.slice(0, take), row_group_size=ROW_GROUP_ROWS)  # type: ignore[union-attr]
            self.rows_in_file += take
            self.rows += take
            table = table.slice(take)

    def _open(self) -> None:
        self._close()
        path = self.directory / f"part-{len(self.files):05d}.parquet"
        # As the input shards: no statistics on the image bytes, whose min/max mean nothing.
        self.writer = pq.ParquetWriter(path, self.schema, compression=COMPRESSION, use_dictionary=False,
                                       write_statistics=[n for n in self.schema.names if n != "image"])
        self.files.append({"path": f"{self.directory.name}/{path.name}", "rows": 0})
        self.rows_in_file = 0

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            path = self.directory.parent / self.files[-1]["path"]
            self.files[-1].update(rows=self.rows_in_file, bytes=path.stat().st_size, sha256=sha256_file(path))

    def finish(self) -> list[dict[str, Any]]:
        if not self.files:
            self._open()  # an empty side still gets a file with the schema, so readers need no special case
        self._close()
        return self.files


def filter_shards(
    input: str | os.PathLike,
    out: str | os.PathLike,
    detector: str | os.PathLike,
    *,
    batch_size: int = 1024,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    use_gpu: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
    verify: Verify = "full",
) -> dict[str, Any]:
    """Screen every row of a shard directory with a saved detector; write accepted and rejected shards.

    ``input`` is a shard directory (any mode; a planned set is poisoned while streaming) or its URI;
    ``out`` a local directory, written into a hidden sibling and renamed into place. Uses the running
    Ray (or starts a local one, shut down at the end). Returns what ``out/filter.json`` holds.
    """
    import ray

    from bdray.data.stream import to_ray_dataset

    if "://" in str(out):
        raise ValueError(f"{out}: the filter writes to a local directory (copy it to object storage after)")
    files = _artifact_files(detector)
    meta = json.loads(files[DETECTOR_JSON])
    spec = ModelSpec(meta["model_spec"])
    image_shape = (int(spec["in_channels"]), int(spec["image_size"]), int(spec["image_size"]))
    manifest = open_shards(input, verify=verify)
    if manifest.image_shape != image_shape:
        raise ValueError(f"{input}: images are {list(manifest.image_shape)} (C, H, W), the detector in {detector} "
                         f"takes {list(image_shape)}")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (overwrite=True, or --overwrite, replaces it)")
    ground_truth = manifest.mode != "source"  # a clean source set has no poison ground truth to carry
    columns = ("image", "label", "index", *(("true_label", "is_poison", "is_cover") if ground_truth else ()))
    schema = output_schema(image_shape, ground_truth)

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(logging_level="ERROR", include_dashboard=False)
    try:
        ds = to_ray_dataset(input, columns=columns, verify="fast")  # hashed just above when verify="full"
        screened = ds.map_batches(
            FilterActor,
            fn_constructor_kwargs={"files": ray.put(files), "schema": schema, "batch_size": batch_size,
                                   "threads": max(1, int(cpus_per_actor))},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
        )
        with atomic_directory(out, overwrite=overwrite) as tmp:
            sides = {name: _ShardWriter(tmp / name, schema, rows_per_shard) for name in ("accepted", "rejected")}
            for table in screened.iter_batches(batch_size=None, batch_format="pyarrow"):
                reject = table.column("reject")
                table = table.drop_columns(["reject"])
                sides["accepted"].write(table.filter(pc.invert(reject)))
                sides["rejected"].write(table.filter(reject))
            written = {name: side.finish() for name, side in sides.items()}
            counts = {"rows": sum(s.rows for s in sides.values()), "accepted": sides["accepted"].rows,
                      "rejected": sides["rejected"].rows}
            if counts["rows"] != manifest.counts["rows"]:
                raise RuntimeError(f"{input}: {manifest.counts['rows']} rows in, {counts['rows']} screened")
            summary = {
                "format": FILTER_FORMAT,
                "version": FILTER_VERSION,
                "input": {"path": str(input), "mode": manifest.mode, "content_hash": manifest.content_hash},
                "detector": {"path": str(detector), "content_hash": meta.get("content_hash"),
                             "threshold": meta["threshold"], "gamma": meta["gamma"]},
                "image_shape": list(image_shape),
                "columns": schema.names,
                "counts": counts,
                "files": written,
            }
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if started:
            ray.shutdown()
    return summary


# -- command line (shared by `bdray filter` and jobs/filter.py) ---------------------------------------


def add_filter_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--detector", required=True, help="saved detector directory, e.g. runs/quickstart/detector")
    parser.add_argument("--input", required=True, help="shard directory (bdray.data.shards) or its URI")
    parser.add_argument("--out", required=True, help="output directory: accepted/, rejected/, filter.json")
    parser.add_argument("--batch-size", type=int, default=1024, help="images per map_batches call and per pass")
    parser.add_argument("--actors", type=int, default=1, help="filter replicas (Ray actors)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor (bf16 autocast, channels_last)")
    parser.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD,
                        help="rows per output Parquet file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--fast-verify", action="store_true",
                        help="check input shard sizes and schemas only, without hashing every file")
    return parser


def filter_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`filter_shards` with what :func:`add_filter_arguments` parsed."""
    for name in ("batch_size", "actors", "rows_per_shard"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.cpus_per_actor <= 0:
        raise ValueError(f"--cpus-per-actor must be positive, got {args.cpus_per_actor}")
    return filter_shards(args.input, args.out, args.detector, batch_size=args.batch_size, num_actors=args.actors,
                         cpus_per_actor=args.cpus_per_actor, use_gpu=args.gpu, rows_per_shard=args.rows_per_shard,
                         overwrite=args.overwrite, verify="fast" if args.fast_verify else "full")
