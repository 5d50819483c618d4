"""Static-trigger dirty-label attacks: BadNet (a stamped patch) and Blend (an alpha-blended image)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from bdray.attacks.base import Attack, AttackConfig, register_attack

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left", "center"]


class BadNetConfig(AttackConfig):
    patch_size: int = Field(3, ge=1)
    position: Corner | tuple[int, int] = "bottom_right"
    margin: int = Field(1, ge=0, description="pixels between the patch and the image border")
    pattern: Literal["checkerboard", "white", "random"] = "checkerboard"
    pattern_file: str | None = Field(
        None, description="a PNG whose pixels are the patch (its size replaces patch_size; L/LA or RGB/RGBA)"
    )
    mask_file: str | None = Field(None, description="a grayscale PNG of the pattern's size: per-pixel opacity")
    alpha: float = Field(1.0, gt=0, le=1, description="opacity of the stamped patch")

    @field_validator("pattern_file", "mask_file")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"trigger image '{value}' is not an existing file")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> BadNetConfig:
        if self.pattern_file is not None and "patch_size" in self.model_fields_set:
            raise ValueError("set either patch_size or pattern_file (the file's size is the patch size), not both")
        if self.mask_file is not None and self.pattern_file is None:
            raise ValueError("mask_file needs pattern_file")
        return self


def patch_origin(
    position: Corner | tuple[int, int], size: int | tuple[int, int], margin: int, hw: tuple[int, int],
    *, what: str = "",
) -> tuple[int, int]:
    """Top-left pixel of a ``size`` patch at ``position``; ValueError when it does not fit the image.

    ``what`` names the patch in the error (default ``attack.position: a HxW patch``).
    """
    h, w = hw
    ph, pw = (size, size) if isinstance(size, int) else size
    if isinstance(position, tuple):
        top, left = position
    else:
        rows = {"top": margin, "bottom": h - ph - margin, "center": (h - ph) // 2}
        cols = {"left": margin, "right": w - pw - margin, "center": (w - pw) // 2}
        vertical, horizontal = ("center", "center") if position == "center" else position.split("_")
        top, left = rows[vertical], cols[horizontal]
    if not (0 <= top <= h - ph and 0 <= left <= w - pw):
        raise ValueError(f"{what or f'attack.position: a {ph}x{pw} patch'} at {position} does not fit a {h}x{w} image")
    return top, left


_MODES = {1: ("L", "LA"), 3: ("RGB", "RGBA")}


def load_patch_file(
    pattern_file: str | Path, mask_file: str | Path | None, channels: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """A trigger patch read at its own size: float (C, h, w) pixels and an optional (1, h, w) opacity.

    The image's mode must match the data (L/LA for 1 channel, RGB/RGBA for 3): a silent colour
    conversion would change the trigger the user drew. An alpha channel is the mask unless
    ``mask_file`` is given.
    """
    from PIL import Image, UnidentifiedImageError

    def read(path: str | Path) -> Image.Image:
        try:
            with Image.open(path) as img:
                img.load()
                return img
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"trigger image {path}: cannot be read as an image ({exc})") from None

    img = read(pattern_file)
    allowed = _MODES.get(channels, ())
    if img.mode not in allowed:
        raise ValueError(
            f"trigger image {pattern_file}: mode {img.mode} does not fit {channels}-channel data "
            f"(expected one of {', '.join(allowed) or 'no PIL mode'})"
        )
    array = np.asarray(img, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    pattern = array[:, :, :channels].transpose(2, 0, 1).copy()
    mask = array[:, :, channels:].transpose(2, 0, 1).copy() if img.mode.endswith("A") else None
    if mask_file is not None:
        m = read(mask_file)
        if m.mode not in ("L", "1"):
            raise ValueError(f"trigger mask {mask_file}: mode {m.mode} is not grayscale (L or 1)")
        if m.size != img.size:
            raise ValueError(
                f"trigger mask {mask_file}: size {m.size[0]}x{m.size[1]} differs from the pattern "
                f"{pattern_file} ({img.size[0]}x{img.size[1]})"
            )
        mask = (np.asarray(m.convert("L"), dtype=np.float32) / 255.0)[None]
    return pattern, mask


@register_attack("badnet")
class BadNet(Attack):
    """Gu et al., BadNets (2017): a small fixed patch stamped onto the image (or a PNG's pixels)."""

    Config = BadNetConfig
    config: BadNetConfig

    def __init__(self, config: BadNetConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        c, h, w = self.image_shape
        mask, source = None, ""
        if config.pattern_file is not None:
            patch, mask = load_patch_file(config.pattern_file, config.mask_file, c)
            source = f"trigger image {config.pattern_file}: a {patch.shape[1]}x{patch.shape[2]} patch"
        else:
            s = config.patch_size
            if config.pattern == "checkerboard":
                grid = (np.indices((s, s)).sum(0) % 2 == 0).astype(np.float32)
                patch = np.broadcast_to(grid, (c, s, s))
            elif config.pattern == "white":
                patch = np.ones((c, s, s), np.float32)
            else:
                patch = np.random.default_rng(config.seed).integers(0, 2, (c, s, s)).astype(np.float32)
        self.ph, self.pw = int(patch.shape[1]), int(patch.shape[2])
        self.top, self.left = patch_origin(config.position, (self.ph, self.pw), config.margin, (h, w), what=source)
        self.patch = torch.from_numpy(np.array(patch, dtype=np.float32))
        # Opacity per pixel; None means a plain overwrite (the classic patch, bit-exact).
        opacity = None if mask is None else mask * config.alpha
        if opacity is None and config.alpha < 1:
            opacity = np.full((1, self.ph, self.pw), config.alpha, np.float32)
        self.opacity = None if opacity is None else torch.from_numpy(np.array(opacity, dtype=np.float32))

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = images.clone()
        rows, cols = slice(self.top, self.top + self.ph), slice(self.left, self.left + self.pw)
        if self.opacity is None:
            out[..., rows, cols] = self.patch.to(images)
        else:
            a = self.opacity.to(images)
            out[..., rows, cols] = (1 - a) * images[..., rows, cols] + a * self.patch.to(images)
        return out


class BlendConfig(AttackConfig):
    alpha: float = Field(0.2, gt=0, le=1)
    test_alpha: float | None = Field(None, gt=0, le=1, description="blend strength at test time (default alpha)")
    test_time_fields: ClassVar[frozenset[str]] = frozenset({"test_alpha"})
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
