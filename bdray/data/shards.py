"""Poisoned training sets as Parquet shards plus a manifest (layout: ``docs/data-format.md``).

Three kinds of shard directory, told apart by the manifest's ``mode``:

- ``source``: clean images written once (``image``, ``label``, ``index``), raw or PNG/JPEG bytes;
- ``materialized``: one row per sample with the trigger already stamped and the ground truth beside it;
- ``planned``: a poison plan (``plan.parquet``, the attack's config, seed and trained state) that
  points at a ``source``; the trigger is applied while reading, so a sweep over poison rates writes
  a few kilobytes per rate instead of the images again.

Both poisoned modes give the same batches for the same data, attack and seed: the writer and the
reader go through :func:`poison_rows`, and attacks with per-sample randomness draw it from the
``index`` column. Directories are written into a temporary sibling and renamed into place, so an
interrupted write leaves nothing at the target; :func:`open_shards` refuses a directory whose
files do not match its manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bdray.atomic import atomic_directory, sha256_file, sha256_stream
from bdray.data.base import ImageSet

if TYPE_CHECKING:
    from bdray.attacks.base import Attack, PoisonedSet, PoisonPlan

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PLAN_FILE = "plan.parquet"
ATTACK_STATE_FILE = "attack.safetensors"
FORMATS = ("raw", "png", "jpeg")
MODES = ("source", "materialized", "planned")
DEFAULT_ROWS_PER_SHARD = 4096
# Row groups bound what a reader holds at once; 1024 rows is 0.8 MB of 28x28 pixels or ~100 MB of
# ImageNet JPEGs.
ROW_GROUP_ROWS = 1024
JPEG_QUALITY = 90
# Snappy: decompresses ~5x faster than zstd here; PNG/JPEG bytes do not compress further anyway.
COMPRESSION = "snappy"

ImageFormat = Literal["raw", "png", "jpeg"]
Mode = Literal["source", "materialized", "planned"]
Verify = Literal["full", "fast"]


class ShardError(ValueError):
    """A shard directory that cannot be read as written: missing, foreign, truncated or altered files."""


# -- schema ------------------------------------------------------------------------------------------


def image_type(image_format: str, image_shape: Sequence[int]) -> pa.DataType:
    """Raw pixels are ``fixed_size_binary(C*H*W)``: read 2x faster than ``binary`` and ~50x faster than
    ``fixed_size_list<uint8>`` (which Parquet stores with per-byte repetition levels)."""
    return pa.binary(int(np.prod(image_shape))) if image_format == "raw" else pa.binary()


def shard_schema(mode: str, image_format: str, image_shape: Sequence[int]) -> pa.Schema:
    """The exact Arrow schema of one shard file of ``mode``."""
    image = pa.field("image", image_type(image_format, image_shape), nullable=False)
    index = pa.field("index", pa.int64(), nullable=False)
    label = pa.field("label", pa.int64(), nullable=False)
    if mode == "materialized":
        return pa.schema([
            image, label, pa.field("true_label", pa.int64(), nullable=False),
            pa.field("is_poison", pa.bool_(), nullable=False), pa.field("is_cover", pa.bool_(), nullable=False), index,
        ])
    return pa.schema([image, label, index])


PLAN_SCHEMA = pa.schema([
    pa.field("index", pa.int64(), nullable=False),
    pa.field("label", pa.int64(), nullable=False),
    pa.field("is_poison", pa.bool_(), nullable=False),
    pa.field("is_cover", pa.bool_(), nullable=False),
])


# -- manifest ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file the manifest vouches for; ``path`` is relative to the manifest's directory."""

    path: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds, plus where it was read from (``root``, ``filesystem``)."""

    mode: str
    dataset: dict[str, Any]  # name, image_shape [C, H, W], num_classes, mean, std
    image_format: str
    counts: dict[str, int]  # rows, poisoned, cover
    files: tuple[FileEntry, ...]  # shards holding images (empty for a planned set: see ``source``)
    attack: dict[str, Any] | None = None  # the attack's config (build_attack input) and its class
    seed: int | None = None
    plan: FileEntry | None = None
    attack_state: FileEntry | None = None
    source_ref: dict[str, str] | None = None  # planned: {"path": relative path or URI, "content_hash"}
    content_hash: str = ""
    schema_version: int = SCHEMA_VERSION
    root: str = field(default="", compare=False)
    filesystem: pafs.FileSystem | None = field(default=None, compare=False, repr=False)
    source: Manifest | None = field(default=None, compare=False, repr=False)  # planned: the opened source

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.dataset["image_shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.dataset["num_classes"])

    def body(self) -> dict[str, Any]:
        """The JSON document without ``content_hash`` (what the hash covers)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version, "mode": self.mode, "dataset": self.dataset,
            "image_format": self.image_format, "attack": self.attack, "seed": self.seed, "counts": self.counts,
            "files": [vars(f) for f in self.files],
            "plan": vars(self.plan) if self.plan else None,
            "attack_state": vars(self.attack_state) if self.attack_state else None,
            "source": self.source_ref,
        }
        return out

    def to_json(self) -> str:
        return json.dumps({**self.body(), "content_hash": self.content_hash}, indent=2, sort_keys=True) + "\n"

    def image_manifest(self) -> Manifest:
        """The manifest whose shards hold the images (format, shape, files): this one, or a planned set's source."""
        holder = self.source if self.mode == "planned" else self
        if holder is None:
            raise ShardError(f"{self.root}: the planned set's source was not opened")
        return holder

    def image_files(self) -> list[str]:
        """Full paths (in ``filesystem``) of the shards holding the images, in row order."""
        holder = self.image_manifest()
        return [_join(holder.root, f.path) for f in holder.files]


def _canonical_hash(body: dict[str, Any]) -> str:
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _entry(d: dict[str, Any] | None) -> FileEntry | None:
    return None if d is None else FileEntry(str(d["path"]), int(d["rows"]), int(d["bytes"]), str(d["sha256"]))


def _manifest_from_dict(raw: dict[str, Any], where: str) -> Manifest:
    try:
        return Manifest(
            mode=raw["mode"], dataset=raw["dataset"], image_format=raw["image_format"],
            counts={k: int(v) for k, v in raw["counts"].items()},
            files=tuple(_entry(f) for f in raw["files"]),  # type: ignore[misc]
            attack=raw.get("attack"), seed=raw.get("seed"), plan=_entry(raw.get("plan")),
            attack_state=_entry(raw.get("attack_state")), source_ref=raw.get("source"),
            content_hash=raw["content_hash"], schema_version=raw["schema_version"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardError(f"{where}: not a bdray shard manifest (bad or missing field: {exc})") from None


# -- encoding ----------------------------------------------------------------------------------------


def encode_images(images: np.ndarray, image_format: str) -> pa.Array:
    """uint8 (B, C, H, W) -> the ``image`` column in ``image_format``."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    n, c, h, w = images.shape
    if image_format == "raw":
        return pa.Array.from_buffers(pa.binary(c * h * w), n, [None, pa.py_buffer(images)])
    from PIL import Image

    encoded = []
    for img in images:
        pil = Image.fromarray(img[0] if c == 1 else img.transpose(1, 2, 0))
        buf = io.BytesIO()
        if image_format == "png":
            pil.save(buf, format="PNG", compress_level=6)
        else:
            pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
        encoded.append(buf.getvalue())
    return pa.array(encoded, type=pa.binary())


def decode_images(column: pa.Array | pa.ChunkedArray, image_format: str, image_shape: Sequence[int]) -> np.ndarray:
    """The ``image`` column -> uint8 (B, C, H, W); raw pixels are copied once, encoded ones decoded."""
    c, h, w = (int(s) for s in image_shape)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    if image_format == "raw":
        size = c * h * w
        data = column.buffers()[1]
        # zero-copy view of the Arrow buffer; the copy makes the result writable (triggers stamp it)
        return np.frombuffer(data, np.uint8, count=n * size, offset=column.offset * size).reshape(n, c, h, w).copy()
    from PIL import Image

    out = np.empty((n, c, h, w), np.uint8)
    mode = "L" if c == 1 else "RGB"
    for i, blob in enumerate(column.to_pylist()):
        with Image.open(io.BytesIO(blob)) as img:
            img = img.convert(mode) if img.mode != mode else img
            pixels = np.asarray(img)
        if pixels.shape[:2] != (h, w):
            raise ShardError(f"an encoded image is {pixels.shape[1]}x{pixels.shape[0]}, the manifest says {w}x{h}")
        out[i] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    return out


# -- the poison plan, applied to rows ---------------------------------------------------------------


@dataclass(frozen=True)
class PlanRows:
    """The rows a plan touches, sorted by source index: what the reader needs to poison a batch."""

    index: np.ndarray  # int64, sorted
    label: np.ndarray  # int64, the training label of those rows
    is_poison: np.ndarray  # bool
    is_cover: np.ndarray  # bool

    @classmethod
    def from_plan(cls, plan: PoisonPlan, labels: np.ndarray) -> PlanRows:
        touched = np.union1d(np.union1d(plan.poison_index, plan.cover_index), np.flatnonzero(plan.labels != labels))
        touched = touched.astype(np.int64)
        return cls(touched, plan.labels[touched].astype(np.int64), np.isin(touched, plan.poison_index),
                   np.isin(touched, plan.cover_index))

    @classmethod
    def from_table(cls, table: pa.Table) -> PlanRows:
        return cls(*(table.column(name).to_numpy() for name in PLAN_SCHEMA.names))

    def to_table(self) -> pa.Table:
        return pa.table([self.index, self.label, self.is_poison, self.is_cover], schema=PLAN_SCHEMA)


def poison_rows(
    images: np.ndarray, labels: np.ndarray, index: np.ndarray, plan: PlanRows, attack: Attack
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``plan`` to a batch of rows identified by their source ``index``; ``images`` is modified.

    Returns (images, training labels, is_poison, is_cover). Any split of a dataset into batches gives
    the same result, because attacks draw per-sample randomness from ``index``.
    """
    import torch

    labels = labels.astype(np.int64, copy=True)
    is_poison = np.zeros(len(index), bool)
    is_cover = np.zeros(len(index), bool)
    if len(plan.index):
        pos = np.minimum(np.searchsorted(plan.index, index), len(plan.index) - 1)
        hit = plan.index[pos] == index
        labels[hit] = plan.label[pos[hit]]
        is_poison[hit] = plan.is_poison[pos[hit]]
        is_cover[hit] = plan.is_cover[pos[hit]]
    for mask, cover in ((is_poison, False), (is_cover, True)):
        rows = np.flatnonzero(mask)
        if rows.size:
            images[rows] = attack.apply(torch.from_numpy(images[rows]), index=torch.from_numpy(index[rows]),
                                        cover=cover).numpy()
    return images, labels, is_poison, is_cover


def trigger_rows(images: np.ndarray, labels: np.ndarray, index: np.ndarray, attack: Attack,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test-time trigger for ASR: keep the rows whose label the attack changes, stamp them, relabel.

    Returns (images, target labels, kept row positions); the same rows as
    :func:`bdray.attacks.triggered_testset`.
    """
    import torch

    targets = attack.target_labels(torch.from_numpy(labels.astype(np.int64))).numpy()
    keep = np.flatnonzero(targets != labels)
    triggered = attack.apply(torch.from_numpy(images[keep]), test=True, index=torch.from_numpy(index[keep])).numpy()
    return triggered, targets[keep], keep


# -- writing -----------------------------------------------------------------------------------------


def _write_table(directory: Path, name: str, table: pa.Table) -> FileEntry:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    # No statistics on the image column: min/max of image bytes is useless and bloats the footer.
    pq.write_table(table, path, compression=COMPRESSION, use_dictionary=False, row_group_size=ROW_GROUP_ROWS,
                   write_statistics=[n for n in table.column_names if n != "image"])
    return FileEntry(name, table.num_rows, path.stat().st_size, sha256_file(path))


def _chunks(data: ImageSet | Iterable[ImageSet], rows_per_shard: int) -> Iterator[tuple[ImageSet, int]]:
    """Re-slice the input into shards of exactly ``rows_per_shard`` rows (the last may be shorter), so
    the files do not depend on how an iterable input was chunked. Yields (shard, first row index)."""
    parts = [data] if isinstance(data, ImageSet) else data
    pending: list[ImageSet] = []
    held, start = 0, 0
    for part in parts:
        pending.append(part)
        held += len(part)
        while held >= rows_per_shard:
            images = np.concatenate([p.images for p in pending]) if len(pending) > 1 else pending[0].images
            labels = np.concatenate([p.labels for p in pending]) if len(pending) > 1 else pending[0].labels
            first = pending[0]
            yield first.replace(images=images[:rows_per_shard], labels=labels[:rows_per_shard]), start
            start += rows_per_shard
            rest = first.replace(images=images[rows_per_shard:], labels=labels[rows_per_shard:])
            pending, held = ([rest] if len(rest) else []), len(rest)
    if held:
        first = pending[0]
        yield first.replace(images=np.concatenate([p.images for p in pending]),
                            labels=np.concatenate([p.labels for p in pending])), start


def _dataset_info(data: ImageSet) -> dict[str, Any]:
    return {"name": data.name, "image_shape": list(data.image_shape), "num_classes": int(data.num_classes),
            "mean": [float(m) for m in data.mean], "std": [float(s) for s in data.std]}


def _finish(directory: Path, manifest: Manifest) -> Manifest:
    manifest = replace(manifest, content_hash=_canonical_hash(manifest.body()))
    (directory / MANIFEST).write_text(manifest.to_json())
    return replace(manifest, root=str(directory))


def _target(path: str | os.PathLike, overwrite: bool) -> Any:
    """The directory to fill; renamed into place only when complete (:func:`bdray.atomic.atomic_directory`)."""
    if "://" in str(path):
        raise ValueError(f"{path}: shards are written to a local directory (copy them to object storage after)")
    return atomic_directory(path, overwrite=overwrite)


def _check_format(image_format: str, allowed: Sequence[str] = FORMATS) -> None:
    if image_format not in allowed:
        raise ValueError(f"Unknown value '{image_format}' for argument format. Valid values are {set(allowed)}")


def _write_source_into(directory: Path, data: ImageSet | Iterable[ImageSet], image_format: str,
                       rows_per_shard: int) -> Manifest:
    files, info, rows = [], None, 0
    for number, (chunk, start) in enumerate(_chunks(data, rows_per_shard)):
        info = info or _dataset_info(chunk)
        if list(chunk.image_shape) != info["image_shape"]:
            raise ValueError(f"chunk at row {start}: images {chunk.image_shape}, the first {info['image_shape']}")
        schema = shard_schema("source", image_format, chunk.image_shape)
        table = pa.table([encode_images(chunk.images, image_format), chunk.labels.astype(np.int64),
                          np.arange(start, start + len(chunk), dtype=np.int64)], schema=schema)
        files.append(_write_table(directory, f"part-{number:05d}.parquet", table))
        rows += len(chunk)
    if info is None:
        raise ValueError("cannot write an empty dataset")
    return _finish(directory, Manifest(mode="source", dataset=info, image_format=image_format,
                                       counts={"rows": rows, "poisoned": 0, "cover": 0}, files=tuple(files)))


def write_source(
    path: str | os.PathLike,
    data: ImageSet | Iterable[ImageSet],
    *,
    format: ImageFormat = "raw",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
) -> Manifest:
    """Write clean images once as shards (``image``, ``label``, ``index``) for planned poisoned sets.

    ``data`` may be an iterable of ImageSet chunks (dataset metadata from the first), so a set larger
    than memory is written one shard at a time. ``format`` "png"/"jpeg" stores encoded bytes
    (JPEG is lossy: triggers are applied after decoding, so both poisoned modes still agree).
    """
    _check_format(format)
    with _target(path, overwrite) as tmp:
        _write_source_into(tmp, data, format, rows_per_shard)
    return open_shards(path, verify="fast")


def write_poisoned(
    path: str | os.PathLike,
    data: ImageSet | str | os.PathLike,
    attack: Attack,
    seed: int,
    *,
    mode: Literal["materialized", "planned"] = "materialized",
    format: ImageFormat = "raw",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
) -> Manifest:
    """Poison ``data`` with ``attack`` (plan drawn with ``seed``) and write it as a shard directory.

    ``data`` is an in-memory ImageSet, or (planned mode) the path of a directory written by
    :func:`write_source`, which the plan then references instead of copying: a sweep over poison rates
    writes only a plan per rate. A planned set built from an ImageSet writes its source to
    ``path/source``. Attacks with a trained part are fitted here with ``seed`` and their state saved.
    """
    if mode not in ("materialized", "planned"):
        raise ValueError(f"Unknown value '{mode}' for argument mode. Valid values are {{'materialized', 'planned'}}")
    # JPEG after the trigger would blur it, and the two modes would no longer agree.
    _check_format(format, ("raw", "png") if mode == "materialized" else FORMATS)
    source: Manifest | None = None
    if not isinstance(data, ImageSet):
        if mode != "planned":
            raise ValueError("a materialized set is written from an in-memory ImageSet; pass mode='planned' to "
                             "reference a source directory")
        source = open_shards(data)
        if source.mode != "source":
            raise ShardError(f"{data}: expected a source directory (mode 'source'), found mode '{source.mode}'")
        labels = _read_column(source, "label")
    else:
        labels = data.labels
    clean = data if isinstance(data, ImageSet) else None
    if attack.needs_fit:
        clean = clean if clean is not None else read_imageset(source.root).data  # type: ignore[union-attr]
        attack.fit(clean, seed=seed)
    plan = attack.plan(labels, seed)
    rows = PlanRows.from_plan(plan, labels)
    attack_info = {"config": attack.config.model_dump(mode="json"), "class": attack.metadata()["class"]}
    counts = {"rows": len(labels), "poisoned": len(plan.poison_index), "cover": len(plan.cover_index)}

    with _target(path, overwrite) as tmp:
        state = _write_attack_state(tmp, attack)
        if mode == "materialized":
            assert clean is not None
            files = []
            for number, (chunk, start) in enumerate(_chunks(clean, rows_per_shard)):
                index = np.arange(start, start + len(chunk), dtype=np.int64)
                images, train, is_poison, is_cover = poison_rows(chunk.images.copy(), chunk.labels, index, rows, attack)
                table = pa.table(
                    [encode_images(images, format), train, chunk.labels.astype(np.int64), is_poison, is_cover, index],
                    schema=shard_schema("materialized", format, clean.image_shape))
                files.append(_write_table(tmp, f"part-{number:05d}.parquet", table))
            manifest = Manifest(mode="materialized", dataset=_dataset_info(clean), image_format=format, counts=counts,
                                files=tuple(files), attack=attack_info, seed=seed, attack_state=state)
        else:
            if source is None:
                assert clean is not None
                source = _write_source_into(tmp / "source", clean, format, rows_per_shard)
                ref = "source"
            else:
                ref = _relative_ref(source.root, Path(path))
            plan_entry = _write_table(tmp, PLAN_FILE, rows.to_table())
            manifest = Manifest(mode="planned", dataset=source.dataset, image_format=source.image_format,
                                counts=counts, files=(), attack=attack_info, seed=seed, plan=plan_entry,
                                attack_state=state, source_ref={"path": ref, "content_hash": source.content_hash})
        _finish(tmp, manifest)
    return open_shards(path, verify="fast")


def _write_attack_state(directory: Path, attack: Attack) -> FileEntry | None:
    state = attack.state_dict()
    if not state:
        return None
    from safetensors.torch import save_file

    path = directory / ATTACK_STATE_FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    return FileEntry(ATTACK_STATE_FILE, 0, path.stat().st_size, sha256_file(path))


def _relative_ref(source_root: str, target: Path) -> str:
    # Relative when both are local, so a dataset and its source can move together.
    if "://" in source_root:
        return source_root
    return os.path.relpath(Path(source_root).resolve(), target.resolve())


# -- reading and validating --------------------------------------------------------------------------


def resolve_filesystem(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None,
                       ) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, a URI (``s3://``, ``gs://``, ``file://``) or an explicit fs."""
    path = str(path)
    if filesystem is not None:
        return filesystem, path
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def _join(root: str, relative: str) -> str:
    return posixpath.normpath(posixpath.join(root, relative))


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _hash_stream(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return sha256_stream(f)


def _check_file(fs: pafs.FileSystem, root: str, entry: FileEntry, schema: pa.Schema | None, verify: str) -> None:
    path = _join(root, entry.path)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ShardError(f"{path}: missing (the manifest lists it with {entry.rows} rows)")
    if schema is not None:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                found = meta.schema.to_arrow_schema()
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged footer
            raise ShardError(f"{path}: not a readable Parquet file ({exc})") from None
        if not found.equals(schema):
            raise ShardError(f"{path}: columns {_describe(found)}, expected {_describe(schema)}")
        if meta.num_rows != entry.rows:
            raise ShardError(f"{path}: {meta.num_rows} rows, the manifest expects {entry.rows}")
    if info.size != entry.bytes:
        raise ShardError(f"{path}: {info.size} bytes, the manifest expects {entry.bytes} (truncated or replaced?)")
    if verify == "full":
        digest = _hash_stream(fs, path)
        if digest != entry.sha256:
            raise ShardError(f"{path}: sha256 {digest[:16]}..., the manifest expects {entry.sha256[:16]}...")


def _describe(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


def open_shards(path: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None,
                verify: Verify = "full") -> Manifest:
    """Read and check a shard directory's manifest and files; raise :class:`ShardError` naming what is wrong.

    ``verify="full"`` also hashes every file (reads all bytes); ``"fast"`` checks presence, sizes,
    Parquet footers, schemas and row counts only. A planned set's source is opened the same way.
    """
    fs, root = resolve_filesystem(path, filesystem)
    where = _join(root, MANIFEST)
    try:
        raw = json.loads(_read_bytes(fs, where))
    except FileNotFoundError:
        raise ShardError(f"{where}: not found; expected a directory written by write_poisoned/write_source") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{where}: cannot be read as JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        found = raw.get("schema_version") if isinstance(raw, dict) else None
        raise ShardError(f"{where}: schema_version {found!r}, this bdray reads schema_version {SCHEMA_VERSION}")
    manifest = replace(_manifest_from_dict(raw, where), root=root, filesystem=fs)
    if manifest.mode not in MODES or manifest.image_format not in FORMATS:
        raise ShardError(f"{where}: mode '{manifest.mode}' / format '{manifest.image_format}' unknown; "
                         f"expected a mode in {MODES} and a format in {FORMATS}")
    if _canonical_hash(manifest.body()) != manifest.content_hash:
        raise ShardError(f"{where}: content_hash does not match the manifest's fields (edited by hand?)")

    schema = shard_schema(manifest.mode, manifest.image_format, manifest.image_shape)
    for entry in manifest.files:
        _check_file(fs, root, entry, schema, verify)
    if sum(f.rows for f in manifest.files) != manifest.counts["rows"] and manifest.mode != "planned":
        raise ShardError(f"{where}: the files hold {sum(f.rows for f in manifest.files)} rows, "
                         f"counts.rows says {manifest.counts['rows']}")
    if manifest.attack_state is not None:
        _check_file(fs, root, manifest.attack_state, None, verify)
    if manifest.mode == "planned":
        if manifest.plan is None or manifest.source_ref is None:
            raise ShardError(f"{where}: a planned set needs 'plan' and 'source'")
        _check_file(fs, root, manifest.plan, PLAN_SCHEMA, verify)
        ref = manifest.source_ref["path"]
        source_fs, source_root = (resolve_filesystem(ref) if "://" in ref else (fs, _join(root, ref)))
        source = open_shards(source_root, filesystem=source_fs, verify=verify)
        if source.content_hash != manifest.source_ref["content_hash"]:
            raise ShardError(f"{_join(source_root, MANIFEST)}: content_hash {source.content_hash[:16]}..., the plan "
                             f"in {where} was made for {manifest.source_ref['content_hash'][:16]}...")
        if source.counts["rows"] != manifest.counts["rows"]:
            raise ShardError(f"{where}: plans {manifest.counts['rows']} rows, its source has {source.counts['rows']}")
        manifest = replace(manifest, source=source)
    return manifest


def _read_column(manifest: Manifest, name: str) -> np.ndarray:
    fs = manifest.filesystem or pafs.LocalFileSystem()
    parts = [pq.read_table(p, columns=[name], filesystem=fs).column(name).to_numpy() for p in manifest.image_files()]
    return np.concatenate(parts)


def read_plan(manifest: Manifest) -> PlanRows:
    """The plan rows of a planned set (empty for other modes)."""
    if manifest.plan is None:
        return PlanRows(*(np.zeros(0, t) for t in (np.int64, np.int64, bool, bool)))
    fs = manifest.filesystem or pafs.LocalFileSystem()
    return PlanRows.from_table(pq.read_table(_join(manifest.root, manifest.plan.path), filesystem=fs))


def load_attack(path_or_manifest: str | os.PathLike | Manifest, *, filesystem: pafs.FileSystem | None = None,
                ) -> Attack | None:
    """Rebuild the attack a poisoned set was written with (trained state loaded); None for a source."""
    from bdray.attacks.base import build_attack

    manifest = path_or_manifest if isinstance(path_or_manifest, Manifest) else open_shards(
        path_or_manifest, filesystem=filesystem, verify="fast")
    if manifest.attack is None:
        return None
    attack = build_attack(manifest.attack["config"], image_shape=manifest.image_shape,
                          num_classes=manifest.num_classes)
    if manifest.attack_state is not None:
        from safetensors.torch import load

        fs = manifest.filesystem or pafs.LocalFileSystem()
        attack.load_state_dict(load(_read_bytes(fs, _join(manifest.root, manifest.attack_state.path))))
    return attack


def read_imageset(path: str | os.PathLike, *, attack: Attack | None = None,
                  filesystem: pafs.FileSystem | None = None, verify: Verify = "full") -> PoisonedSet:
    """The whole set in memory as a PoisonedSet (rows in ``index`` order); for sets that fit in RAM.

    ``attack`` overrides the one rebuilt from the manifest (needed for attack classes that are not
    registered by name).
    """
    from bdray.attacks.base import PoisonedSet

    manifest = open_shards(path, filesystem=filesystem, verify=verify)
    fs = manifest.filesystem or pafs.LocalFileSystem()
    holder = manifest.image_manifest()
    if manifest.mode == "planned":
        attack = attack or load_attack(manifest)
        plan = read_plan(manifest)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "label", "true_label", "is_poison", "is_cover",
                                                         "index")}
    for file in manifest.image_files():
        table = pq.read_table(file, filesystem=fs)
        images = decode_images(table.column("image"), holder.image_format, holder.image_shape)
        index = table.column("index").to_numpy()
        true = table.column("true_label" if manifest.mode == "materialized" else "label").to_numpy()
        if manifest.mode == "materialized":
            label, is_poison, is_cover = (table.column(n).to_numpy() for n in ("label", "is_poison", "is_cover"))
        elif manifest.mode == "planned":
            images, label, is_poison, is_cover = poison_rows(images, true, index, plan, attack)  # type: ignore[arg-type]
        else:
            label, is_poison, is_cover = true, np.zeros(len(true), bool), np.zeros(len(true), bool)
        for key, value in zip(parts, (images, label, true, is_poison, is_cover, index), strict=True):
            parts[key].append(value)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if not np.array_equal(out["index"], np.arange(len(out["index"]))):
        order = np.argsort(out["index"], kind="stable")
        if not np.array_equal(out["index"][order], np.arange(len(order))):
            raise ShardError(f"{manifest.root}: the index column is not a permutation of 0..{len(order) - 1}")
        out = {k: v[order] for k, v in out.items()}
    info = manifest.dataset
    data = ImageSet(out["image"], out["label"].astype(np.int64), int(info["num_classes"]), info["name"],
                    tuple(info["mean"]), tuple(info["std"]))
    return PoisonedSet(data, out["true_label"].astype(np.int64), np.flatnonzero(out["is_poison"]).astype(np.int64),
                       np.flatnonzero(out["is_cover"]).astype(np.int64))
