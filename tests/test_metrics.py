"""bdray.metrics on hand-made arrays whose answers are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from bdray.metrics import (
    accuracy,
    attack_success_rate,
    auroc,
    calibrate_threshold,
    clean_accuracy,
    detection_population,
    gaussian_noise_copy,
    roc,
    tpr_at_fpr,
)

# -- accuracy (CA / ASR) ----------------------------------------------------------------------------


def test_accuracy_without_detector() -> None:
    pred = np.array([0, 1, 2, 3, 4])
    labels = np.array([0, 1, 9, 3, 9])
    # hits at positions 0, 1, 3 -> 3 / 5
    assert accuracy(pred, labels) == pytest.approx(0.6)


def test_accuracy_with_accepted_mask_counts_over_all_inputs() -> None:
    pred = np.array([0, 1, 2, 3, 4])
    labels = np.array([0, 1, 9, 3, 9])
    accepted = np.array([True, False, True, True, True])
    # BaDExpert CA: correct AND accepted, divided by ALL inputs (not by the accepted ones):
    # correct = {0, 1, 3}, accepted = {0, 2, 3, 4} -> both = {0, 3} -> 2 / 5 = 0.4
    # (dividing by the 4 accepted inputs would give 0.5: that is the wrong definition)
    assert accuracy(pred, labels, accepted) == pytest.approx(0.4)
    # nothing accepted -> nothing counts
    assert accuracy(pred, labels, np.zeros(5, bool)) == 0.0
    # everything accepted -> plain accuracy
    assert accuracy(pred, labels, np.ones(5, bool)) == pytest.approx(0.6)
    # the mask is not modified
    assert accepted.tolist() == [True, False, True, True, True]


def test_attack_success_rate_is_accuracy_against_targets() -> None:
    # triggered inputs; the attacker's target is class 7 for all of them
    bd_pred = np.array([7, 7, 7, 2])
    targets = np.full(4, 7)
    rejected = np.array([False, True, False, False])
    # reaching the target: {0, 1, 2}; accepted: {0, 2, 3} -> both {0, 2} -> ASR 2 / 4 = 0.5
    assert attack_success_rate(bd_pred, targets, ~rejected) == pytest.approx(0.5)
    assert attack_success_rate(bd_pred, targets) == pytest.approx(0.75)
    assert clean_accuracy is accuracy


def test_accuracy_empty_is_nan() -> None:
    assert np.isnan(accuracy(np.array([], int), np.array([], int)))


# -- threshold calibration --------------------------------------------------------------------------


def test_calibrate_threshold_one_percent_of_1_to_100() -> None:
    scores = np.arange(1, 101, dtype=float)  # 1, 2, ..., 100
    t = calibrate_threshold(scores, 0.01)
    # reject when score > t; at most 1% of 100 = 1 clean input may be rejected
    rejected = int((scores > t).sum())
    assert rejected <= 1
    # and the threshold is one of the scores near the top (99 rejects exactly one, 100 rejects none)
    assert t in (99.0, 100.0)


@pytest.mark.parametrize("fpr", [0.05, 0.1, 0.2, 0.5])
def test_calibrate_threshold_rejects_at_most_fpr(fpr: float) -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    t = calibrate_threshold(scores, fpr)
    assert (scores > t).mean() <= fpr
    # ... while not being absurdly conservative: a slightly lower cut would reject more than allowed
    assert (scores >= t).mean() > fpr - 2 / len(scores)


def test_calibrate_threshold_with_ties() -> None:
    # 10 scores: eight 0s, two 5s. At fpr 0.1 at most one may be rejected; a cut between 0 and 5
    # would reject two, so the threshold must be 5 (rejecting none).
    scores = np.array([0.0] * 8 + [5.0] * 2)
    t = calibrate_threshold(scores, 0.1)
    assert t == 5.0 and (scores > t).sum() == 0
    # at fpr 0.2 rejecting both 5s is allowed
    t = calibrate_threshold(scores, 0.2)
    assert (scores > t).sum() <= 2


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5])
def test_calibrate_threshold_rejects_fpr_outside_open_interval(fpr: float) -> None:
    with pytest.raises(ValueError, match="fpr"):
        calibrate_threshold(np.arange(10.0), fpr)


def test_calibrate_threshold_empty_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        calibrate_threshold(np.array([]), 0.05)


# -- AUROC and TPR at FPR ---------------------------------------------------------------------------


def test_auroc_perfectly_separated() -> None:
    # every triggered score is above every clean score -> AUROC 1
    assert auroc(np.array([0.1, 0.2, 0.3]), np.array([0.7, 0.8])) == 1.0


def test_auroc_perfectly_inverted() -> None:
    # every triggered score is below every clean score -> AUROC 0
    assert auroc(np.array([0.7, 0.8]), np.array([0.1, 0.2, 0.3])) == 0.0


def test_auroc_all_tied() -> None:
    # one score for everything: each (clean, triggered) pair is a tie worth 1/2 -> 0.5
    assert auroc(np.full(4, 0.3), np.full(3, 0.3)) == 0.5


def test_auroc_hand_counted() -> None:
    # clean {1, 3}, triggered {2, 4}: pairs (bd > clean) are (2>1), (4>1), (4>3); (2<3) fails
    # -> 3 of 4 pairs -> 0.75
    assert auroc(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == pytest.approx(0.75)
    # a tie counts one half: clean {1, 2}, triggered {2, 3} -> (2>1)=1, (2=2)=.5, (3>1)=1, (3>2)=1 -> 3.5/4
    assert auroc(np.array([1.0, 2.0]), np.array([2.0, 3.0])) == pytest.approx(0.875)


def test_auroc_empty_is_nan() -> None:
    assert np.isnan(auroc(np.array([]), np.array([1.0])))
    assert np.isnan(auroc(np.array([1.0]), np.array([])))


def test_tpr_at_fpr_hand_built() -> None:
    clean = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    bd = np.array([0.05, 0.5, 0.6, 0.95])
    # cut above 0.9 (no clean rejected, FPR 0): only 0.95 caught -> TPR 1/4
    assert tpr_at_fpr(clean, bd, fpr=0.0) == pytest.approx(0.25)
    assert tpr_at_fpr(clean, bd, fpr=0.19) == pytest.approx(0.25)
    # cut at 0.5 (clean 0.9 rejected, FPR 1/5 = 0.2): 0.5, 0.6, 0.95 caught -> TPR 3/4
    assert tpr_at_fpr(clean, bd, fpr=0.2) == pytest.approx(0.75)
    assert tpr_at_fpr(clean, bd, fpr=0.79) == pytest.approx(0.75)
    # FPR 0.8 (cut at 0.2, 4 clean rejected): still the same 3 -> 3/4; only FPR 1 reaches 0.05
    assert tpr_at_fpr(clean, bd, fpr=0.8) == pytest.approx(0.75)
    assert tpr_at_fpr(clean, bd, fpr=1.0) == pytest.approx(1.0)


def test_tpr_at_fpr_separated_and_empty() -> None:
    assert tpr_at_fpr(np.arange(100.0), np.arange(100.0) + 1000, fpr=0.01) == 1.0
    assert np.isnan(tpr_at_fpr(np.array([]), np.array([1.0])))


def test_roc_endpoints() -> None:
    fprs, tprs, _ = roc(np.array([0.1, 0.4]), np.array([0.35, 0.8]))
    assert fprs[0] == 0 and tprs[0] == 0 and fprs[-1] == 1 and tprs[-1] == 1
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(tprs) >= 0)


# -- the AUROC population ---------------------------------------------------------------------------


def test_detection_population() -> None:
    clean_pred, clean_labels = np.array([0, 1, 2, 3]), np.array([0, 1, 0, 3])
    bd_pred, bd_targets = np.array([5, 5, 1]), np.array([5, 5, 5])
    clean_mask, bd_mask = detection_population(clean_pred, clean_labels, bd_pred, bd_targets)
    # clean inputs the model gets right: 0, 1, 3; triggered inputs reaching the target: 0, 1
    assert clean_mask.tolist() == [True, True, False, True]
    assert bd_mask.tolist() == [True, True, False]
    assert clean_mask.dtype == bool and bd_mask.dtype == bool


# -- noisy copies -----------------------------------------------------------------------------------


def test_gaussian_noise_copy_sigma_zero_is_identity() -> None:
    images = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)  # every uint8 value once
    out = gaussian_noise_copy(images, sigma=0.0)
    assert out.dtype == np.uint8 and np.array_equal(out, images)


def test_gaussian_noise_copy_seeded_and_clamped() -> None:
    images = np.array([0, 255, 128, 1, 254] * 20, dtype=np.uint8).reshape(4, 1, 5, 5)
    before = images.copy()
    a = gaussian_noise_copy(images, sigma=0.5, seed=7)
    b = gaussian_noise_copy(images, sigma=0.5, seed=7)
    c = gaussian_noise_copy(images, sigma=0.5, seed=8)
    assert np.array_equal(images, before)  # input untouched
    assert a.dtype == np.uint8 and a.shape == images.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # sigma 0.5 in [0, 1] units is huge: many values saturate at 0 and 255 rather than wrapping
    assert (a == 0).any() and (a == 255).any()
    noisy = images.astype(np.float32) / 255 + np.random.default_rng(7).normal(0, 0.5, images.shape).astype(np.float32)
    assert np.array_equal(a, (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8))


def test_gaussian_noise_copy_small_sigma_stays_close() -> None:
    images = np.full((2, 3, 16, 16), 100, np.uint8)
    out = gaussian_noise_copy(images, sigma=0.01, seed=0)
    diff = out.astype(int) - 100
    # sigma 0.01 * 255 = 2.55 grey levels: mean near 0, spread near 2.55, nothing crazy
    assert abs(diff.mean()) < 0.5 and 2.0 < diff.std() < 3.1 and np.abs(diff).max() < 15
