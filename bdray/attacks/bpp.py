"""BppAttack (Wang, Zhai, Ma, CVPR 2022): colour-depth squeezing with Floyd-Steinberg dithering.

The trigger is the image re-quantized to ``squeeze_num`` levels per channel, the quantization error
diffused to the neighbours (Floyd-Steinberg) so the result stays natural-looking. BppAttack also
controls training ("20% injection, 20% negative" per batch, negatives being adversarially perturbed
inputs with true labels); as a pure data-poisoning attack bdray poisons ``poison_rate`` of the set
and adds ``negative_rate`` cover samples carrying random noise of the quantization step's size with
their true labels, so the model keys on the dithered quantization, not on any small perturbation.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from bdray.attacks.base import Attack, AttackConfig, register_attack
from bdray.attacks.common import SALT_COVER, draw_cover, sample_rngs


class BppConfig(AttackConfig):
    poison_rate: float = Field(0.2, ge=0, lt=1, description="BaDExpert A.3: 20% injection ratio")
    negative_rate: float = Field(0.2, ge=0, lt=1, description="BaDExpert A.3: 20% negative ratio (cover)")
    squeeze_num: int = Field(8, ge=2, le=255, description="levels per channel (Wang et al.: 8)")
    dithering: bool = True


# Floyd-Steinberg's error weights: (row offset, column offset, weight). Bottom-left comes before
# right so that a pixel receiving both in one wavefront step gets them in raster-scan order.
_DIFFUSION = ((1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16), (0, 1, 7 / 16))


def floyd_steinberg(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantize (B, C, H, W) floats in [0, 1] to ``levels`` values with Floyd-Steinberg error diffusion.

    A pixel depends only on its left neighbour and the three above it, so all pixels with the same
    2 * row + column are independent: the scan runs as 2H + W - 2 wavefront steps instead of H * W
    pixel steps, each on every (sample, channel) at once. A batch equals one-by-one calls exactly.
    """
    b, c, h, w = images.shape
    x = images.clone().reshape(b, c, h * w)
    q = levels - 1
    rows, cols = np.divmod(np.arange(h * w), w)
    wave = 2 * rows + cols
    for t in range(int(wave.max()) + 1 if h * w else 0):
        i, j = rows[wave == t], cols[wave == t]
        flat = torch.from_numpy(i * w + j).to(x.device)
        old = x[:, :, flat]
        new = (old * q).round().clamp(0, q) / q
        x[:, :, flat] = new
        err = old - new
        for di, dj, weight in _DIFFUSION:
            ok = (i + di < h) & (j + dj >= 0) & (j + dj < w)
            if ok.any():
                target = torch.from_numpy((i[ok] + di) * w + j[ok] + dj).to(x.device)
                x[:, :, target] += err[:, :, torch.from_numpy(np.flatnonzero(ok)).to(x.device)] * weight
    return x.reshape(b, c, h, w)


@register_attack("bpp")
class Bpp(Attack):
    Config = BppConfig
    config: BppConfig

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self.config.squeeze_num - 1
        if self.config.dithering:
            return floyd_steinberg(images, self.config.squeeze_num)
        return (images * q).round() / q

    def cover_trigger(self, images: torch.Tensor, *, index: torch.Tensor | None = None) -> torch.Tensor:
        half_step = 0.5 / (self.config.squeeze_num - 1)
        rngs = sample_rngs(self.config.seed, index, len(images), SALT_COVER)
        noise = np.stack([rng.uniform(-half_step, half_step, self.image_shape) for rng in rngs])
        return (images + torch.from_numpy(noise).to(images)).clamp(0, 1)

    def select_cover(self, labels: np.ndarray, seed: int, poison: np.ndarray) -> np.ndarray:
        return draw_cover(labels, seed, poison, self.config.negative_rate)
