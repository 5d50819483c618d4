"""Static-trigger dirty-label attacks: BadNet (a stamped patch) and Blend (an alpha-blended image)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from bdray.attacks.base import Attack, AttackConfig, register_attack

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left", "center"]


class BadNetConfig(AttackConfig):
    patch_size: int = Field(3, ge=1)
    position: Corner | tuple[int, int] = "bottom_right"
    margin: int = Field(1, ge=0, description="pixels between the patch and the image border")
    pattern: Literal["checkerboard", "white", "random"] = "checkerboard"


def _patch_origin(position: Corner | tuple[int, int], size: int, margin: int, hw: tuple[int, int]) -> tuple[int, int]:
    h, w = hw
    if isinstance(position, tuple):
        return position
    top = {"top": margin, "bottom": h - size - margin, "center": (h - size) // 2}
    left = {"left": margin, "right": w - size - margin, "center": (w - size) // 2}
    if position == "center":
        return top["center"], left["center"]
    vertical, horizontal = position.split("_")
    return top[vertical], left[horizontal]


@register_attack("badnet")
class BadNet(Attack):
    """Gu et al., BadNets (2017): a small fixed patch stamped onto the image."""

    Config = BadNetConfig
    config: BadNetConfig

    def __init__(self, config: BadNetConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        c, h, w = self.image_shape
        s = config.patch_size
        self.top, self.left = _patch_origin(config.position, s, config.margin, (h, w))
        if not (0 <= self.top <= h - s and 0 <= self.left <= w - s):
            raise ValueError(f"attack.position: a {s}x{s} patch at {config.position} does not fit a {h}x{w} image")
        if config.pattern == "checkerboard":
            grid = (np.indices((s, s)).sum(0) % 2 == 0).astype(np.float32)
            patch = np.broadcast_to(grid, (c, s, s))
        elif config.pattern == "white":
            patch = np.ones((c, s, s), np.float32)
        else:
            patch = np.random.default_rng(config.seed).integers(0, 2, (c, s, s)).astype(np.float32)
        self.patch = torch.from_numpy(np.array(patch, dtype=np.float32))

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = images.clone()
        s = self.config.patch_size
        out[..., self.top : self.top + s, self.left : self.left + s] = self.patch.to(images)
        return out


class BlendConfig(AttackConfig):
    alpha: float = Field(0.2, gt=0, le=1)
    test_alpha: float | None = Field(None, gt=0, le=1, description="blend strength at test time (default alpha)")
    pattern: str = Field("noise", description="'noise' (seeded uniform noise) or a path to a PNG/JPEG image")

    @field_validator("pattern")
    @classmethod
    def _pattern_exists(cls, value: str) -> str:
        if value != "noise" and not Path(value).is_file():
            raise ValueError(f"'{value}' is neither 'noise' nor an existing image file")
        return value


def load_pattern_image(path: str | Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Read an image file as float (C, H, W) in [0, 1], resized to ``image_shape``."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = image_shape
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"trigger image {path}: cannot be read as an image ({exc})") from None
    return array[None] if c == 1 else array.transpose(2, 0, 1)


@register_attack("blend")
class Blend(Attack):
    """Chen et al. (2017): blend a fixed pattern into the whole image with strength alpha."""

    Config = BlendConfig
    config: BlendConfig

    def __init__(self, config: BlendConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        if config.pattern == "noise":
            pattern = np.random.default_rng(config.seed).uniform(0, 1, self.image_shape).astype(np.float32)
        else:
            pattern = load_pattern_image(config.pattern, self.image_shape)
        self.pattern = torch.from_numpy(pattern)

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        alpha = self.config.test_alpha if (test and self.config.test_alpha) else self.config.alpha
        return (1 - alpha) * images + alpha * self.pattern.to(images)
