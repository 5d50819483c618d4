"""Poisoned sets as Parquet shards: determinism, the two modes agreeing, validation, the Ray Data stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from bdray.attacks import build_attack, poison_dataset, triggered_testset
from bdray.data import get_dataset
from bdray.data import shards as shards_module
from bdray.data.shards import (
    ShardError,
    load_attack,
    open_shards,
    read_imageset,
    write_poisoned,
    write_source,
)

SEED = 7
ATTACKS = {
    "badnet": {"name": "badnet", "poison_rate": 0.05},
    "blend": {"name": "blend", "poison_rate": 0.05, "alpha": 0.2},
    # per-sample randomness (cover warps drawn from the sample's index) and cover samples
    "wanet": {"name": "wanet", "poison_rate": 0.05, "cover_rate": 0.1},
}


@pytest.fixture(scope="module")
def pair():
    return get_dataset("synthetic", train_size=300, test_size=120, seed=1)


def attack_for(data, config: dict):
    return build_attack(config, image_shape=data.image_shape, num_classes=data.num_classes)


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_poisoned(a, b) -> None:
    np.testing.assert_array_equal(a.data.images, b.data.images)
    np.testing.assert_array_equal(a.data.labels, b.data.labels)
    np.testing.assert_array_equal(a.true_labels, b.true_labels)
    np.testing.assert_array_equal(a.poison_index, b.poison_index)
    np.testing.assert_array_equal(a.cover_index, b.cover_index)


# -- determinism and agreement -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["materialized", "planned"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, pair, mode):
    attack = attack_for(pair.train, ATTACKS["badnet"])
    first = write_poisoned(tmp_path / "a", pair.train, attack, SEED, mode=mode, rows_per_shard=128)
    again = write_poisoned(tmp_path / "b", pair.train, attack, SEED, mode=mode, rows_per_shard=128)
    other = write_poisoned(tmp_path / "c", pair.train, attack, SEED + 1, mode=mode, rows_per_shard=128)

    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert first.content_hash == again.content_hash
    assert other.content_hash != first.content_hash
    changed = {k for k, v in shard_bytes(tmp_path / "c").items() if shard_bytes(tmp_path / "a")[k] != v}
    # a new seed moves the poisoned rows: the shards (materialized) or the plan (planned) change
    assert changed & {"part-00000.parquet", "plan.parquet"}
    assert len(list((tmp_path / "a").rglob("part-*.parquet"))) == 3  # 300 rows by 128


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_materialized_and_planned_agree(tmp_path, pair, name):
    attack = attack_for(pair.train, ATTACKS[name])
    reference = poison_dataset(pair.train, attack, SEED)
    write_poisoned(tmp_path / "mat", pair.train, attack, SEED, mode="materialized", rows_per_shard=100)
    write_poisoned(tmp_path / "png", pair.train, attack, SEED, mode="materialized", format="png", rows_per_shard=64)
    # other shard boundaries than the materialized sets: per-sample randomness must not depend on them
    write_poisoned(tmp_path / "plan", pair.train, attack, SEED, mode="planned", rows_per_shard=77)
    for kind in ("mat", "png", "plan"):
        assert_same_poisoned(read_imageset(tmp_path / kind), reference)
    if name == "wanet":
        assert len(reference.cover_index) > 0


def test_planned_sets_share_one_source(tmp_path, pair):
    write_source(tmp_path / "source", pair.train, rows_per_shard=128)
    for rate in (0.02, 0.1):
        attack = attack_for(pair.train, {**ATTACKS["blend"], "poison_rate": rate})
        manifest = write_poisoned(tmp_path / f"rate{rate}", tmp_path / "source", attack, SEED, mode="planned")
        assert manifest.source_ref == {"path": "../source", "content_hash": manifest.source.content_hash}
        assert not list((tmp_path / f"rate{rate}").rglob("part-*"))  # no image written again
        assert manifest.counts["poisoned"] == round(rate * len(pair.train))
        assert_same_poisoned(read_imageset(tmp_path / f"rate{rate}"), poison_dataset(pair.train, attack, SEED))
    # a URI resolves the relative source reference in the same filesystem
    assert read_imageset(f"file://{(tmp_path / 'rate0.1').resolve()}").poison_index.size == 30


def test_jpeg_source_planned(tmp_path):
    data = get_dataset("synthetic", channels=3, image_size=32, train_size=60, test_size=10, noise=10).train
    write_source(tmp_path / "source", data, format="jpeg", rows_per_shard=25)
    decoded = read_imageset(tmp_path / "source").data
    error = np.abs(decoded.images.astype(int) - data.images).mean()
    # lossy, but each decoded image is far closer to its own original than to another one
    assert error < 0.5 * np.abs(decoded.images.astype(int) - np.roll(data.images, 1, axis=0)).mean()
    attack = attack_for(data, ATTACKS["badnet"])
    write_poisoned(tmp_path / "plan", tmp_path / "source", attack, SEED, mode="planned")
    assert_same_poisoned(read_imageset(tmp_path / "plan"), poison_dataset(decoded, attack, SEED))
    with pytest.raises(ValueError, match="format"):
        write_poisoned(tmp_path / "mat", data, attack, SEED, mode="materialized", format="jpeg")


def test_trained_attack_state_is_saved_and_reloaded(tmp_path, pair):
    config = {"name": "cl", "poison_rate": 0.02, "surrogate_epochs": 1, "fit_samples": 50, "pgd_steps": 1}
    attack = attack_for(pair.train, config)
    write_poisoned(tmp_path / "plan", pair.train, attack, SEED, mode="planned")  # fits the surrogate
    assert (tmp_path / "plan" / "attack.safetensors").is_file()
    reloaded = load_attack(tmp_path / "plan")
    assert reloaded.fitted
    # the rebuilt attack (config + saved state) poisons exactly as the one fitted in memory
    assert_same_poisoned(read_imageset(tmp_path / "plan"), poison_dataset(pair.train, attack, SEED))


# -- validation --------------------------------------------------------------------------------------


@pytest.fixture
def written(tmp_path, pair) -> Path:
    write_poisoned(tmp_path / "set", pair.train, attack_for(pair.train, ATTACKS["badnet"]), SEED, rows_per_shard=128)
    return tmp_path / "set"


def rewrite_manifest(root: Path, edit) -> None:
    raw = json.loads((root / "manifest.json").read_text())
    edit(raw)
    (root / "manifest.json").write_text(json.dumps(raw))


def test_truncated_shard(written):
    part = written / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"part-00001\.parquet: not a readable Parquet file"):
        open_shards(written)


def test_foreign_shard(written):
    pq.write_table(pa.table({"pixels": [b"x"], "y": [1]}), written / "part-00002.parquet")
    with pytest.raises(ShardError, match=r"part-00002\.parquet: columns \(pixels: binary, y: int64\), expected "
                                         r"\(image: fixed_size_binary\[784\], label: int64"):
        open_shards(written)


def test_altered_bytes_caught_by_full_verify_only(written):
    part = written / "part-00000.parquet"
    blob = bytearray(part.read_bytes())
    blob[200] ^= 0xFF  # inside the image data: the file stays valid Parquet of the same size
    part.write_bytes(bytes(blob))
    open_shards(written, verify="fast")
    with pytest.raises(ShardError, match=r"part-00000\.parquet: sha256 .* the manifest expects"):
        open_shards(written)


def test_manifest_edits(written):
    rewrite_manifest(written, lambda raw: raw["files"][0].update(sha256="0" * 64))
    with pytest.raises(ShardError, match=r"manifest\.json: content_hash does not match"):
        open_shards(written)

    def consistent_but_wrong(raw):
        raw["files"][0]["sha256"] = "0" * 64
        raw["content_hash"] = shards_module._canonical_hash({k: v for k, v in raw.items() if k != "content_hash"})

    rewrite_manifest(written, consistent_but_wrong)
    with pytest.raises(ShardError, match=r"part-00000\.parquet: sha256 .* the manifest expects 0000"):
        open_shards(written)


def test_schema_version_and_missing_manifest(written, tmp_path):
    rewrite_manifest(written, lambda raw: raw.update(schema_version=99))
    with pytest.raises(ShardError, match="schema_version 99, this bdray reads schema_version 1"):
        open_shards(written)
    with pytest.raises(ShardError, match=r"nothing/manifest\.json: not found"):
        open_shards(tmp_path / "nothing")


def test_changed_source_is_refused(tmp_path, pair):
    write_source(tmp_path / "source", pair.train)
    write_poisoned(tmp_path / "plan", tmp_path / "source", attack_for(pair.train, ATTACKS["badnet"]), SEED,
                   mode="planned")
    write_source(tmp_path / "source", pair.train.subset(np.arange(299)), overwrite=True)
    with pytest.raises(ShardError, match=r"source/manifest\.json: content_hash .* the plan in .* was made for"):
        open_shards(tmp_path / "plan")


def test_interrupted_write_leaves_nothing(tmp_path, pair, monkeypatch):
    calls = []

    def failing(images, image_format):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C mid-write
        return encode(images, image_format)

    encode = shards_module.encode_images
    monkeypatch.setattr(shards_module, "encode_images", failing)
    with pytest.raises(KeyboardInterrupt):
        write_poisoned(tmp_path / "set", pair.train, attack_for(pair.train, ATTACKS["badnet"]), SEED,
                       rows_per_shard=100)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError):
        (tmp_path / "set").mkdir()
        write_source(tmp_path / "set", pair.train)


# -- the Ray Data stream -----------------------------------------------------------------------------


def stream_rows(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


def test_row_transform_on_materialized_shards(tmp_path, pair):
    """The stream's UDF, called in-process on each materialized shard, gives the in-memory rows, in
    output blocks of at most ``block_rows``."""
    from bdray.data.stream import COLUMNS, RowTransform

    write_poisoned(tmp_path / "mat", pair.train, attack_for(pair.train, ATTACKS["wanet"]), SEED, rows_per_shard=100)
    manifest = open_shards(tmp_path / "mat")
    transform = RowTransform(manifest, COLUMNS, block_rows=32)
    got = [block for f in manifest.image_files() for block in transform(pq.read_table(f))]
    assert [len(g["label"]) for g in got] == [32, 32, 32, 4] * 3
    got = {k: np.concatenate([g[k] for g in got]) for k in COLUMNS}
    expected = read_imageset(tmp_path / "mat")
    np.testing.assert_array_equal(got["image"], expected.data.images)
    np.testing.assert_array_equal(got["label"], expected.data.labels)
    np.testing.assert_array_equal(got["true_label"], expected.true_labels)
    np.testing.assert_array_equal(got["is_poison"], expected.is_poison)
    np.testing.assert_array_equal(got["is_cover"], expected.is_cover)


@pytest.mark.slow
def test_stream_matches_memory(tmp_path, pair, ray_session, monkeypatch):
    import ray.data

    from bdray.data import stream
    from bdray.data.stream import COLUMNS, to_ray_dataset

    attack = attack_for(pair.train, ATTACKS["wanet"])
    write_poisoned(tmp_path / "plan", pair.train, attack, SEED, mode="planned", format="png", rows_per_shard=100)
    write_source(tmp_path / "test", pair.test, rows_per_shard=50)
    expected = poison_dataset(pair.train, attack, SEED)

    # the planned set: the plan and the trigger are applied in Ray tasks; read through an explicit filesystem
    ds = to_ray_dataset(str((tmp_path / "plan").resolve()), columns=COLUMNS, filesystem=pafs.LocalFileSystem())
    # the stream drops the per-operator CPU reservation on its own context only
    assert ds.context.op_resource_reservation_enabled is False
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is True
    got = stream_rows(ds)
    assert got["image"].dtype == np.uint8 and got["image"].shape == (300, 1, 28, 28)
    np.testing.assert_array_equal(got["index"], np.arange(300))
    np.testing.assert_array_equal(got["image"], expected.data.images)
    np.testing.assert_array_equal(got["label"], expected.data.labels)
    np.testing.assert_array_equal(got["true_label"], expected.true_labels)
    np.testing.assert_array_equal(got["is_poison"], expected.is_poison)
    np.testing.assert_array_equal(got["is_cover"], expected.is_cover)
    assert expected.is_cover.any()

    # Shards larger than a block: each task decodes and emits at most block_rows rows at a time (here
    # 64 rows of 784 bytes), whatever the shard size, and the rows are the same. (Ray also cuts the
    # read's blocks to the target size, so a 100-row shard may arrive as 62 + 38 rows.)
    monkeypatch.setattr(stream, "BLOCK_BYTES", 64 * 784 + 100)
    assert stream.block_rows(784) == 64
    ds = to_ray_dataset(tmp_path / "plan", columns=COLUMNS)
    sizes = [ray.get(ref).num_rows for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]
    assert max(sizes) <= 64 and sum(sizes) == 300 and len(sizes) >= 6 and ds.context.target_max_block_size == 64 * 784
    for name, column in stream_rows(ds).items():
        np.testing.assert_array_equal(column, got[name])
    monkeypatch.undo()

    # ASR rows: the test-time trigger on the clean test split, as triggered_testset builds them
    triggered, source_index = triggered_testset(pair.test, attack)
    got = stream_rows(to_ray_dataset(tmp_path / "test", test_trigger=attack, columns=("image", "label", "index")))
    np.testing.assert_array_equal(got["index"], source_index)
    np.testing.assert_array_equal(got["image"], triggered.images)
    np.testing.assert_array_equal(got["label"], triggered.labels)
