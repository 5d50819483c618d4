"""Baseline input detectors of BaDExpert's Table 2: STRIP, SCALE-UP, AC and Frequency.

Each is a :class:`~bdray.defenses.base.Detector`: ``fit`` sees the suspect model and the defender's
small clean set, ``score(images)`` is higher for more suspicious inputs, and every random choice is
drawn once in ``fit`` from its seed, so a fitted detector scores the same inputs the same way every
time. Defaults are the source papers' (see docs/defenses.md for what is simplified).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from bdray.data.base import ImageSet
from bdray.defenses.base import DefenseConfig, Detector, register_defense
from bdray.defenses.layers import as_float, batched_logits, penultimate_features


def _require_fit(attr: object, cls: str) -> None:
    if attr is None:
        raise RuntimeError(f"{cls}.score needs fit() first")


# -- STRIP ----------------------------------------------------------------------------------------


class STRIPConfig(DefenseConfig):
    n: int = Field(100, ge=1, description="superimpositions per input (clean images drawn from the defender's set)")
    input_weight: float = Field(1.0, gt=0, description="weight of the input in the superimposed image")
    overlay_weight: float = Field(1.0, gt=0, description="weight of the clean overlay (STRIP adds the two, clipped)")
    batch_size: int = Field(2000, ge=1, description="superimposed images per forward pass")


@register_defense("strip")
class STRIP(Detector):
    """Gao et al., ACSAC 2019: a trigger keeps dominating the prediction when clean images are
    superimposed on the input, so the predictions' entropy stays low. Score = -mean entropy."""

    Config = STRIPConfig
    config: STRIPConfig

    def __init__(self, config: STRIPConfig) -> None:
        super().__init__(config)
        self.model_: nn.Module | None = None
        self.overlays_: torch.Tensor | None = None

    def fit(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> STRIP:
        if len(clean) < self.config.n:
            raise ValueError(f"strip.n = {self.config.n} needs at least that many clean images, got {len(clean)}")
        # One overlay set for every input (drawn once): scores are deterministic and batchable.
        pick = np.sort(np.random.default_rng(seed).choice(len(clean), self.config.n, replace=False))
        self.model_ = model.eval()
        self.overlays_ = as_float(clean.images[pick])  # (N, C, H, W)
        return self

    @torch.no_grad()
    def entropy(self, images: np.ndarray) -> np.ndarray:
        """Mean prediction entropy (bits) of each input over its N superimposed copies."""
        _require_fit(self.model_, "STRIP")
        x = as_float(images)
        cfg, n = self.config, self.config.n
        per_chunk = max(1, cfg.batch_size // n)
        out = []
        for s in range(0, len(x), per_chunk):
            chunk = x[s : s + per_chunk]
            mixed = (cfg.input_weight * chunk[:, None] + cfg.overlay_weight * self.overlays_[None]).clamp_(0, 1)
            logp = F.log_softmax(batched_logits(self.model_, mixed.flatten(0, 1), cfg.batch_size), dim=1)
            ent = -(logp.exp() * logp).sum(1) / math.log(2)  # (B * N,)
            out.append(ent.view(len(chunk), n).mean(1))
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def score(self, images: np.ndarray) -> np.ndarray:
        return -self.entropy(images)


# -- SCALE-UP -------------------------------------------------------------------------------------


class ScaleUpConfig(DefenseConfig):
    scales: tuple[float, ...] = Field((3.0, 5.0, 7.0, 9.0, 11.0), description="pixel-value amplification factors")
    use_clean_stats: bool = Field(
        False, description="standardize SPC by its mean/std on clean inputs of the predicted class (data-limited mode)"
    )
    batch_size: int = Field(2000, ge=1)

    @field_validator("scales")
    @classmethod
    def _scales(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("needs at least one scale")
        if any(s <= 1 for s in value):
            raise ValueError(f"scales must be > 1 (amplification), got {value}")
        return value


@register_defense("scale_up")
class ScaleUp(Detector):
    """Guo et al., ICLR 2023: triggered inputs keep their prediction when pixel values are amplified
    (x -> clip(s x)); the score is the scaled prediction consistency (SPC), the fraction of scales at
    which the prediction equals the original one."""

    Config = ScaleUpConfig
    config: ScaleUpConfig

    def __init__(self, config: ScaleUpConfig) -> None:
        super().__init__(config)
        self.model_: nn.Module | None = None
        self.class_mean_: np.ndarray | None = None
        self.class_std_: np.ndarray | None = None

    def fit(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> ScaleUp:
        del seed  # deterministic
        self.model_ = model.eval()
        if self.config.use_clean_stats:
            spc, pred = self.consistency(clean.images)
            mean = np.full(clean.num_classes, spc.mean())
            std = np.full(clean.num_classes, spc.std())
            for c in np.unique(pred):
                mean[c], std[c] = spc[pred == c].mean(), spc[pred == c].std()
            self.class_mean_, self.class_std_ = mean, np.maximum(std, 1e-3)
        return self

    @torch.no_grad()
    def consistency(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(SPC in [0, 1], original prediction) per input."""
        _require_fit(self.model_, "ScaleUp")
        x = as_float(images)
        scales = self.config.scales
        per_chunk = max(1, self.config.batch_size // (len(scales) + 1))
        spc, preds = [], []
        for s in range(0, len(x), per_chunk):
            chunk = x[s : s + per_chunk]
            stacked = torch.cat([chunk] + [(chunk * k).clamp_(0, 1) for k in scales])  # ((S + 1) B, C, H, W)
            pred = batched_logits(self.model_, stacked, self.config.batch_size).argmax(1).view(len(scales) + 1, -1)
            spc.append((pred[1:] == pred[:1]).float().mean(0))
            preds.append(pred[0])
        if not spc:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return torch.cat(spc).numpy(), torch.cat(preds).numpy()

    def score(self, images: np.ndarray) -> np.ndarray:
        spc, pred = self.consistency(images)
        if self.class_mean_ is None:
            return spc
        return (spc - self.class_mean_[pred]) / self.class_std_[pred]


# -- Activation Clustering ------------------------------------------------------------------------


class ACConfig(DefenseConfig):
    reduction: Literal["ica", "pca"] = Field("ica", description="dimension reduction before clustering (AC: ICA)")
    n_components: int = Field(10, ge=1, description="dimensions kept (AC: 10)")
    suspect: Literal["fewer_reference", "smaller"] = Field(
        "fewer_reference",
        description="which of a class's two clusters is suspect: the one holding the smaller share of the "
        "defender's clean reference images, or AC's original rule, the smaller cluster",
    )
    min_class_size: int = Field(10, ge=4, description="classes with fewer members are not clustered (score 0)")
    silhouette_sample: int = Field(2000, ge=10, description="points used to estimate a class's silhouette score")


@dataclass(frozen=True)
class ACResult:
    """What clustering a batch found: per-input scores and per-class silhouettes."""

    scores: np.ndarray  # (N,) silhouette of the input's class x its pull toward the suspect cluster
    pred: np.ndarray  # (N,) the model's prediction (AC clusters per predicted class)
    in_suspect: np.ndarray  # (N,) bool, the input landed in its class's suspect cluster
    silhouette: np.ndarray  # (K,) per class; 0 for classes too small to cluster
    flagged_class: int  # the class with the highest silhouette


@register_defense("ac")
class ActivationClustering(Detector):
    """Chen et al., 2018 (AC), repurposed as an input detector as in BaDExpert (App. A.4).

    Per predicted class, penultimate activations are reduced (ICA) and split by 2-means; a class
    whose split is clean-cut (high silhouette) holds a backdoor. AC is transductive: it clusters the
    batch passed to ``score`` together with the defender's clean reference images, so an input's
    score depends on the rest of its batch (score a whole evaluation set at once, as the paper does).
    """

    Config = ACConfig
    config: ACConfig

    def __init__(self, config: ACConfig) -> None:
        super().__init__(config)
        self.model_: nn.Module | None = None
        self.reference_features_: np.ndarray | None = None
        self.reference_pred_: np.ndarray | None = None
        self.num_classes_: int = 0
        self.seed_: int = 0

    def fit(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> ActivationClustering:
        self.model_ = model.eval()
        feats, logits = penultimate_features(model, clean.images)
        self.reference_features_, self.reference_pred_ = feats, logits.argmax(1)
        self.num_classes_ = int(logits.shape[1])
        self.seed_ = seed
        return self

    def cluster(self, images: np.ndarray) -> ACResult:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA, FastICA
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.metrics import silhouette_score

        _require_fit(self.model_, "ActivationClustering")
        cfg = self.config
        if len(images) == 0:
            empty = np.zeros(0)
            return ACResult(empty, empty.astype(np.int64), empty.astype(bool), np.zeros(self.num_classes_), 0)
        feats, logits = penultimate_features(self.model_, images)
        pred = logits.argmax(1)
        all_feats = np.concatenate([self.reference_features_, feats])
        all_pred = np.concatenate([self.reference_pred_, pred])
        is_ref = np.r_[np.ones(len(self.reference_pred_), bool), np.zeros(len(pred), bool)]
        n_ref = len(self.reference_pred_)

        scores = np.zeros(len(pred))
        in_suspect = np.zeros(len(pred), bool)
        silhouette = np.zeros(self.num_classes_)
        for c in range(self.num_classes_):
            members = np.flatnonzero(all_pred == c)
            if len(members) < cfg.min_class_size:
                continue
            x = all_feats[members].astype(np.float64)
            k = min(cfg.n_components, x.shape[1], len(members) - 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                if cfg.reduction == "ica":
                    reducer = FastICA(k, whiten="unit-variance", random_state=self.seed_, max_iter=400)
                else:
                    reducer = PCA(k, random_state=self.seed_)
                z = reducer.fit_transform(x - x.mean(0))
            km = KMeans(2, n_init=10, random_state=self.seed_).fit(z)
            labels = km.labels_
            if len(np.unique(labels)) < 2:
                continue
            silhouette[c] = silhouette_score(
                z, labels, sample_size=min(len(z), cfg.silhouette_sample), random_state=self.seed_
            )
            if cfg.suspect == "smaller":
                suspect = int(np.bincount(labels, minlength=2).argmin())
            else:
                ref = is_ref[members]
                share = [ref[labels == j].mean() for j in (0, 1)]
                suspect = int(np.argmin(share))
            # Pull toward the suspect centroid in [-1, 1]: ranks inputs within a class, and the
            # silhouette factor ranks classes, so one threshold serves every class.
            d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)  # (M, 2)
            pull = (d[:, 1 - suspect] - d[:, suspect]) / (d.sum(1) + 1e-12)
            query = members >= n_ref
            scores[members[query] - n_ref] = silhouette[c] * pull[query]
            in_suspect[members[query] - n_ref] = labels[query] == suspect
        return ACResult(scores, pred, in_suspect, silhouette, int(silhouette.argmax()))

    def score(self, images: np.ndarray) -> np.ndarray:
        return self.cluster(images).scores


# -- Frequency ------------------------------------------------------------------------------------


class FrequencyConfig(DefenseConfig):
    epochs: int = Field(10, ge=1, description="training epochs of the DCT-domain classifier")
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    width: int = Field(16, ge=1, description="channels of the classifier's first convolution")
    patch_fraction: float = Field(
        0.5, ge=0, le=1, description="share of synthetic triggers that are patches (the rest are blends)"
    )
    max_patch: float = Field(0.25, gt=0, le=1, description="largest patch side, as a fraction of the image side")
    blend_alpha: tuple[float, float] = Field((0.05, 0.3), description="range of the blend strength")

    @field_validator("blend_alpha")
    @classmethod
    def _alpha(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"blend_alpha must be (low, high) with 0 < low <= high <= 1, got {value}")
        return value


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): the transform of a length-n signal v is D @ v."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT over the last two dims of (B, C, H, W); RGB goes to YCbCr first (as the paper)."""
    if x.shape[1] == 3:
        ycbcr = torch.tensor(
            [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=x.dtype
        )
        x = torch.einsum("oc,bchw->bohw", ycbcr.to(x.device), x)
    dh, dw = dct_matrix(x.shape[-2]).to(x), dct_matrix(x.shape[-1]).to(x)
    return dh @ x @ dw.T


def synthetic_triggers(x: torch.Tensor, cfg: FrequencyConfig, generator: torch.Generator) -> torch.Tensor:
    """Random stand-ins for unknown triggers, one per image: a random patch or a random blend."""
    b, c, h, w = x.shape
    is_patch = torch.rand(b, generator=generator) < cfg.patch_fraction
    # Patches: random side, position and content (binary or uniform noise), drawn per image.
    side_max = max(2, round(cfg.max_patch * min(h, w)))
    side = torch.randint(1, side_max + 1, (b,), generator=generator)
    top = (torch.rand(b, generator=generator) * (h - side + 1)).long()
    left = (torch.rand(b, generator=generator) * (w - side + 1)).long()
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + side)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + side)[:, None, None]))  # (B, H, W)
    content = torch.rand(b, c, h, w, generator=generator)
    binary = torch.rand(b, 1, 1, 1, generator=generator) < 0.5
    content = torch.where(binary, content.round(), content)
    patched = torch.where(inside[:, None], content, x)
    # Blends: smooth or white noise pattern, random strength.
    coarse = torch.rand(b, c, max(1, h // 4), max(1, w // 4), generator=generator)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    white = torch.rand(b, c, h, w, generator=generator)
    pattern = torch.where(torch.rand(b, 1, 1, 1, generator=generator) < 0.5, smooth, white)
    lo, hi = cfg.blend_alpha
    alpha = lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=generator)
    blended = (1 - alpha) * x + alpha * pattern
    return torch.where(is_patch[:, None, None, None], patched, blended).clamp(0, 1)


class _FrequencyNet(nn.Module):
    """Two conv blocks then a linear layer on the flattened map: DCT coefficients are position-coded
    (a coefficient's place is its frequency), so the head keeps positions instead of pooling them away."""

    def __init__(self, channels: int, size: tuple[int, int], width: int) -> None:
        super().__init__()
        pooled = (max(1, size[0] // 4), max(1, size[1] // 4))
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(pooled),
        )
        self.head = nn.Linear(2 * width * pooled[0] * pooled[1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register_defense("frequency")
class Frequency(Detector):
    """Zeng et al., ICCV 2021: triggers leave high-frequency artifacts, so a small classifier on the
    images' DCT separates triggered from clean inputs. The defender does not know the trigger: the
    classifier is trained in ``fit`` on the clean set against random synthetic triggers of the same
    images (patches and blends). Score = logit(triggered) - logit(clean). The suspect model is not used.
    """

    Config = FrequencyConfig
    config: FrequencyConfig

    def __init__(self, config: FrequencyConfig) -> None:
        super().__init__(config)
        self.net_: nn.Module | None = None
        self.mean_: torch.Tensor | None = None
        self.std_: torch.Tensor | None = None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        # Signed log keeps the DC term (~H) and the small high-frequency terms on comparable scales.
        z = dct2(x)
        return torch.sign(z) * torch.log1p(z.abs() * 255.0)

    def fit(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> Frequency:
        del model  # input-only detector
        cfg = self.config
        device = torch.device("cpu")
        gen = torch.Generator().manual_seed(seed)
        x = as_float(clean.images)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _FrequencyNet(x.shape[1], tuple(x.shape[-2:]), cfg.width).to(device)
        feats0 = self._features(torch.cat([x, synthetic_triggers(x, cfg, gen)]))
        self.mean_, self.std_ = feats0.mean(0, keepdim=True), feats0.std(0, keepdim=True).clamp_min(1e-3)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        n = len(x)
        labels = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        net.train()
        for _ in range(cfg.epochs):
            # Fresh triggers every epoch: the classifier must learn "has an artifact", not these artifacts.
            inputs = (self._features(torch.cat([x, synthetic_triggers(x, cfg, gen)])) - self.mean_) / self.std_
            order = torch.randperm(2 * n, generator=gen)
            for s in range(0, 2 * n, cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                if len(idx) < 2:
                    continue
                loss = F.cross_entropy(net(inputs[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.net_ = net.eval()
        return self

    @torch.no_grad()
    def score(self, images: np.ndarray) -> np.ndarray:
        _require_fit(self.net_, "Frequency")
        x = as_float(images)
        out = []
        for s in range(0, len(x), 2000):
            logits = self.net_((self._features(x[s : s + 2000]) - self.mean_) / self.std_)
            out.append(logits[:, 1] - logits[:, 0])
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


__all__ = [
    "STRIP",
    "ACConfig",
    "ACResult",
    "ActivationClustering",
    "Frequency",
    "FrequencyConfig",
    "STRIPConfig",
    "ScaleUp",
    "ScaleUpConfig",
    "dct2",
    "dct_matrix",
    "synthetic_triggers",
]
