"""Trojan (Liu et al., NDSS 2018): a fixed watermark-shaped multi-pixel patch, dirty label.

The paper's trigger is a downloadable 8x8 image; bdray generates a watermark of the same size from
the seed instead (a ring with a centre dot, high-contrast pixels), so nothing is fetched.
"""

from __future__ import annotations

import torch
from pydantic import Field

from bdray.attacks.base import Attack, AttackConfig, register_attack
from bdray.attacks.common import logo_pattern, watermark_mask
from bdray.attacks.patch import Corner, patch_origin


class TrojanConfig(AttackConfig):
    poison_rate: float = Field(0.003, ge=0, lt=1, description="BaDExpert A.3: 0.3%")
    patch_size: int = Field(8, ge=3, description="BaDExpert A.3: the 8x8 TrojanNN patch")
    position: Corner | tuple[int, int] = "bottom_right"
    margin: int = Field(1, ge=0)


class MaskedPatch(Attack):
    """A (pattern, mask) pair stamped at one place: out = (1 - m) x + m p. Shared by Trojan and TrojanNN."""

    config: TrojanConfig

    def __init__(self, config: TrojanConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        c, h, w = self.image_shape
        s = config.patch_size
        self.top, self.left = patch_origin(config.position, s, config.margin, (h, w))
        self.mask = torch.from_numpy(watermark_mask(s))[None]  # (1, s, s)
        self.pattern = torch.from_numpy(logo_pattern(s, c, config.seed))  # (C, s, s)

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = images.clone()
        s = self.config.patch_size
        rows, cols = slice(self.top, self.top + s), slice(self.left, self.left + s)
        m = self.mask.to(images)
        out[..., rows, cols] = (1 - m) * images[..., rows, cols] + m * self.pattern.to(images)
        return out

    def full_mask(self) -> torch.Tensor:
        """The mask placed in a (1, H, W) canvas: where the trigger may change pixels."""
        _, h, w = self.image_shape
        s = self.config.patch_size
        canvas = torch.zeros(1, h, w)
        canvas[:, self.top : self.top + s, self.left : self.left + s] = self.mask
        return canvas


@register_attack("trojan")
class Trojan(MaskedPatch):
    """Liu et al. (2018)'s trigger used as a plain data-poisoning patch (BaDExpert's 'Trojan')."""

    Config = TrojanConfig

