"""PhysicalBA (Li et al., "Backdoor attack in the physical world", 2021): a patch learned under transforms.

Poisoned training images get the patch and then a random small affine transform (rotation,
translation, scale) and brightness change, drawn per sample from (seed, index), so the backdoor
survives the shifts a camera introduces. Test inputs get the plain patch. AdvrBD (Table I) uses a
Firefox-logo patch; bdray generates a seeded logo-like pattern of the same role instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field
from torch.nn import functional as F

from bdray.attacks.base import Attack, AttackConfig, register_attack
from bdray.attacks.common import SALT_TRIGGER, logo_pattern, sample_rngs
from bdray.attacks.patch import Corner, patch_origin


class PhysicalConfig(AttackConfig):
    poison_rate: float = Field(0.05, ge=0, lt=1, description="AdvrBD Table I: 5%")
    patch_size: int = Field(5, ge=1)
    position: Corner | tuple[int, int] = "bottom_right"
    margin: int = Field(1, ge=0)
    max_rotation: float = Field(10.0, ge=0, le=180, description="degrees, uniform in [-r, r]")
    max_translation: float = Field(0.05, ge=0, lt=1, description="fraction of the image size, per axis")
    scale: tuple[float, float] = Field((0.9, 1.1), description="uniform zoom range")
    brightness: float = Field(0.2, ge=0, lt=1, description="intensity factor uniform in [1 - b, 1 + b]")


@register_attack("physical")
class PhysicalBA(Attack):
    Config = PhysicalConfig
    config: PhysicalConfig

    def __init__(self, config: PhysicalConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        c, h, w = self.image_shape
        s = config.patch_size
        self.top, self.left = patch_origin(config.position, s, config.margin, (h, w))
        if not 0 < config.scale[0] <= config.scale[1]:
            raise ValueError(f"attack.scale must be (low, high) with 0 < low <= high, got {config.scale}")
        self.patch = torch.from_numpy(logo_pattern(s, c, config.seed))

    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        s = self.config.patch_size
        out[..., self.top : self.top + s, self.left : self.left + s] = self.patch.to(images)
        return out

    def _params(self, index: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (2, 3) affine matrices in grid_sample's normalized coordinates, and brightness."""
        cfg = self.config
        thetas, gains = [], []
        for rng in sample_rngs(cfg.seed, index, n, SALT_TRIGGER):
            angle = math.radians(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
            zoom = rng.uniform(*cfg.scale)
            tx, ty = rng.uniform(-cfg.max_translation, cfg.max_translation, 2) * 2  # normalized coords span 2
            cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
            thetas.append([[cos, -sin, tx], [sin, cos, ty]])
            gains.append(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
        return torch.tensor(np.array(thetas), dtype=torch.float32), torch.tensor(gains, dtype=torch.float32)

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        stamped = self._stamp(images)
        if test:
            return stamped
        thetas, gains = self._params(index, len(images))
        thetas, gains = thetas.to(images), gains.to(images)

        def transform(i: int) -> torch.Tensor:
            x = stamped[i : i + 1]
            grid = F.affine_grid(thetas[i : i + 1], list(x.shape), align_corners=False)
            return (F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * gains[i])

        # One sample at a time: each has its own transform, and a batch must equal single calls.
        out = torch.cat([transform(i) for i in range(len(images))]) if len(images) else stamped
        return out.clamp(0, 1)
