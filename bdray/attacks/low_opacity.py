"""Low-Opacity (BaDExpert Sec. 4.4, App. C.7.2): Blend trained at alpha, triggered at a lower test_alpha.

An adaptive attacker weakens the trigger at inference time hoping to slip past detection; the
backdoor fires less often (Table 12: ASR 90.6% at alpha 0.2, 51.6% at 0.15 on CIFAR-10).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from bdray.attacks.base import register_attack
from bdray.attacks.patch import Blend, BlendConfig


class LowOpacityConfig(BlendConfig):
    poison_rate: float = Field(0.003, ge=0, lt=1, description="BaDExpert A.3 (Blend): 0.3%")
    alpha: float = Field(0.2, gt=0, le=1, description="training opacity (Blend's 20%)")
    test_alpha: float | None = Field(
        0.15, gt=0, le=1, description="test opacity; Table 5's Low-Opacity row is Table 12's 15% column"
    )

    @model_validator(mode="after")
    def _lower(self) -> LowOpacityConfig:
        if self.test_alpha is None or self.test_alpha >= self.alpha:
            raise ValueError(f"attack.test_alpha ({self.test_alpha}) must be below attack.alpha ({self.alpha})")
        return self


@register_attack("low_opacity")
class LowOpacity(Blend):
    Config = LowOpacityConfig
    config: LowOpacityConfig
