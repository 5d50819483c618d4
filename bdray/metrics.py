"""Metrics shared by every defense: computed here once, never re-derived per defense.

Definitions follow BaDExpert (Sec. 4): CA counts clean inputs predicted correctly *and* accepted,
ASR counts triggered inputs sent to the target *and* accepted, AUROC is measured over clean inputs
the model gets right plus triggered inputs that reach the target.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def accuracy(pred: np.ndarray, labels: np.ndarray, accepted: np.ndarray | None = None) -> float:
    """Fraction of samples predicted as ``labels`` (and accepted, when a detector is in front)."""
    hit = pred == labels
    if accepted is not None:
        hit &= accepted
    return float(hit.mean()) if len(hit) else float("nan")


clean_accuracy = accuracy
attack_success_rate = accuracy  # over triggered inputs, with ``labels`` = the attacker's targets


def calibrate_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold rejecting at most ``fpr`` of ``clean_scores`` (reject when score > threshold)."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    if len(clean_scores) == 0:
        raise ValueError("cannot calibrate a threshold on an empty clean set")
    return float(np.quantile(clean_scores, 1 - fpr, method="higher"))


def detection_population(
    clean_pred: np.ndarray, clean_labels: np.ndarray, bd_pred: np.ndarray, bd_targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the AUROC population: clean inputs M gets right, triggered inputs M sends to target."""
    return clean_pred == clean_labels, bd_pred == bd_targets


def auroc(clean_scores: np.ndarray, bd_scores: np.ndarray) -> float:
    """AUROC with triggered inputs as positives; scores are 'higher = more suspicious'."""
    if len(clean_scores) == 0 or len(bd_scores) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(clean_scores)), np.ones(len(bd_scores))]
    return float(roc_auc_score(y, np.r_[clean_scores, bd_scores]))


def roc(clean_scores: np.ndarray, bd_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.r_[np.zeros(len(clean_scores)), np.ones(len(bd_scores))]
    return roc_curve(y, np.r_[clean_scores, bd_scores])


def tpr_at_fpr(clean_scores: np.ndarray, bd_scores: np.ndarray, fpr: float = 0.01) -> float:
    """Best true-positive rate whose false-positive rate does not exceed ``fpr`` on the ROC curve."""
    if len(clean_scores) == 0 or len(bd_scores) == 0:
        return float("nan")
    fprs, tprs, _ = roc(clean_scores, bd_scores)
    return float(tprs[fprs <= fpr + 1e-12].max())


def detection_metrics(
    clean_scores: np.ndarray, bd_scores: np.ndarray, clean_pred: np.ndarray, clean_labels: np.ndarray,
    bd_pred: np.ndarray, bd_targets: np.ndarray, threshold: float, fpr: float = 0.01,
) -> dict[str, float]:
    """Everything a detector in front of M is judged by: its scores on the clean evaluation inputs and
    on the triggered test inputs, M's predictions on both, and the calibrated threshold."""
    clean_ok, bd_ok = detection_population(clean_pred, clean_labels, bd_pred, bd_targets)
    return {
        "auroc": auroc(clean_scores[clean_ok], bd_scores[bd_ok]),
        "tpr_at_fpr": tpr_at_fpr(clean_scores[clean_ok], bd_scores[bd_ok], fpr),
        "fpr": float((clean_scores > threshold).mean()) if len(clean_scores) else float("nan"),
        "defended_ca": accuracy(clean_pred, clean_labels, clean_scores <= threshold),
        "defended_asr": accuracy(bd_pred, bd_targets, bd_scores <= threshold),
    }


def gaussian_noise_copy(images: np.ndarray, sigma: float = 0.05, seed: int = 0) -> np.ndarray:
    """The paper's noisy augmentation: uint8 images plus N(0, sigma) noise in [0, 1] units, clamped."""
    rng = np.random.default_rng(seed)
    noisy = images.astype(np.float32) / 255.0 + rng.normal(0, sigma, images.shape).astype(np.float32)
    return (np.clip(noisy, 0, 1) * 255.0).round().astype(np.uint8)
