"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a generated trigger per input.

Two small conv nets map an image to its own trigger pattern p(x) and mask m(x); the poisoned image
is x + m(x) (p(x) - x). ``fit`` trains them jointly with a surrogate classifier on the attacker's
clean data, with the paper's three modes per batch (backdoor: own trigger -> target; cross: another
image's trigger -> true label; clean), its diversity loss ||x - x'|| / ||p(x) - p(x')|| (different
inputs must get different triggers) and a mask-density penalty. Simplified against the paper: no
separate mask pre-training stage, and the victim is then poisoned through data (the paper also
controls the victim's training). Cover samples, when asked for, carry a cross trigger (the
mirrored image's trigger) with their true label.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from bdray.attacks.base import Attack, AttackConfig, register_attack
from bdray.attacks.common import draw_cover, per_sample, prefixed, require_fitted, torch_seed, unprefixed
from bdray.data.base import ImageSet


class DynamicConfig(AttackConfig):
    poison_rate: float = Field(0.003, ge=0, lt=1, description="BaDExpert A.3: 0.3%")
    cover_rate: float = Field(0.0, ge=0, lt=1, description="cross-trigger cover samples (data-poisoning: none)")
    hidden: int = Field(16, ge=1, description="channels of the generator nets")
    mask_density: float = Field(0.032, gt=0, le=1, description="target mean mask value (Nguyen & Tran: 0.032)")
    lambda_div: float = Field(1.0, ge=0, description="weight of the diversity loss (paper: 1)")
    lambda_norm: float = Field(100.0, ge=0, description="weight of the mask-density penalty (paper: 100)")
    p_attack: float = Field(0.1, ge=0, le=1, description="backdoor share of each training batch (paper: 0.1)")
    p_cross: float = Field(0.1, ge=0, le=1, description="cross-trigger share of each training batch (paper: 0.1)")
    fit_epochs: int = Field(2, ge=1)
    fit_samples: int = Field(20000, ge=1)
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the generators (paper: 0.01)")


class TriggerNet(nn.Module):
    """A small encoder-decoder (one 2x downsampling, so each output sees a 10x10 neighbourhood), sigmoid out."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
        )
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1]
        h = F.interpolate(self.down(x * 2 - 1), size=x.shape[-2:], mode="nearest")
        return torch.sigmoid(self.out(h))


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).flatten(1).pow(2).mean(1) + 1e-8).sqrt()  # eps: sqrt has no gradient at 0


@register_attack("dynamic")
class Dynamic(Attack):
    Config = DynamicConfig
    config: DynamicConfig
    needs_fit = True

    def __init__(self, config: DynamicConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        self._build(config.seed)
        self.fitted = False

    def _build(self, seed: int) -> None:
        c = self.image_shape[0]
        with torch_seed(seed):
            self.pattern_net = TriggerNet(c, c, self.config.hidden).eval()
            self.mask_net = TriggerNet(c, 1, self.config.hidden).eval()

    def _poison(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """x with the trigger generated from ``source`` (x itself for the backdoor mode)."""
        m, p = self.mask_net(source), self.pattern_net(source)
        return x + m * (p - x)

    # -- the trained part -----------------------------------------------------------------------
    def fit(self, clean: ImageSet, *, seed: int) -> Dynamic:
        from bdray.models import get_model

        cfg = self.config
        c, h, _ = self.image_shape
        take = np.sort(np.random.default_rng(seed).permutation(len(clean))[: cfg.fit_samples])
        images = torch.from_numpy(clean.images[take])
        labels = torch.from_numpy(clean.labels[take])
        self._build(seed)
        with torch_seed(seed):
            classifier = get_model("compact_cnn", in_channels=c, num_classes=self.num_classes, image_size=h)
        nets = [*self.pattern_net.parameters(), *self.mask_net.parameters()]
        opt_g = torch.optim.Adam(nets, lr=cfg.lr, betas=(0.5, 0.9))
        opt_c = torch.optim.SGD(classifier.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(seed)
        self.pattern_net.train(), self.mask_net.train(), classifier.train()
        for _ in range(cfg.fit_epochs):
            order = torch.randperm(len(images), generator=gen)
            for start in range(0, len(order), 128):
                batch = order[start : start + 128]
                x, y = images[batch].float() / 255.0, labels[batch]
                other = x[torch.randperm(len(x), generator=gen)]
                nb, nc = int(cfg.p_attack * len(x)), int(cfg.p_cross * len(x))
                x_bd = self._poison(x[:nb], x[:nb])
                x_cross = self._poison(x[nb : nb + nc], other[nb : nb + nc])
                inputs = torch.cat([x_bd, x_cross, x[nb + nc :]])
                targets = torch.cat([torch.full((nb,), cfg.target), y[nb:]])
                ce = F.cross_entropy(classifier(inputs), targets)
                # Diversity: distinct inputs must get distinct patterns and masks.
                # The 0.01 floor keeps the ratio finite while two outputs still coincide early on.
                dx = _distance(x, other)
                div = (dx / (_distance(self.pattern_net(x), self.pattern_net(other)) + 0.01)).mean()
                div = div + (dx / (_distance(self.mask_net(x), self.mask_net(other)) + 0.01)).mean()
                density = F.relu(self.mask_net(x).mean() - cfg.mask_density)
                loss = ce + cfg.lambda_div * div + cfg.lambda_norm * density
                opt_g.zero_grad(set_to_none=True)
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(nets, 5.0)
                opt_g.step()
                opt_c.step()
        self.pattern_net.eval(), self.mask_net.eval()
        self.fitted = True
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**prefixed("pattern", self.pattern_net), **prefixed("mask", self.mask_net)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Dynamic:
        self.pattern_net.load_state_dict(unprefixed("pattern", state))
        self.mask_net.load_state_dict(unprefixed("mask", state))
        self.fitted = True
        return self

    # -- the kernel -----------------------------------------------------------------------------
    def _generated(self, images: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        require_fitted(self.fitted, self.name)
        self.pattern_net.to(images.device), self.mask_net.to(images.device)
        with torch.no_grad():
            both = torch.cat([images.float(), source.float()], dim=1)
            c = images.shape[1]
            out = per_sample(lambda pair: self._poison(pair[:, :c], pair[:, c:]), both)
        return out.to(images.dtype)

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._generated(images, images)

    def cover_trigger(self, images: torch.Tensor, *, index: torch.Tensor | None = None) -> torch.Tensor:
        return self._generated(images, images.flip(-1))

    def select_cover(self, labels: np.ndarray, seed: int, poison: np.ndarray) -> np.ndarray:
        return draw_cover(labels, seed, poison, self.config.cover_rate)
