"""Figures logged with every detector run (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from bdray import metrics


def roc_figure(clean_scores: np.ndarray, bd_scores: np.ndarray, title: str = "") -> Figure:
    fpr, tpr, _ = metrics.roc(clean_scores, bd_scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics.auroc(clean_scores, bd_scores):.4f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def score_histogram(clean_scores: np.ndarray, bd_scores: np.ndarray, threshold: float | None = None) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    both = np.r_[clean_scores, bd_scores]
    lo, hi = np.quantile(both, [0.001, 0.999]) if len(both) else (0, 1)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 60)
    for scores, label in ((clean_scores, "clean"), (bd_scores, "triggered")):
        if len(scores):
            ax.hist(np.clip(scores, lo, hi), bins=bins, alpha=0.6, label=label, density=True)
    if threshold is not None:
        ax.axvline(threshold, c="k", ls="--", lw=1, label="threshold")
    ax.set(xlabel="suspicion score (higher = more suspicious)", ylabel="density")
    ax.legend()
    fig.tight_layout()
    return fig


def confidence_plane(
    clean: tuple[np.ndarray, np.ndarray], triggered: tuple[np.ndarray, np.ndarray], gamma: float
) -> Figure:
    """BaDExpert's Fig. 6: (Conf_B, Conf_M') of clean and triggered inputs, with Eq. 3's regions."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.scatter(*clean, s=3, alpha=0.4, label="clean", c="tab:blue")
    ax.scatter(*triggered, s=3, alpha=0.4, label="triggered", c="tab:red")
    ax.plot([0, 1], [0, gamma], ls="--", c="k", lw=1)
    ax.plot([1, 0], [0, gamma], ls="--", c="k", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Conf_B(y~|x)", ylabel="Conf_M'(y~|x)")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    return fig


def trigger_preview(clean: np.ndarray, triggered: np.ndarray) -> Figure:
    """Clean inputs (top row) and their triggered copies (bottom row), uint8 (N, C, H, W)."""
    n = max(1, min(len(clean), len(triggered), 8))
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3), squeeze=False)
    for row, images in enumerate((clean, triggered)):
        for i, ax in enumerate(axes[row]):
            ax.axis("off")
            if i < len(images):
                img = images[i].transpose(1, 2, 0)
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                          vmin=0, vmax=255)
    axes[0][0].set_title("clean", loc="left", fontsize=9)
    axes[1][0].set_title("triggered", loc="left", fontsize=9)
    fig.tight_layout()
    return fig
