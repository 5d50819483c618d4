"""SIG (Barni, Kallas, Tondi, ICIP 2019): a horizontal sinusoid added to target-class images, clean label."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from bdray.attacks.base import Attack, CleanLabelConfig, register_attack


class SIGConfig(CleanLabelConfig):
    poison_rate: float = Field(0.02, ge=0, lt=1, description="BaDExpert A.3: 2% (AdvrBD Table I: 5%)")
    delta: float = Field(20 / 255, gt=0, le=1, description="amplitude; Barni et al.: 20 on the 0-255 scale")
    test_delta: float | None = Field(None, gt=0, le=1, description="amplitude at test time (default delta)")
    test_time_fields: ClassVar[frozenset[str]] = frozenset({"test_delta"})
    frequency: float = Field(6, gt=0, description="periods across the image width (Barni et al.: 6)")


@register_attack("sig")
class SIG(Attack):
    """x + delta * sin(2 pi j f / W) along the columns j, the same for every row and channel."""

    Config = SIGConfig
    config: SIGConfig
    clean_label = True

    def __init__(self, config: SIGConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        w = self.image_shape[2]
        j = torch.arange(w, dtype=torch.float64)
        self.signal = torch.sin(2 * math.pi * j * config.frequency / w).float()  # (W,)

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        delta = self.config.test_delta if (test and self.config.test_delta) else self.config.delta
        return (images + delta * self.signal.to(images)).clamp(0, 1)
