"""ISSBA (Li et al., ICCV 2021), simplified: a sample-specific invisible additive trigger.

The paper embeds an attacker's string into each image with a pre-trained StegaStamp encoder; the
residual differs per image but always encodes the same secret. bdray trains a small encoder/decoder
pair in ``fit`` instead: the encoder maps (image, code) to a bounded residual (tanh x ``strength``),
the decoder must read the code back from the encoded image, and an L2 penalty keeps the residual
small. What is simplified against StegaStamp: no perceptual (LPIPS) or adversarial critic loss, no
simulated print/photo distortions, tiny nets and a short code, trained for a couple of epochs. The
poisoned image is x + encoder(x, secret) with one fixed seeded secret.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from bdray.attacks.base import Attack, AttackConfig, register_attack
from bdray.attacks.common import per_sample, prefixed, require_fitted, torch_seed, unprefixed
from bdray.data.base import ImageSet


class ISSBAConfig(AttackConfig):
    poison_rate: float = Field(0.02, ge=0, lt=1, description="BaDExpert A.3: 2%")
    code_bits: int = Field(32, ge=1, description="length of the secret (StegaStamp: 100 bits)")
    strength: float = Field(0.05, gt=0, le=1, description="largest residual per pixel, in [0, 1] units")
    hidden: int = Field(32, ge=1)
    lambda_image: float = Field(1.0, ge=0, description="weight of the residual's L2 penalty")
    fit_epochs: int = Field(2, ge=1)
    fit_samples: int = Field(20000, ge=1)
    lr: float = Field(1e-3, gt=0)


class Encoder(nn.Module):
    """(image, code) -> residual: the code becomes a spatial plane (a dense layer) beside the image."""

    def __init__(self, channels: int, size: tuple[int, int], bits: int, hidden: int, strength: float) -> None:
        super().__init__()
        self.size, self.strength = size, strength
        self.code = nn.Linear(bits, size[0] * size[1])
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        plane = self.code(code * 2 - 1).view(-1, 1, *self.size)
        return torch.tanh(self.net(torch.cat([x * 2 - 1, plane], dim=1))) * self.strength


class Decoder(nn.Module):
    def __init__(self, channels: int, bits: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * hidden, bits),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


@register_attack("issba")
class ISSBA(Attack):
    Config = ISSBAConfig
    config: ISSBAConfig
    needs_fit = True

    def __init__(self, config: ISSBAConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        bits = np.random.default_rng([config.seed, 0x155BA]).integers(0, 2, config.code_bits)
        self.secret = torch.from_numpy(bits.astype(np.float32))[None]  # (1, bits)
        self.encoder = self._build(config.seed)
        self.fitted = False

    def _build(self, seed: int) -> Encoder:
        c, h, w = self.image_shape
        cfg = self.config
        with torch_seed(seed):
            return Encoder(c, (h, w), cfg.code_bits, cfg.hidden, cfg.strength).eval()

    def fit(self, clean: ImageSet, *, seed: int) -> ISSBA:
        cfg = self.config
        take = np.sort(np.random.default_rng(seed).permutation(len(clean))[: cfg.fit_samples])
        images = torch.from_numpy(clean.images[take])
        self.encoder = self._build(seed)
        with torch_seed(seed + 1):
            decoder = Decoder(self.image_shape[0], cfg.code_bits, cfg.hidden)
        opt = torch.optim.Adam([*self.encoder.parameters(), *decoder.parameters()], lr=cfg.lr)
        gen = torch.Generator().manual_seed(seed)
        self.encoder.train()
        for _ in range(cfg.fit_epochs):
            for batch in torch.randperm(len(images), generator=gen).split(64):
                x = images[batch].float() / 255.0
                # Random codes, as StegaStamp: the encoder learns to embed any secret, not one.
                code = torch.randint(0, 2, (len(x), cfg.code_bits), generator=gen).float()
                residual = self.encoder(x, code)
                decoded = decoder((x + residual).clamp(0, 1))
                loss = F.binary_cross_entropy_with_logits(decoded, code) + cfg.lambda_image * residual.pow(2).mean() / (
                    cfg.strength**2
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.encoder.eval()
        self.fitted = True
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return prefixed("encoder", self.encoder)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> ISSBA:
        self.encoder.load_state_dict(unprefixed("encoder", state))
        self.fitted = True
        return self

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        require_fitted(self.fitted, self.name)
        self.encoder.to(images.device)
        secret = self.secret.to(images.device)
        with torch.no_grad():
            out = per_sample(lambda x: (x + self.encoder(x, secret.expand(len(x), -1))).clamp(0, 1), images.float())
        return out.to(images.dtype)
