"""The natural-image loaders against tiny fakes written in each dataset's real on-disk format."""

from __future__ import annotations

import csv
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bdray.data import DatasetNotFoundError, get_dataset
from bdray.data.vision import safe_load_pickle

RNG = np.random.default_rng(0)


def _cifar_rows(n: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _write_cifar10_py(folder: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    written = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = _cifar_rows(per_batch)
        labels = [(i + j) % 10 for j in range(per_batch)]
        # the real batches: bytes keys, a uint8 (N, 3072) array, labels as a list of ints
        _dump(folder / name, {b"batch_label": b"fake", b"data": data, b"labels": labels,
                              b"filenames": [b"x.png"] * per_batch}, protocol=2 + i % 4)
        written[name] = (data, np.asarray(labels))
    return written


def _py2_style_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2 + numpy 1.x wrote CIFAR: str (BINSTRING) keys/pixels, numpy.core globals."""

    def s(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text if len(text) < 256 else b"T" + struct.pack("<i", len(text)) + text

    def i4(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i4(0) + b"\x85" + s(b"b") + b"\x87R"
        + b"(" + i4(1) + i4(data.shape[0]) + i4(data.shape[1]) + b"\x86"
        + b"cnumpy\ndtype\n" + s(b"u1") + i4(0) + i4(1) + b"\x87R"
        + b"(" + i4(3) + s(b"|") + b"NNN" + i4(-1) + i4(-1) + i4(0) + b"tb"
        + b"\x89" + s(data.tobytes()) + b"tb"
    )
    label_list = b"](" + b"".join(i4(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + label_list + s(b"batch_label") + s(b"x") + b"u."


def test_cifar10_python_batches_round_trip(tmp_path: Path) -> None:
    written = _write_cifar10_py(tmp_path / "cifar-10-batches-py")
    pair = get_dataset("cifar10", root=str(tmp_path))
    assert pair.train.images.shape == (20, 3, 32, 32) and pair.train.images.dtype == np.uint8
    assert pair.train.labels.dtype == np.int64 and pair.test.labels.dtype == np.int64
    assert (pair.train.num_classes, pair.train.name, pair.test.name) == (10, "cifar10/train", "cifar10/test")
    assert pair.train.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-3)
    first, test = written["data_batch_1"], written["test_batch"]
    np.testing.assert_array_equal(pair.train.images[:4], first[0].reshape(4, 3, 32, 32))
    np.testing.assert_array_equal(pair.train.labels[:4], first[1])
    np.testing.assert_array_equal(pair.test.images, test[0].reshape(4, 3, 32, 32))
    np.testing.assert_array_equal(pair.test.labels, test[1])
    # channel-major rows: the first 1024 values of a row are the red plane
    np.testing.assert_array_equal(pair.test.images[0, 0].ravel(), test[0][0, :1024])
    # root may also be the batches folder itself
    same = get_dataset("cifar10", root=str(tmp_path / "cifar-10-batches-py"))
    np.testing.assert_array_equal(same.train.images, pair.train.images)


def test_cifar10_reads_python2_numpy1_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data, labels = _cifar_rows(3), [3, 1, 4]
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(_py2_style_batch(data, labels))
    pair = get_dataset("cifar10", root=str(tmp_path))
    np.testing.assert_array_equal(pair.test.images, data.reshape(3, 3, 32, 32))
    np.testing.assert_array_equal(pair.test.labels, labels)
    assert len(pair.train) == 15


def test_cifar10_binary_version(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected = {}
    for k, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        pixels, labels = _cifar_rows(2), np.array([k, 9 - k], dtype=np.uint8)
        (folder / f"{name}.bin").write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
        expected[name] = (pixels, labels)
    pair = get_dataset("cifar10", root=str(tmp_path))
    assert pair.train.images.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(pair.train.labels, [0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    np.testing.assert_array_equal(pair.test.images, expected["test_batch"][0].reshape(2, 3, 32, 32))
    np.testing.assert_array_equal(pair.test.labels, [5, 4])


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    data = {split: _cifar_rows(5) for split in ("train", "test")}
    fine = {"train": [0, 99, 50, 7, 1], "test": [98, 2, 3, 4, 5]}
    for split in ("train", "test"):
        _dump(folder / split, {b"data": data[split], b"fine_labels": fine[split],
                               b"coarse_labels": [f % 20 for f in fine[split]], b"filenames": [b"f"] * 5})
    _dump(folder / "meta", {b"fine_label_names": [b"apple"] * 100})
    pair = get_dataset("cifar100", root=str(tmp_path))
    assert pair.train.num_classes == 100 and pair.test.name == "cifar100/test"
    np.testing.assert_array_equal(pair.train.labels, fine["train"])
    np.testing.assert_array_equal(pair.test.images, data["test"].reshape(5, 3, 32, 32))


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("cifar10", {}, ["data_batch_1", "cifar-10-batches-py", "cifar-10-python.tar.gz", "data.root"]),
        ("cifar100", {}, ["train", "cifar-100-python", "cifar-100-python.tar.gz", "data.root"]),
        ("gtsrb", {}, ["GTSRB/Training", "gtsrb", "sid.erda.dk", "data.root"]),
        ("imagefolder", {}, ["train/", "imagenette", "tiny-imagenet", "data.root"]),
    ],
)
def test_missing_dataset_says_where_it_looked(tmp_path: Path, name: str, kwargs: dict, expected: list) -> None:
    root = tmp_path / "nothing-here"
    with pytest.raises(DatasetNotFoundError) as info:
        get_dataset(name, root=str(root), **kwargs)
    message = str(info.value)
    assert str(root) in message
    for fragment in expected:
        assert fragment in message


def test_missing_batch_and_unextracted_tarball_are_named(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetNotFoundError, match="not extracted"):
        get_dataset("cifar10", root=str(tmp_path))
    _write_cifar10_py(tmp_path / "cifar-10-batches-py", per_batch=1)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3 missing from .*cifar-10-batches-py"):
        get_dataset("cifar10", root=str(tmp_path))


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",))


@pytest.mark.parametrize("payload", [_SystemPayload, _ExecPayload])
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path: Path, payload: type) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10_py(folder, per_batch=1)
    marker = tmp_path / "marker"
    # the payload hides inside an otherwise genuine-looking batch
    _dump(folder / "data_batch_2", {b"data": _cifar_rows(1), b"labels": [0], b"batch_label": payload(marker)})
    with pytest.raises(ValueError, match=r"data_batch_2.*refusing to load global") as info:
        get_dataset("cifar10", root=str(tmp_path))
    assert "system" in str(info.value) or "exec" in str(info.value)
    assert not marker.exists()


def test_exec_payload_would_run_under_plain_pickle(tmp_path: Path) -> None:
    # proves the refusal test above is meaningful: the same bytes do run code under pickle.loads
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_ExecPayload(marker)))
    assert marker.read_text() == "pwned"


def test_corrupt_and_foreign_batches_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10_py(folder, per_batch=1)
    (folder / "data_batch_4").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="data_batch_4"):
        get_dataset("cifar10", root=str(tmp_path))
    _dump(folder / "data_batch_4", [1, 2, 3])
    with pytest.raises(ValueError, match="data_batch_4: expected a dict"):
        get_dataset("cifar10", root=str(tmp_path))
    _dump(folder / "data_batch_4", {b"data": np.zeros((1, 3072), np.float32), b"labels": [0]})
    with pytest.raises(ValueError, match="data_batch_4: 'data' must be a uint8"):
        get_dataset("cifar10", root=str(tmp_path))
    _dump(folder / "data_batch_4", {b"data": _cifar_rows(1), b"labels": [10]})
    with pytest.raises(ValueError, match="data_batch_4: labels outside 0..9"):
        get_dataset("cifar10", root=str(tmp_path))
    bin_dir = tmp_path / "bin" / "cifar-10-batches-bin"
    bin_dir.mkdir(parents=True)
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        (bin_dir / f"{name}.bin").write_bytes(bytes(3073))
    (bin_dir / "data_batch_5.bin").write_bytes(bytes(3000))
    with pytest.raises(ValueError, match="data_batch_5.bin: 3000 bytes"):
        get_dataset("cifar10", root=str(tmp_path / "bin"))


def test_safe_unpickler_refuses_other_codecs_and_object_arrays(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(ValueError, match="refusing _codecs.encode"):
        safe_load_pickle(path)
    _dump(path, {"a": np.array([1, "x"], dtype=object)})
    with pytest.raises(ValueError, match="object-dtype"):
        safe_load_pickle(path)


# --- GTSRB ---------------------------------------------------------------------------------------

_GT_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]


def _solid(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def _write_gt(path: Path, rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(_GT_HEADER)
        writer.writerows(rows)


def _write_gtsrb(base: Path) -> dict[str, list]:
    """torchvision's layout under ``base``: GTSRB/Training/<class>/, GTSRB/Final_Test/Images/."""
    train_rows = []
    for cls in (0, 5, 42):
        folder = base / "GTSRB" / "Training" / f"{cls:05d}"
        folder.mkdir(parents=True)
        rows = []
        for k in range(2):
            name = f"{k:05d}_{k:05d}.ppm"
            color = (cls * 5, 10 * k, 200)
            img = _solid((40, 36), color)
            img.paste(_solid((20, 16), (255, 255, 0)), (10, 10))  # the "sign", inside the Roi
            img.save(folder / name)
            rows.append([name, 40, 36, 10, 10, 29, 25, cls])
            train_rows.append((cls, color))
        _write_gt(folder / f"GT-{cls:05d}.csv", rows)
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    test_rows = []
    for k, cls in enumerate((42, 0, 7)):
        _solid((32, 32), (k, 2 * k, 3 * k)).save(test_dir / f"{k:05d}.ppm")
        test_rows.append([f"{k:05d}.ppm", 32, 32, 5, 5, 26, 26, cls])
    _write_gt(base / "GT-final_test.csv", test_rows)
    return {"train": train_rows, "test": test_rows}


def test_gtsrb_torchvision_layout(tmp_path: Path) -> None:
    written = _write_gtsrb(tmp_path / "gtsrb")
    pair = get_dataset("gtsrb", root=str(tmp_path))
    assert pair.train.images.shape == (6, 3, 32, 32) and pair.test.images.shape == (3, 3, 32, 32)
    assert pair.train.num_classes == 43 and pair.train.name == "gtsrb/train"
    assert pair.train.labels.dtype == np.int64
    np.testing.assert_array_equal(pair.train.labels, [c for c, _ in written["train"]])
    np.testing.assert_array_equal(pair.test.labels, [42, 0, 7])
    # 32x32 test images are not resampled: exact pixels
    for k in range(3):
        assert (pair.test.images[k].reshape(3, -1).T == (k, 2 * k, 3 * k)).all()
    # train corners keep the background color after the resize
    for image, (_, color) in zip(pair.train.images, written["train"], strict=True):
        np.testing.assert_array_equal(image[:, 0, 0], color)

    # root may be the gtsrb folder itself (the one holding GTSRB/); Roi cropping leaves only the sign
    cropped = get_dataset("gtsrb", root=str(tmp_path / "gtsrb"), crop_roi=True, image_size=16)
    assert cropped.train.images.shape == (6, 3, 16, 16)
    assert (cropped.train.images.transpose(0, 2, 3, 1) == (255, 255, 0)).all()


def test_gtsrb_missing_test_labels_and_unlabelled_csv(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    (tmp_path / "GT-final_test.csv").rename(tmp_path / "elsewhere.csv")
    with pytest.raises(DatasetNotFoundError, match="GT-final_test.csv not found"):
        get_dataset("gtsrb", root=str(tmp_path))
    with open(tmp_path / "GT-final_test.csv", "w") as f:  # the test zip's label-less .test.csv
        f.write("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n00000.ppm;32;32;5;5;26;26\n")
    with pytest.raises(ValueError, match=r"GT-final_test.csv: expected .*ClassId"):
        get_dataset("gtsrb", root=str(tmp_path))


def test_gtsrb_corrupt_image_names_the_file(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "Training" / "00005" / "00001_00001.ppm").write_bytes(b"P6 not really")
    with pytest.raises(ValueError, match="00001_00001.ppm: cannot read image"):
        get_dataset("gtsrb", root=str(tmp_path))


# --- ImageNet-style folders ----------------------------------------------------------------------


def _class_color(label: int, k: int) -> tuple[int, int, int]:
    return (40 * label + 10, 7 * k, 255 - 30 * label)


def _write_imagefolder(base: Path, test_name: str = "val", classes=("n02", "n01", "n03"), per_class=3) -> None:
    for split, count in (("train", per_class), (test_name, 2)):
        for cls in classes:
            folder = base / split / cls
            folder.mkdir(parents=True)
            label = sorted(classes).index(cls)
            for k in range(count):
                suffix = (".png", ".JPEG", ".jpg")[k % 3]
                _solid((8, 8), _class_color(label, k)).save(folder / f"{cls}_{k}{suffix}", quality=95)


def test_imagefolder_class_folders(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path)
    pair = get_dataset("imagefolder", root=str(tmp_path), image_size=8, num_workers=2)
    assert pair.train.images.shape == (9, 3, 8, 8) and pair.test.images.shape == (6, 3, 8, 8)
    assert pair.train.images.dtype == np.uint8 and pair.train.labels.dtype == np.int64
    assert pair.train.num_classes == 3 and pair.test.name == "imagefolder/test"
    assert pair.train.mean == pytest.approx((0.485, 0.456, 0.406))
    # classes in sorted folder order: n01 -> 0, n02 -> 1, n03 -> 2
    np.testing.assert_array_equal(pair.train.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(pair.test.labels, [0, 0, 1, 1, 2, 2])
    for image, label, k in zip(pair.train.images, pair.train.labels, [0, 1, 2] * 3, strict=True):
        tolerance = 0 if k == 0 else 3  # png exact, jpeg near
        assert np.abs(image.reshape(3, -1).T.astype(int) - _class_color(label, k)).max() <= tolerance


def test_imagefolder_resize_crop_channels_and_limit(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    wide = np.zeros((8, 48, 3), np.uint8)
    wide[:, :16], wide[:, 16:32], wide[:, 32:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    for k in range(3):
        Image.fromarray(wide).save(folder / f"{k}.png")
    (tmp_path / "test" / "a").mkdir(parents=True)  # `test` accepted when there is no `val`
    Image.fromarray(wide[:, ::-1].copy()).save(tmp_path / "test" / "a" / "x.png")
    pair = get_dataset("imagefolder", root=str(tmp_path), image_size=4, max_per_class=2)
    assert pair.train.images.shape == (2, 3, 4, 4) and len(pair.test) == 1
    # shorter side 8 -> 4 makes it 4x24; the centre crop keeps columns 10..14, inside the green band
    assert (pair.train.images[0].reshape(3, -1).T == (0, 255, 0)).all()
    gray = get_dataset("imagefolder", root=str(tmp_path), image_size=8, channels=1)
    assert gray.train.images.shape == (3, 1, 8, 8) and gray.test.images.shape == (1, 1, 8, 8)
    assert gray.train.mean == pytest.approx((0.449,))
    assert (gray.train.images == 150).all()  # PIL's L of pure green: 0.587 * 255
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        get_dataset("imagefolder", root=str(tmp_path), channels=2)


def test_imagefolder_tiny_imagenet_layout(tmp_path: Path) -> None:
    wnids = ["n0003", "n0001"]
    for wnid in wnids:
        images = tmp_path / "train" / wnid / "images"
        images.mkdir(parents=True)
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(2):
            _solid((10, 10), _class_color(sorted(wnids).index(wnid), k)).save(images / f"{wnid}_{k}.png")
    val_images = tmp_path / "val" / "images"
    val_images.mkdir(parents=True)
    lines = []
    for k, wnid in enumerate(["n0003", "n0001", "n0003"]):
        _solid((10, 10), _class_color(sorted(wnids).index(wnid), k)).save(val_images / f"val_{k}.png")
        lines.append(f"val_{k}.png\t{wnid}\t0\t0\t9\t9")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test" / "images").mkdir(parents=True)  # Tiny's unlabelled test split is ignored
    pair = get_dataset("imagefolder", root=str(tmp_path), image_size=10)
    np.testing.assert_array_equal(pair.train.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(pair.test.labels, [0, 1, 1])  # val_1 is n0001; val_0, val_2 are n0003
    assert pair.train.mean == pytest.approx((0.4802, 0.4481, 0.3975))
    assert (pair.test.images[0].reshape(3, -1).T == _class_color(0, 1)).all()
    assert (pair.test.images[2].reshape(3, -1).T == _class_color(1, 2)).all()


def test_imagefolder_unlabelled_val_and_unknown_class(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, per_class=1)
    for path in (tmp_path / "val").rglob("*.*"):
        path.rename(tmp_path / "val" / path.name)  # raw ImageNet val: flat files, no class folders
    for folder in (tmp_path / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(DatasetNotFoundError, match="no labels"):
        get_dataset("imagefolder", root=str(tmp_path), image_size=8)
    (tmp_path / "val" / "n99").mkdir()
    _solid((8, 8), (0, 0, 0)).save(tmp_path / "val" / "n99" / "a.png")
    with pytest.raises(ValueError, match="n99"):
        get_dataset("imagefolder", root=str(tmp_path), image_size=8)
