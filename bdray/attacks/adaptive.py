"""Adap-Blend and Adap-Patch (Qi et al., "Revisiting the assumption of latent separability", ICLR 2023).

Both weaken the link between "trigger present" and "target label" during training so poisoned and
clean samples stay close in the model's latent space (which defeats latent-separation defenses):

- training images never carry the whole trigger, only a random part of it (Adap-Blend: a random
  ``mask_rate`` share of the ``pieces`` grid cells of a blend pattern; Adap-Patch: ``train_patches``
  of ``num_patches`` patches), drawn per sample from (seed, index);
- conservatism: besides the poisoned (payload) samples, ``cover_rate`` of the set are regularization
  samples that get such a partial trigger but keep their true label. The conservatism ratio is
  cover_rate / poison_rate;
- at test time the full trigger is applied (Adap-Blend also at a higher opacity).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from bdray.attacks.base import Attack, AttackConfig, register_attack
from bdray.attacks.common import SALT_COVER, SALT_TRIGGER, draw_cover, logo_pattern, sample_rngs
from bdray.attacks.patch import Blend, BlendConfig


def _choose(rngs: list[np.random.Generator], total: int, k: int) -> np.ndarray:
    """(B, total) booleans: k distinct items per sample."""
    chosen = np.zeros((len(rngs), total), dtype=bool)
    for row, rng in zip(chosen, rngs, strict=True):
        row[rng.choice(total, size=k, replace=False)] = True
    return chosen


class AdaptiveBlendConfig(BlendConfig):
    poison_rate: float = Field(0.05, ge=0, lt=1, description="AdvrBD Table I: 5%")
    cover_rate: float = Field(0.01, ge=0, lt=1, description="AdvrBD Table I: 1% regularization samples")
    alpha: float = Field(0.15, gt=0, le=1, description="training opacity (Qi et al.: 0.15)")
    test_alpha: float | None = Field(0.2, gt=0, le=1, description="test opacity (Qi et al. and AdvrBD: 0.2)")
    pieces: int = Field(16, ge=1, description="the pattern is split into a sqrt(pieces) x sqrt(pieces) grid")
    mask_rate: float = Field(0.5, gt=0, le=1, description="share of the pieces each training image gets")

    @model_validator(mode="after")
    def _square(self) -> AdaptiveBlendConfig:
        if math.isqrt(self.pieces) ** 2 != self.pieces:
            raise ValueError(f"attack.pieces must be a square number (4, 9, 16, ...), got {self.pieces}")
        return self


@register_attack("adaptive_blend")
class AdaptiveBlend(Blend):
    Config = AdaptiveBlendConfig
    config: AdaptiveBlendConfig

    def __init__(self, config: AdaptiveBlendConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        _, h, w = self.image_shape
        g = math.isqrt(config.pieces)
        rows = np.minimum(np.arange(h) * g // h, g - 1)
        cols = np.minimum(np.arange(w) * g // w, g - 1)
        self.piece_of = torch.from_numpy(rows[:, None] * g + cols[None, :])  # (H, W) piece id per pixel
        self.keep = max(1, round(config.mask_rate * config.pieces))

    def _partial(self, images: torch.Tensor, index: torch.Tensor | None, salt: int) -> torch.Tensor:
        chosen = torch.from_numpy(_choose(sample_rngs(self.config.seed, index, len(images), salt),
                                          self.config.pieces, self.keep))
        mask = chosen[:, self.piece_of][:, None].to(images)  # (B, 1, H, W)
        a = self.config.alpha * mask
        return (1 - a) * images + a * self.pattern.to(images)

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        if test:
            return super().trigger(images, test=True)
        return self._partial(images, index, SALT_TRIGGER)

    def cover_trigger(self, images: torch.Tensor, *, index: torch.Tensor | None = None) -> torch.Tensor:
        return self._partial(images, index, SALT_COVER)

    def select_cover(self, labels: np.ndarray, seed: int, poison: np.ndarray) -> np.ndarray:
        return draw_cover(labels, seed, poison, self.config.cover_rate)


class AdaptivePatchConfig(AttackConfig):
    poison_rate: float = Field(0.05, ge=0, lt=1, description="AdvrBD Table I: 5%")
    cover_rate: float = Field(0.01, ge=0, lt=1, description="AdvrBD Table I: 1% regularization samples")
    num_patches: int = Field(4, ge=1, description="AdvrBD Table I: 'Firefox x4'")
    patch_size: int = Field(4, ge=1)
    train_patches: int = Field(2, ge=1, description="patches on each training image (a random subset)")
    alpha: float = Field(1.0, gt=0, le=1, description="patch opacity on training images")
    test_alpha: float | None = Field(None, gt=0, le=1, description="patch opacity at test time (default alpha)")
    test_time_fields: ClassVar[frozenset[str]] = frozenset({"test_alpha"})

    @model_validator(mode="after")
    def _subset(self) -> AdaptivePatchConfig:
        if self.train_patches > self.num_patches:
            raise ValueError(f"attack.train_patches ({self.train_patches}) exceeds num_patches ({self.num_patches})")
        return self


@register_attack("adaptive_patch")
class AdaptivePatch(Attack):
    Config = AdaptivePatchConfig
    config: AdaptivePatchConfig

    def __init__(self, config: AdaptivePatchConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        c, h, w = self.image_shape
        k, s = config.num_patches, config.patch_size
        g = math.ceil(math.sqrt(k))
        cell_h, cell_w = h // g, w // g
        if s > min(cell_h, cell_w):
            raise ValueError(f"attack.patch_size: {k} patches of {s}x{s} do not fit a {h}x{w} image without overlap")
        # Fixed positions, one patch per cell of a g x g grid, so patches never overlap.
        rng = np.random.default_rng([config.seed, 0xADA])
        self.origins = []
        for i in range(k):
            r, q = divmod(i, g)
            self.origins.append((r * cell_h + int(rng.integers(0, cell_h - s + 1)),
                                 q * cell_w + int(rng.integers(0, cell_w - s + 1))))
        self.patches = torch.from_numpy(np.stack([logo_pattern(s, c, config.seed + i) for i in range(k)]))

    def _stamp(self, images: torch.Tensor, chosen: torch.Tensor, alpha: float) -> torch.Tensor:
        out = images.clone()
        s = self.config.patch_size
        patches = self.patches.to(images)
        for i, (top, left) in enumerate(self.origins):
            a = alpha * chosen[:, i].to(images)[:, None, None, None]  # (B, 1, 1, 1)
            window = out[..., top : top + s, left : left + s]
            out[..., top : top + s, left : left + s] = (1 - a) * window + a * patches[i]
        return out

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg = self.config
        if test:
            return self._stamp(images, torch.ones(len(images), cfg.num_patches), cfg.test_alpha or cfg.alpha)
        return self._partial(images, index, SALT_TRIGGER)

    def _partial(self, images: torch.Tensor, index: torch.Tensor | None, salt: int) -> torch.Tensor:
        rngs = sample_rngs(self.config.seed, index, len(images), salt)
        chosen = torch.from_numpy(_choose(rngs, self.config.num_patches, self.config.train_patches))
        return self._stamp(images, chosen, self.config.alpha)

    def cover_trigger(self, images: torch.Tensor, *, index: torch.Tensor | None = None) -> torch.Tensor:
        return self._partial(images, index, SALT_COVER)

    def select_cover(self, labels: np.ndarray, seed: int, poison: np.ndarray) -> np.ndarray:
        return draw_cover(labels, seed, poison, self.config.cover_rate)
