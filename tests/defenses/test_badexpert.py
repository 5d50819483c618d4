"""BaDExpert's score (Eq. 3) against values worked by hand, and its pickle-free artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bdray.data import get_dataset
from bdray.defenses import BaDExpert, BaDExpertConfig, eq3_score
from bdray.models import ModelSpec

# (conf_B, conf_M', gamma, expected). Eq. 3 = min(conf_M' / (gamma conf_B), (1 - conf_B) / max(gamma - conf_M', 1e-8))
HAND_WORKED = [
    (0.9, 0.1, 0.5, 0.1 / 0.45),  # backdoor-like: 0.2222 vs 0.1/0.4 = 0.25 -> 0.2222
    (0.1, 0.9, 0.5, 18.0),  # clean-like: 0.9/0.05 = 18 vs 0.9/1e-8 -> 18
    (0.0, 0.3, 0.5, 5.0),  # B gives 0: first term 0.3/1e-8, second 1/0.2 = 5
    (1.0, 0.0, 0.5, 0.0),  # the corner (1, 0) of Fig. 6 scores lowest
    (0.5, 0.5, 0.2, 5.0),  # gamma 0.2: 0.5/0.1 = 5 vs 0.5/1e-8
    (0.6, 0.2, 1.0, 0.2 / 0.6),  # gamma 1: 0.3333 vs 0.4/0.8 = 0.5
]


@pytest.mark.parametrize(("conf_b", "conf_aux", "gamma", "expected"), HAND_WORKED)
def test_eq3_matches_hand_worked_values(conf_b: float, conf_aux: float, gamma: float, expected: float) -> None:
    assert eq3_score(np.array([conf_b]), np.array([conf_aux]), gamma)[0] == pytest.approx(expected, rel=1e-9)


def test_eq3_is_vectorized_and_orders_backdoor_below_clean() -> None:
    scores = eq3_score(np.array([0.95, 0.05]), np.array([0.05, 0.95]), 0.5)
    assert scores.shape == (2,) and scores[0] < scores[1]


def test_expert_recipe_takes_eta_and_shifted_labels() -> None:
    recipe = BaDExpertConfig(name="badexpert", eta=3e-4).expert_recipe()
    assert recipe.lr == 3e-4 and recipe.label_shift == 1 and recipe.optimizer == "adam" and recipe.epochs == 1


def _fitted_detector(tmp_path: Path) -> tuple[BaDExpert, ModelSpec, np.ndarray]:
    pair = get_dataset("synthetic", num_classes=4, image_size=12, train_size=200, test_size=120)
    spec = ModelSpec(name="compact_cnn", in_channels=1, num_classes=4, image_size=12, mean=[0.5], std=[0.5],
                     kwargs={"width": 4})
    torch.manual_seed(0)
    config = BaDExpertConfig.model_validate({"name": "badexpert", "auxiliary": {"epochs": 1, "lr": 0.01}})
    detector = BaDExpert(config).fit(spec.build(), pair.train.subset(np.arange(100)), seed=0)
    detector.calibrate(pair.train.subset(np.arange(100, 200)))
    return detector, spec, pair.test.images


def test_detector_artifact_round_trip(tmp_path: Path) -> None:
    detector, spec, images = _fitted_detector(tmp_path)
    detector.save(tmp_path / "det", spec)
    loaded = BaDExpert.load(tmp_path / "det")
    assert loaded.threshold_ == detector.threshold_
    np.testing.assert_allclose(loaded.score(images), detector.score(images), rtol=1e-6)
    assert set(p.name for p in (tmp_path / "det").iterdir()) == {
        "detector.json", "model.safetensors", "expert.safetensors", "auxiliary.safetensors"}


def test_corrupted_detector_artifact_is_refused(tmp_path: Path) -> None:
    detector, spec, _ = _fitted_detector(tmp_path)
    detector.save(tmp_path / "det", spec)
    expert = tmp_path / "det" / "expert.safetensors"
    blob = bytearray(expert.read_bytes())
    blob[-1] ^= 0xFF
    expert.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="expert.safetensors: sha256 does not match"):
        BaDExpert.load(tmp_path / "det")


def test_foreign_detector_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "detector.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="expected 'bdray.badexpert'"):
        BaDExpert.load(tmp_path)


def test_reject_needs_calibration() -> None:
    with pytest.raises(RuntimeError, match="calibrate"):
        BaDExpert(BaDExpertConfig(name="badexpert")).reject(np.zeros((1, 1, 4, 4), np.uint8))
