"""Label-consistent backdoor (CL; Turner, Tsipras, Madry 2019): clean-label, adversarially hardened poisons.

Target-class images are pushed away from their own class by an L2 PGD perturbation computed on a
surrogate model, so the victim cannot fit them from their content and learns the trigger instead;
then the BadNet patch is stamped at the four corners (BaDExpert A.3). The surrogate is the attack's
trained part: ``fit`` trains a compact CNN for ``surrogate_epochs`` on the attacker's clean data.
Test inputs get the four patches only.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch.nn import functional as F

from bdray.attacks.base import Attack, CleanLabelConfig, register_attack
from bdray.attacks.common import per_sample, prefixed, require_fitted, torch_seed, unprefixed
from bdray.data.base import ImageSet


class CLConfig(CleanLabelConfig):
    poison_rate: float = Field(0.003, ge=0, lt=1, description="BaDExpert A.3: 0.3%")
    eps: float = Field(600 / 255, gt=0, description="L2 bound of the perturbation in [0, 1] units (A.3: 600 of 255)")
    pgd_steps: int = Field(10, ge=1)
    patch_size: int = Field(3, ge=1, description="the BadNet 3x3 checkerboard, once per corner")
    margin: int = Field(1, ge=0)
    surrogate_epochs: int = Field(2, ge=1, description="epochs of the attacker's own surrogate model")
    surrogate_width: int = Field(16, ge=1, description="compact_cnn width of the surrogate")
    fit_samples: int = Field(20000, ge=1, description="at most this many clean images train the surrogate")


@register_attack("cl")
class CL(Attack):
    Config = CLConfig
    config: CLConfig
    clean_label = True
    needs_fit = True

    def __init__(self, config: CLConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        c, h, w = self.image_shape
        s, m = config.patch_size, config.margin
        if 2 * (s + m) > min(h, w):
            raise ValueError(f"attack.patch_size: four {s}x{s} corner patches do not fit a {h}x{w} image")
        checker = torch.from_numpy((np.indices((s, s)).sum(0) % 2 == 0).astype(np.float32))
        self.patch = checker.expand(c, s, s).clone()
        self.corners = [(m, m), (m, w - s - m), (h - s - m, m), (h - s - m, w - s - m)]
        self.surrogate = self._build_surrogate(config.seed)
        self.fitted = False

    def _build_surrogate(self, seed: int) -> torch.nn.Module:
        from bdray.models import get_model

        c, h, _ = self.image_shape
        with torch_seed(seed):
            return get_model("compact_cnn", in_channels=c, num_classes=self.num_classes, image_size=h,
                             width=self.config.surrogate_width).eval()

    # -- the trained part -----------------------------------------------------------------------
    def fit(self, clean: ImageSet, *, seed: int) -> CL:
        from bdray.train import TrainRecipe, fit

        take = np.random.default_rng(seed).permutation(len(clean))[: self.config.fit_samples]
        recipe = TrainRecipe(epochs=self.config.surrogate_epochs, batch_size=128, lr=0.05, schedule="cosine")
        self.surrogate = self._build_surrogate(seed)
        fit(self.surrogate, clean.subset(np.sort(take)), recipe, seed=seed)
        self.surrogate.eval()
        self.fitted = True
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return prefixed("surrogate", self.surrogate)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> CL:
        self.surrogate.load_state_dict(unprefixed("surrogate", state))
        self.surrogate.eval()
        self.fitted = True
        return self

    # -- the kernel -----------------------------------------------------------------------------
    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        s = self.config.patch_size
        patch = self.patch.to(images)
        for top, left in self.corners:
            out[..., top : top + s, left : left + s] = patch
        return out

    def _pgd(self, x: torch.Tensor) -> torch.Tensor:
        """L2 PGD on one (1, C, H, W) image, away from the target class; steps of 2.5 eps / steps."""
        model = self.surrogate.to(x.device)
        target = torch.full((len(x),), self.config.target, device=x.device)
        eps = self.config.eps
        step = 2.5 * eps / self.config.pgd_steps
        x0 = x.float()
        delta = torch.zeros_like(x0)
        with torch.enable_grad():
            for _ in range(self.config.pgd_steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(x0 + delta), target)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta = delta + step * grad / grad.norm().clamp_min(1e-12)
                    delta = delta * (eps / delta.norm().clamp_min(eps))  # project onto the L2 ball
                    delta = (x0 + delta).clamp(0, 1) - x0
        return (x0 + delta).to(x.dtype)

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        if test:
            return self._stamp(images)
        require_fitted(self.fitted, self.name)
        return self._stamp(per_sample(self._pgd, images))
