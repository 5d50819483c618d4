"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible smooth warp of the whole image, dirty label.

The warp is a fixed random k x k flow field, normalized and upsampled bicubically to the image size
and scaled by s. In "noise mode" cover samples get the warp plus a small per-sample random flow and
keep their labels, so the model must learn this exact warp rather than "any warping".
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch.nn import functional as F

from bdray.attacks.base import Attack, AttackConfig, register_attack
from bdray.attacks.common import SALT_COVER, draw_cover, sample_rngs


class WaNetConfig(AttackConfig):
    poison_rate: float = Field(0.05, ge=0, lt=1, description="BaDExpert A.3: 5%")
    cover_rate: float = Field(0.1, ge=0, lt=1, description="noise-mode cover samples (A.3: 10%)")
    k: int = Field(4, ge=2, description="control grid size (Nguyen & Tran: 4)")
    s: float = Field(0.5, gt=0, description="warping strength (Nguyen & Tran: 0.5)")
    grid_rescale: float = Field(1.0, gt=0, description="extra scale of the warp (Nguyen & Tran: 1)")


@register_attack("wanet")
class WaNet(Attack):
    Config = WaNetConfig
    config: WaNetConfig

    def __init__(self, config: WaNetConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        _, h, w = self.image_shape
        gen = torch.Generator().manual_seed(config.seed)
        flow = torch.rand(1, 2, config.k, config.k, generator=gen) * 2 - 1
        flow = flow / flow.abs().mean()
        flow = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)  # (1,H,W,2)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1)[None]  # grid_sample wants (x, y) order
        self.grid = (identity + config.s * flow / h * config.grid_rescale).clamp(-1, 1)  # (1, H, W, 2)

    def _warp(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(device=images.device, dtype=images.dtype).expand(len(images), -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._warp(images, self.grid)

    def cover_trigger(self, images: torch.Tensor, *, index: torch.Tensor | None = None) -> torch.Tensor:
        _, h, w = self.image_shape
        noise = np.stack([rng.uniform(-1, 1, (h, w, 2)) for rng in sample_rngs(self.config.seed, index, len(images),
                                                                                 SALT_COVER)])
        grid = (self.grid + torch.from_numpy(noise).float() / h).clamp(-1, 1)
        return self._warp(images, grid)

    def select_cover(self, labels: np.ndarray, seed: int, poison: np.ndarray) -> np.ndarray:
        return draw_cover(labels, seed, poison, self.config.cover_rate)
