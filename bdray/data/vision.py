"""Natural-image datasets (CIFAR-10/100, GTSRB, ImageNet-style folders) read from a local root.

Each loader reads the files in the layout their publishers (or torchvision) leave on disk; nothing
is downloaded. CIFAR's python batches are pickles, so they go through :class:`SafeUnpickler`, which
only rebuilds numpy arrays: a tampered batch is refused before any of its code can run.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bdray.data.base import DatasetPair, ImageSet
from bdray.data.datasets import DatasetNotFoundError, register_dataset

# torchvision's customary ``root="./data"``: where cifar10/cifar100/gtsrb look when data.root is unset.
DEFAULT_ROOT = "data"

CIFAR10_STATS = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
CIFAR100_STATS = {"mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)}
GTSRB_STATS = {"mean": (0.3403, 0.3121, 0.3214), "std": (0.2724, 0.2608, 0.2669)}
IMAGENET_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
TINY_IMAGENET_STATS = {"mean": (0.4802, 0.4481, 0.3975), "std": (0.2302, 0.2265, 0.2262)}
# ImageNet's statistics pushed through PIL's RGB -> L weights, for channels=1 (approximate).
IMAGENET_GRAY_STATS = {"mean": (0.449,), "std": (0.226,)}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _root(root: str | None) -> Path:
    return Path(root if root is not None else DEFAULT_ROOT).expanduser()


def _workers(num_workers: int | None) -> int:
    return max(1, num_workers if num_workers is not None else min(8, os.cpu_count() or 1))


# --- restricted unpickling -----------------------------------------------------------------------


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than the numpy pieces a dataset batch is made of."""


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, "latin1")


def _safe_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 keeps these in numpy._core; files pickled by numpy 1.x name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_SAFE_GLOBALS = _safe_globals()


class SafeUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists of numbers, strings and numeric numpy arrays, and nothing else.

    ``find_class`` is the only door through which a pickle reaches code (``REDUCE``, ``NEWOBJ``,
    ``INST``/``OBJ`` and the copyreg extension opcodes all pass through it), so allowing only
    numpy's array and scalar reconstructors keeps a malicious file from calling ``os.system`` &c.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': dataset batches hold only numpy arrays, "
                "lists and strings, so this file was not written by the dataset's publisher"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id: dataset batches do not use them")


def safe_load_pickle(path: Path) -> Any:
    """Read ``path`` with :class:`SafeUnpickler`; any failure is a ValueError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    try:
        # latin1 is what Python 2 pickles of numpy arrays need (CIFAR's batches are Python 2 pickles).
        obj = SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as exc:
        raise ValueError(f"{path}: {exc}") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable dataset pickle ({type(exc).__name__}: {exc})") from None
    for value in _walk(obj):
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise ValueError(f"{path}: holds an object-dtype array, not a dataset batch")
    return obj


def _walk(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in _walk(value)]
    if isinstance(obj, (list, tuple)):
        return [v for value in obj for v in _walk(value)]
    return [obj]


# --- CIFAR ---------------------------------------------------------------------------------------

_CIFAR_PIXELS = 3 * 32 * 32


def _read_cifar_pickle(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a dict with 'data' and '{label_key}', got {type(obj).__name__}"
        )
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise ValueError(f"{path}: not a CIFAR batch (no {', '.join(missing)}; keys: {sorted(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % _CIFAR_PIXELS:
        raise ValueError(
            f"{path}: 'data' must be a uint8 array of rows of {_CIFAR_PIXELS} pixels, got "
            f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        )
    images = data.reshape(-1, 3, 32, 32)
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: '{label_key}' is not a list of integers ({exc})") from None
    return images, _check_labels(path, labels, len(images), num_classes)


def _read_cifar_bin(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % (1 + _CIFAR_PIXELS):
        raise ValueError(
            f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 binary records "
            f"(1 label byte + {_CIFAR_PIXELS} pixel bytes each)"
        )
    records = raw.reshape(-1, 1 + _CIFAR_PIXELS)
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return images, _check_labels(path, records[:, 0].astype(np.int64), len(images), num_classes)


def _check_labels(path: Path, labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if labels.shape != (n,):
        raise ValueError(f"{path}: {labels.size} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1} (found {labels.min()}..{labels.max()})")
    return labels


def _find_folder(base: Path, folder: str, probe: str) -> Path | None:
    """``base/folder`` or ``base`` itself, whichever holds ``probe``."""
    for candidate in (base / folder, base):
        if (candidate / probe).is_file():
            return candidate
    return None


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _pair(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
          num_classes: int, stats: dict[str, Any]) -> DatasetPair:
    return DatasetPair(
        train=ImageSet(np.ascontiguousarray(train[0]), train[1], num_classes, f"{name}/train", **stats),
        test=ImageSet(np.ascontiguousarray(test[0]), test[1], num_classes, f"{name}/test", **stats),
    )


def _tarball_hint(base: Path, tarball: str) -> str:
    if (base / tarball).is_file():
        return f" ({base / tarball} is there but not extracted: run `tar xzf {tarball}` in {base})"
    return ""


_CIFAR10_REMEDY = (
    "get https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it (it unpacks to "
    "cifar-10-batches-py/) and set data.root to the folder that holds cifar-10-batches-py"
)


@register_dataset("cifar10")
def cifar10(root: str | None = None) -> DatasetPair:
    """CIFAR-10 from ``cifar-10-batches-py`` (python pickles) or else ``cifar-10-batches-bin``."""
    base = _root(root)
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    folder = _find_folder(base, "cifar-10-batches-py", "data_batch_1")
    if folder is not None:
        missing = [n for n in [*train_names, "test_batch"] if not (folder / n).is_file()]
        if missing:
            raise DatasetNotFoundError(f"cifar10: {', '.join(missing)} missing from {folder}; " + _CIFAR10_REMEDY)
        train = _concat([_read_cifar_pickle(folder / n, "labels", 10) for n in train_names])
        return _pair("cifar10", train, _read_cifar_pickle(folder / "test_batch", "labels", 10), 10, CIFAR10_STATS)
    folder = _find_folder(base, "cifar-10-batches-bin", "data_batch_1.bin")
    if folder is not None:
        missing = [f"{n}.bin" for n in [*train_names, "test_batch"] if not (folder / f"{n}.bin").is_file()]
        if missing:
            raise DatasetNotFoundError(f"cifar10: {', '.join(missing)} missing from {folder}; " + _CIFAR10_REMEDY)
        train = _concat([_read_cifar_bin(folder / f"{n}.bin", 10) for n in train_names])
        return _pair("cifar10", train, _read_cifar_bin(folder / "test_batch.bin", 10), 10, CIFAR10_STATS)
    raise DatasetNotFoundError(
        f"cifar10: data_batch_1 not found in {base / 'cifar-10-batches-py'} nor {base} "
        f"(nor data_batch_1.bin in {base / 'cifar-10-batches-bin'})"
        f"{_tarball_hint(base, 'cifar-10-python.tar.gz')}; " + _CIFAR10_REMEDY
    )


@register_dataset("cifar100")
def cifar100(root: str | None = None) -> DatasetPair:
    """CIFAR-100 from ``cifar-100-python/{train,test}``, with the 100 fine labels."""
    base = _root(root)
    folder = _find_folder(base, "cifar-100-python", "train")
    if folder is None or not (folder / "test").is_file():
        looked = folder if folder is not None else f"{base / 'cifar-100-python'} nor {base}"
        missed = "test" if folder is not None else "train"
        raise DatasetNotFoundError(
            f"cifar100: {missed} not found in {looked}{_tarball_hint(base, 'cifar-100-python.tar.gz')}; "
            "get https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extract it (it unpacks to "
            "cifar-100-python/) and set data.root to the folder that holds cifar-100-python"
        )
    train = _read_cifar_pickle(folder / "train", "fine_labels", 100)
    test = _read_cifar_pickle(folder / "test", "fine_labels", 100)
    return _pair("cifar100", train, test, 100, CIFAR100_STATS)


# --- image decoding ------------------------------------------------------------------------------

Prepare = Callable[[Any, Any], Any]  # (PIL image, per-file extra) -> PIL image of the final size


def _decode_images(paths: Sequence[Path], prepare: Prepare, extras: Sequence[Any] | None, channels: int,
                   size: int, num_workers: int | None) -> np.ndarray:
    """Decode ``paths`` in a thread pool (PIL releases the GIL while decoding) into (N, C, size, size)."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[channels]
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)

    def decode(i: int) -> None:
        path = paths[i]
        try:
            with Image.open(path) as img:
                if img.format == "JPEG":  # let libjpeg downscale by 1/2..1/8 while decoding
                    img.draft(mode, (size, size))
                img = prepare(img.convert(mode), extras[i] if extras is not None else None)
                pixels = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
        if pixels.shape[:2] != (size, size):  # pragma: no cover - prepare always yields size x size
            raise ValueError(f"{path}: decoded to {pixels.shape}, expected {size}x{size}")
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + 256, len(paths))):
            decode(i)

    starts = range(0, len(paths), 256)
    workers = _workers(num_workers)
    if workers == 1 or len(starts) == 1:
        for start in starts:
            decode_chunk(start)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bdray-decode") as pool:
            for _ in pool.map(decode_chunk, starts):
                pass
    return out


def _resize_square(img: Any, size: int) -> Any:
    from PIL import Image

    return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BILINEAR)


def _resize_center_crop(img: Any, size: int) -> Any:
    """Shorter side to ``size``, then the central ``size`` x ``size`` (torchvision's Resize + CenterCrop)."""
    from PIL import Image

    w, h = img.size
    if min(w, h) != size:
        short, long = (w, h) if w <= h else (h, w)
        long = max(size, int(size * long / short))
        w, h = (size, long) if w <= h else (long, size)
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    if (w, h) == (size, size):
        return img
    left, top = round((w - size) / 2.0), round((h - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


# --- GTSRB ---------------------------------------------------------------------------------------

_GTSRB_CLASSES = 43
_GTSRB_REMEDY = (
    "get GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip from "
    "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/ and unzip them into "
    "<data.root>/gtsrb (GT-final_test.csv next to the GTSRB folder), or run "
    "torchvision.datasets.GTSRB(<data.root>, download=True) on a machine with network access, "
    "and set data.root to the folder holding gtsrb/"
)


def _read_gt_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read GTSRB annotations ({exc})") from None
    needed = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
    columns = rows[0].keys() if rows else ()
    if not rows or any(c not in columns for c in needed):
        raise ValueError(
            f"{path}: expected ';'-separated columns {';'.join(needed)}, got {';'.join(columns) or 'no rows'}"
            " (GT-final_test.test.csv has no ClassId: the labels are in GT-final_test.csv)"
        )
    return rows


def _gtsrb_entries(folder: Path, rows: list[dict[str, str]], csv_path: Path) -> tuple[list[Path], list[int],
                                                                                      list[tuple[int, ...]]]:
    paths, labels, rois = [], [], []
    for row in rows:
        try:
            label = int(row["ClassId"])
            roi = tuple(int(row[c]) for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        except (TypeError, ValueError):
            raise ValueError(f"{csv_path}: bad row {row}") from None
        if not 0 <= label < _GTSRB_CLASSES:
            raise ValueError(f"{csv_path}: ClassId {label} outside 0..{_GTSRB_CLASSES - 1}")
        paths.append(folder / row["Filename"])
        labels.append(label)
        rois.append(roi)
    return paths, labels, rois


@register_dataset("gtsrb")
def gtsrb(
    root: str | None = None,
    *,
    image_size: int = 32,
    crop_roi: bool = False,
    num_workers: int | None = None,
) -> DatasetPair:
    """GTSRB in torchvision's layout, every image resized to ``image_size`` squared (43 classes).

    ``root`` is torchvision's root (holding ``gtsrb/``) or the ``gtsrb`` folder itself (holding
    ``GTSRB/``). ``crop_roi`` crops each sign to its annotated box first; the backdoor literature
    usually resizes the whole image, hence off by default.
    """
    base = _root(root)
    candidates = [base / "gtsrb", base]
    folder = next((c for c in candidates if (c / "GTSRB" / "Training").is_dir()), None)
    if folder is None:
        raise DatasetNotFoundError(
            f"gtsrb: GTSRB/Training not found in {candidates[0]} nor {candidates[1]}; {_GTSRB_REMEDY}"
        )
    train_dir = folder / "GTSRB" / "Training"
    paths: list[Path] = []
    labels: list[int] = []
    rois: list[tuple[int, ...]] = []
    class_dirs = sorted(d for d in train_dir.iterdir() if d.is_dir() and d.name.isdigit())
    for class_dir in class_dirs:
        gt = class_dir / f"GT-{class_dir.name}.csv"
        if gt.is_file():
            p, lab, r = _gtsrb_entries(class_dir, _read_gt_csv(gt), gt)
        else:  # no annotations: the folder name is the class, and there is no box to crop
            p = sorted(class_dir.glob("*.ppm"))
            lab, r = [int(class_dir.name)] * len(p), [()] * len(p)
            if not 0 <= int(class_dir.name) < _GTSRB_CLASSES:
                raise ValueError(f"{class_dir}: class folder outside 00000..{_GTSRB_CLASSES - 1:05d}")
        paths += p
        labels += lab
        rois += r
    if not paths:
        raise DatasetNotFoundError(f"gtsrb: no class folders with .ppm images in {train_dir}; {_GTSRB_REMEDY}")

    test_dir = folder / "GTSRB" / "Final_Test" / "Images"
    gt_candidates = [folder / "GT-final_test.csv", folder / "GTSRB" / "GT-final_test.csv",
                     test_dir / "GT-final_test.csv"]
    test_gt = next((c for c in gt_candidates if c.is_file()), None)
    if not test_dir.is_dir():
        raise DatasetNotFoundError(f"gtsrb: test images folder {test_dir} not found; {_GTSRB_REMEDY}")
    if test_gt is None:
        raise DatasetNotFoundError(
            f"gtsrb: test labels GT-final_test.csv not found in {folder}, {folder / 'GTSRB'} nor {test_dir}; "
            + _GTSRB_REMEDY
        )
    test_paths, test_labels, test_rois = _gtsrb_entries(test_dir, _read_gt_csv(test_gt), test_gt)

    def prepare(img: Any, roi: tuple[int, ...]) -> Any:
        if crop_roi and roi:
            x1, y1, x2, y2 = roi  # inclusive pixel coordinates
            img = img.crop((x1, y1, x2 + 1, y2 + 1))
        return _resize_square(img, image_size)

    def load(p: list[Path], lab: list[int], r: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
        return _decode_images(p, prepare, r, 3, image_size, num_workers), np.asarray(lab, dtype=np.int64)

    return _pair("gtsrb", load(paths, labels, rois), load(test_paths, test_labels, test_rois),
                 _GTSRB_CLASSES, GTSRB_STATS)


# --- ImageNet-style folders ----------------------------------------------------------------------

_IMAGEFOLDER_REMEDY = (
    "lay the images out as <data.root>/train/<class>/*.jpg and <data.root>/val/<class>/*.jpg "
    "(e.g. Imagenette from https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz, "
    "Tiny-ImageNet from http://cs231n.stanford.edu/tiny-imagenet-200.zip, ImageNet from "
    "https://image-net.org with val sorted into class folders) and set data.root to that folder"
)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _take(per_class: dict[int, list[Path]], max_per_class: int | None) -> tuple[list[Path], np.ndarray]:
    paths: list[Path] = []
    labels: list[int] = []
    for label in sorted(per_class):
        files = per_class[label][:max_per_class]
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _test_split(base: Path, index: dict[str, int]) -> tuple[dict[int, list[Path]], bool]:
    """The labelled test split: ``val`` (or ``test``) as class folders or Tiny-ImageNet's annotation file."""
    unlabelled = []
    for name in ("val", "test"):
        split_dir = base / name
        if not split_dir.is_dir():
            continue
        annotations = next((a for a in (split_dir / "val_annotations.txt", split_dir / f"{name}_annotations.txt")
                            if a.is_file()), None)
        if annotations is not None:
            return _read_tiny_annotations(split_dir, annotations, index), True
        folders = [d for d in _class_folders(split_dir) if d.name != "images" or d.name in index]
        if folders:
            unknown = [d.name for d in folders if d.name not in index]
            if unknown:
                raise ValueError(
                    f"{split_dir}: class folders {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                    f"are not among the {len(index)} classes of {base / 'train'}"
                )
            return {index[d.name]: _list_images(d) for d in folders}, False
        unlabelled.append(str(split_dir))
    if unlabelled:
        raise DatasetNotFoundError(
            f"imagefolder: {' and '.join(unlabelled)} hold no class folders nor val_annotations.txt, "
            f"so their images have no labels; {_IMAGEFOLDER_REMEDY}"
        )
    raise DatasetNotFoundError(f"imagefolder: no val/ nor test/ folder in {base}; {_IMAGEFOLDER_REMEDY}")


def _read_tiny_annotations(split_dir: Path, annotations: Path, index: dict[str, int]) -> dict[int, list[Path]]:
    image_dir = split_dir / "images" if (split_dir / "images").is_dir() else split_dir
    per_class: dict[int, list[Path]] = {}
    try:
        lines = annotations.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{annotations}: cannot read ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{annotations}:{number}: expected 'filename<TAB>wnid<TAB>...', got {line!r}")
        filename, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise ValueError(f"{annotations}:{number}: class {wnid!r} is not a folder of {split_dir.parent / 'train'}")
        per_class.setdefault(index[wnid], []).append(image_dir / filename)
    return {label: sorted(files) for label, files in per_class.items()}


@register_dataset("imagefolder")
def imagefolder(
    root: str | None = None,
    *,
    image_size: int = 64,
    max_per_class: int | None = None,
    channels: int = 3,
    num_workers: int | None = None,
) -> DatasetPair:
    """ImageNet, Imagenette, Tiny-ImageNet or any ``train/<class>/`` + ``val/<class>/`` tree.

    Classes are the sorted folder names of ``train``; the test split is ``val`` (or ``test``), as
    class folders or as Tiny-ImageNet's ``val/images`` + ``val/val_annotations.txt``. Images get
    their shorter side resized to ``image_size`` and are center-cropped square. ``max_per_class``
    keeps the first files (by name) of each class in both splits.
    """
    if channels not in (1, 3):
        raise ValueError(f"imagefolder: channels must be 1 or 3, got {channels}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"imagefolder: max_per_class must be positive, got {max_per_class}")
    if root is None:
        raise DatasetNotFoundError(f"imagefolder: data.root is not set; {_IMAGEFOLDER_REMEDY}")
    base = Path(root).expanduser()
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"imagefolder: no train/ folder in {base}; {_IMAGEFOLDER_REMEDY}")
    classes = [d.name for d in _class_folders(train_dir)]
    if not classes:
        raise DatasetNotFoundError(f"imagefolder: no class folders in {train_dir}; {_IMAGEFOLDER_REMEDY}")
    index = {name: i for i, name in enumerate(classes)}
    train_paths, train_labels = _take({i: _list_images(train_dir / c) for i, c in enumerate(classes)},
                                      max_per_class)
    if not train_paths:
        raise DatasetNotFoundError(
            f"imagefolder: no {'/'.join(IMAGE_SUFFIXES)} images under {train_dir}; {_IMAGEFOLDER_REMEDY}"
        )
    per_class_test, tiny = _test_split(base, index)
    test_paths, test_labels = _take(per_class_test, max_per_class)

    def prepare(img: Any, _: Any) -> Any:
        return _resize_center_crop(img, image_size)

    stats = IMAGENET_GRAY_STATS if channels == 1 else TINY_IMAGENET_STATS if tiny else IMAGENET_STATS
    train = (_decode_images(train_paths, prepare, None, channels, image_size, num_workers), train_labels)
    test = (_decode_images(test_paths, prepare, None, channels, image_size, num_workers), test_labels)
    return _pair("imagefolder", train, test, len(classes), stats)
