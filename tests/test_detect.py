"""The deployable filter: the detector's own verdicts from one shared pass, a verified artifact, clear
input errors, and shard sets split into accepted and rejected rows on Ray Data."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bdray.attacks import build_attack
from bdray.data import get_dataset
from bdray.data.shards import decode_images, write_poisoned, write_source
from bdray.defenses import BaDExpert, BaDExpertConfig
from bdray.defenses import badexpert as badexpert_module
from bdray.defenses.badexpert import artifact_content_hash
from bdray.detect import Filter, FilterResult, filter_shards
from bdray.models import ModelSpec
from bdray.models.blocks import split_model
from bdray.train import predict_proba

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 12, 12)
SPEC = ModelSpec(name="compact_cnn", in_channels=1, num_classes=4, image_size=12, mean=[0.5], std=[0.5],
                 kwargs={"width": 4})


@pytest.fixture(scope="module")
def pair():
    return get_dataset("synthetic", num_classes=4, image_size=12, train_size=64, test_size=48, seed=3)


@pytest.fixture(scope="module")
def detector(pair) -> BaDExpert:
    """Three differently initialized tiny CNNs; the threshold at the median score splits the test images."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(SPEC.build().eval())
    det = BaDExpert(BaDExpertConfig(name="badexpert")).set_models(*models)
    det.threshold_ = float(np.median(det.score(pair.test.images)))
    return det


@pytest.fixture
def saved(tmp_path: Path, detector: BaDExpert) -> Path:
    return detector.save(tmp_path / "detector", SPEC, {"attack": "badnet"})


# -- the filter equals the detector ------------------------------------------------------------------


def test_filter_gives_the_detectors_labels_scores_and_verdicts(saved: Path, detector: BaDExpert, pair) -> None:
    result = Filter.load(saved)(pair.test.images)
    assert isinstance(result, FilterResult) and len(result) == len(pair.test)
    expected = detector.confidences(pair.test.images)
    np.testing.assert_array_equal(result.labels, expected["pred"])
    np.testing.assert_allclose(result.score, detector.score(pair.test.images), rtol=1e-6)
    np.testing.assert_array_equal(result.reject, detector.reject(pair.test.images))
    assert 0 < result.reject.sum() < len(pair.test)  # both verdicts occur, so the check means something
    np.testing.assert_array_equal(result.accept, ~result.reject)


def test_one_pass_equals_each_model_on_its_own(saved: Path, detector: BaDExpert, pair) -> None:
    images = pair.test.images
    filt = Filter.load(saved, batch_size=7)  # chunks that do not divide the batch
    probs = filt.probabilities(images)
    assert probs.shape == (3, len(images), 4)
    for got, model in zip(probs, (detector.model_, detector.expert_, detector.auxiliary_), strict=True):
        np.testing.assert_allclose(got, predict_proba(model, images), rtol=1e-5, atol=1e-7)
    whole = Filter.load(saved)(images)
    chunked = filt(images)
    np.testing.assert_array_equal(chunked.labels, whole.labels)
    np.testing.assert_allclose(chunked.score, whole.score, rtol=1e-6)


def test_uint8_and_float_inputs_agree(saved: Path, pair) -> None:
    filt = Filter.load(saved)
    as_uint8 = filt(pair.test.images)
    as_float = filt(torch.from_numpy(pair.test.images).float() / 255)
    np.testing.assert_array_equal(as_float.labels, as_uint8.labels)
    np.testing.assert_allclose(as_float.score, as_uint8.score, rtol=1e-6)
    read_only = pair.test.images.copy()
    read_only.flags.writeable = False  # as Ray hands batches over
    np.testing.assert_array_equal(filt(read_only).score, as_uint8.score)


def test_an_empty_batch_gives_an_empty_result(saved: Path) -> None:
    result = Filter.load(saved)(np.zeros((0, *SHAPE), np.uint8))
    assert len(result) == 0 and result.reject.dtype == bool and result.labels.dtype == np.int64


# -- the artifact's integrity ------------------------------------------------------------------------


def test_saved_artifact_records_its_content_hash(saved: Path, detector: BaDExpert) -> None:
    meta = json.loads((saved / "detector.json").read_text())
    assert meta["version"] == 2 and meta["content_hash"] == artifact_content_hash(meta)
    assert Filter.load(saved).content_hash == meta["content_hash"]
    assert sorted(p.name for p in saved.parent.iterdir()) == ["detector"]  # no temporary siblings left


def test_a_tampered_weight_file_is_refused(saved: Path) -> None:
    expert = saved / "expert.safetensors"
    blob = bytearray(expert.read_bytes())
    blob[-1] ^= 0xFF
    expert.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"expert\.safetensors: sha256 does not match detector\.json"):
        Filter.load(saved)


def test_an_edited_threshold_is_refused(saved: Path) -> None:
    meta = json.loads((saved / "detector.json").read_text())
    meta["threshold"] = 1e9  # would accept everything
    (saved / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"detector\.json: content_hash does not match"):
        Filter.load(saved)


def test_a_version_1_artifact_loads_with_a_warning_a_version_2_one_needs_its_hash(saved: Path, pair) -> None:
    meta = json.loads((saved / "detector.json").read_text())
    expected = Filter.load(saved)(pair.test.images)
    del meta["content_hash"]
    (saved / "detector.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.warns(UserWarning, match="version-1 detector without content_hash"):
        old = Filter.load(saved)
    np.testing.assert_array_equal(old(pair.test.images).reject, expected.reject)
    (saved / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 2 needs a content_hash"):
        Filter.load(saved)


def test_saving_again_replaces_the_directory_and_a_failed_save_keeps_the_old_one(
        saved: Path, detector: BaDExpert, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    (saved / "stale.txt").write_text("from an earlier save")
    detector.save(saved, SPEC, {"attack": "badnet"})
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before

    calls = []

    def failing_save(model, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(model, path)

    original = badexpert_module.save_weights
    monkeypatch.setattr(badexpert_module, "save_weights", failing_save)
    with pytest.raises(OSError, match="disk full"):
        detector.save(saved, SPEC)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["detector"]


# -- experts that share a frozen prefix with M (defense.trainable_blocks) ----------------------------


def _shared_prefix_detector(pair, k: int) -> BaDExpert:
    """M and two models equal to it but for their last ``k`` blocks, as training with ``k`` leaves them."""
    torch.manual_seed(0)
    model = SPEC.build().eval()
    others = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        other = SPEC.build().eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in split_model(other, k)[1].parameters():
                p.add_(0.3 * torch.randn_like(p))
        others.append(other)
    det = BaDExpert(BaDExpertConfig(name="badexpert", trainable_blocks=k)).set_models(model, *others)
    det.threshold_ = float(np.median(det.score(pair.test.images)))
    return det


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_shared_prefix_pass_equals_three_full_passes(tmp_path: Path, pair, k: int) -> None:
    det = _shared_prefix_detector(pair, k)
    shared = Filter.load(det.save(tmp_path / "det", SPEC), batch_size=7)
    assert shared.shared_blocks == 4 - k
    full = Filter(det.model_, det.expert_, det.auxiliary_, gamma=det.config.gamma, threshold=det.threshold_,
                  image_shape=SHAPE, device="cpu")
    assert full.shared_blocks == 0
    images = pair.test.images
    np.testing.assert_allclose(shared.probabilities(images), full.probabilities(images), rtol=1e-5, atol=1e-7)
    got, want = shared(images), full(images)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
    np.testing.assert_allclose(got.score, det.score(images), rtol=1e-5)
    assert 0 < got.reject.sum() < len(images)


def test_experts_whose_prefix_differs_from_m_get_three_full_passes(tmp_path: Path, detector: BaDExpert,
                                                                   pair) -> None:
    # The config claims a shared prefix, but the fixture's three models were initialized apart.
    claimed = BaDExpert(BaDExpertConfig(name="badexpert", trainable_blocks=2)).set_models(
        detector.model_, detector.expert_, detector.auxiliary_)
    claimed.threshold_ = detector.threshold_
    with pytest.warns(UserWarning, match="first blocks of M, B and M' are not identical"):
        screen = Filter.load(claimed.save(tmp_path / "det", SPEC))
    assert screen.shared_blocks == 0
    np.testing.assert_allclose(screen(pair.test.images).score, detector.score(pair.test.images), rtol=1e-6)


def test_k_equal_to_every_block_shares_nothing_and_does_not_warn(pair, recwarn) -> None:
    det = _shared_prefix_detector(pair, 4)
    screen = Filter.from_detector(det, SPEC, device="cpu")
    assert screen.shared_blocks == 0 and not recwarn.list
    np.testing.assert_allclose(screen(pair.test.images).score, det.score(pair.test.images), rtol=1e-6)


# -- input validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(("images", "message"), [
    (np.zeros((2, 3, 12, 12), np.uint8), r"expected shape \(N, 1, 12, 12\) for this detector, got \(2, 3, 12, 12\)"),
    (np.zeros((2, 1, 28, 28), np.uint8), r"expected shape \(N, 1, 12, 12\).*got \(2, 1, 28, 28\)"),
    (np.zeros((2, 12, 12, 1), np.uint8), r"got \(2, 12, 12, 1\); these look channels-last"),
    (np.zeros((1, 12, 12), np.uint8), r"got \(1, 12, 12\); a single image needs a batch axis"),
    (np.zeros((2, 1, 12, 12), np.int64), r"expected dtype uint8 \(0\.\.255\) or float \(0\.\.1\), got int64"),
    (torch.zeros((2, 1, 12, 12), dtype=torch.int32), r"got int32"),
    (np.zeros((2, 1, 12, 12), bool), r"got bool"),
    (np.full((2, 1, 12, 12), 255.0, np.float32), r"float pixels must lie in \[0, 1\].*max 255.*as uint8"),
    (np.full((2, 1, 12, 12), -0.5, np.float64), r"\[0, 1\].*min -0\.5"),
    (np.full((2, 1, 12, 12), np.nan, np.float32), r"NaN/inf"),
])
def test_bad_inputs_say_what_was_expected_and_what_came(saved: Path, images, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Filter.load(saved)(images)


def test_a_non_array_is_a_type_error(saved: Path) -> None:
    with pytest.raises(TypeError, match="expected a numpy array or torch tensor"):
        Filter.load(saved)([[0] * 12] * 12)


def test_an_uncalibrated_detector_cannot_be_deployed(tmp_path: Path, detector: BaDExpert) -> None:
    raw = BaDExpert(detector.config).set_models(detector.model_, detector.expert_, detector.auxiliary_)
    raw.save(tmp_path / "raw", SPEC)
    with pytest.raises(ValueError, match="threshold is null; calibrate the detector"):
        Filter.load(tmp_path / "raw")


# -- shard sets on Ray Data --------------------------------------------------------------------------


def _read_side(out: Path, side: str) -> dict[str, np.ndarray]:
    table = pq.read_table(out / side)
    columns = {n: table.column(n).to_numpy() for n in table.column_names if n != "image"}
    columns["image"] = decode_images(table.column("image"), "raw", SHAPE)
    return columns


def test_shape_mismatch_and_existing_output_fail_before_any_work(tmp_path: Path, saved: Path) -> None:
    other = get_dataset("synthetic", num_classes=4, image_size=16, train_size=8, test_size=8, seed=1)
    write_source(tmp_path / "big", other.test)
    with pytest.raises(ValueError, match=r"images are \[1, 16, 16\] \(C, H, W\), the detector .* takes \[1, 12, 12\]"):
        filter_shards(tmp_path / "big", tmp_path / "out", saved)
    (tmp_path / "exists").mkdir()
    write_source(tmp_path / "small", get_dataset("synthetic", num_classes=4, image_size=12, train_size=8,
                                                 test_size=8, seed=1).test)
    with pytest.raises(FileExistsError, match="exists"):
        filter_shards(tmp_path / "small", tmp_path / "exists", saved)


def test_job_reports_a_bad_detector_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))  # as `python jobs/filter.py` finds _common
    spec = importlib.util.spec_from_file_location("bdray_job_filter", ROOT / "jobs" / "filter.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    code = job.main(["--detector", str(tmp_path / "nothing"), "--input", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "detector.json not found" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_has_a_filter_verb() -> None:
    from bdray.cli import build_parser

    args = build_parser().parse_args(["filter", "--detector", "d", "--input", "i", "--out", "o", "--actors", "2"])
    assert (args.detector, args.input, args.out, args.actors, args.gpu) == ("d", "i", "o", 2, False)


@pytest.mark.slow
def test_filter_shards_splits_rows_by_the_filters_verdict(tmp_path: Path, saved: Path, pair, ray_session) -> None:
    attack = build_attack({"name": "badnet", "poison_rate": 0.1}, image_shape=SHAPE, num_classes=4)
    shards = tmp_path / "incoming"
    write_poisoned(shards, pair.test, attack, seed=1, rows_per_shard=20)  # 48 rows in 3 shards
    from bdray.data.shards import read_imageset

    incoming = read_imageset(shards)
    expected = Filter.load(saved)(incoming.data.images)
    assert 0 < expected.reject.sum() < len(expected)

    summary = filter_shards(shards, tmp_path / "out", saved, batch_size=16, rows_per_shard=10)
    out = tmp_path / "out"
    assert json.loads((out / "filter.json").read_text()) == summary
    assert summary["counts"] == {"rows": 48, "accepted": int((~expected.reject).sum()),
                                 "rejected": int(expected.reject.sum())}
    assert summary["detector"]["content_hash"] == json.loads((saved / "detector.json").read_text())["content_hash"]
    for side, files in summary["files"].items():
        assert all(f["rows"] <= 10 for f in files) and sum(f["rows"] for f in files) == summary["counts"][side]

    for side, wanted in (("accepted", ~expected.reject), ("rejected", expected.reject)):
        rows = _read_side(out, side)
        order = np.argsort(rows["index"])
        rows = {k: v[order] for k, v in rows.items()}
        index = np.flatnonzero(wanted)
        np.testing.assert_array_equal(rows["index"], index)
        np.testing.assert_array_equal(rows["image"], incoming.data.images[index])
        np.testing.assert_array_equal(rows["label"], incoming.data.labels[index])
        np.testing.assert_array_equal(rows["true_label"], incoming.true_labels[index])
        np.testing.assert_array_equal(rows["is_poison"], np.isin(index, incoming.poison_index))
        np.testing.assert_array_equal(rows["pred_label"], expected.labels[index])
        np.testing.assert_allclose(rows["score"], expected.score[index], rtol=1e-6)
        assert ((rows["score"] > summary["detector"]["threshold"]) == (side == "rejected")).all()
    assert sorted(os.listdir(tmp_path)) == ["detector", "incoming", "out"]  # the temporary directory is gone

    # a clean source set has no ground-truth columns to carry; replacing the output is explicit
    write_source(tmp_path / "clean", pair.test)
    with pytest.raises(FileExistsError):
        filter_shards(tmp_path / "clean", out, saved)
    summary = filter_shards(tmp_path / "clean", out, saved, overwrite=True)
    assert summary["columns"] == ["image", "label", "index", "pred_label", "score"]
    assert summary["counts"]["rows"] == 48
    shutil.rmtree(out)
