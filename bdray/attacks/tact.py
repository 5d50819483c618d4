"""TaCT (Tang et al., USENIX Security 2021): a source-specific backdoor.

Only images of the source classes are poisoned (patch + target label); images of the cover classes
get the same patch but keep their labels, so the trigger alone does not decide the prediction: the
backdoor fires only together with source-class content. The ASR set is accordingly the triggered
source-class test images (``target_labels`` leaves every other class as it is).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from bdray.attacks.base import register_attack
from bdray.attacks.common import draw_cover
from bdray.attacks.patch import BadNet, BadNetConfig


class TaCTConfig(BadNetConfig):
    mode: Literal["all_to_one"] = "all_to_one"
    poison_rate: float = Field(0.05, ge=0, lt=1, description="AdvrBD Table I: 5% (drawn from the source classes)")
    target: int = Field(1, ge=0, description="AdvrBD Table I: target 1")
    pattern: Literal["checkerboard", "white", "random"] = "white"  # AdvrBD Table I: 3x3 white square
    source_classes: tuple[int, ...] = Field((0,), min_length=1, description="AdvrBD Table I: source 0")
    cover_classes: tuple[int, ...] | None = Field(None, description="default: every class but sources and target")
    cover_rate: float = Field(0.01, ge=0, lt=1, description="AdvrBD Table I: 1%")

    @model_validator(mode="after")
    def _classes(self) -> TaCTConfig:
        if self.target in self.source_classes:
            raise ValueError(f"attack.target {self.target} cannot also be a source class")
        if self.cover_classes is not None and set(self.cover_classes) & set(self.source_classes):
            raise ValueError("attack.cover_classes must not overlap attack.source_classes")
        return self


@register_attack("tact")
class TaCT(BadNet):
    Config = TaCTConfig
    config: TaCTConfig

    def __init__(self, config: TaCTConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(config, image_shape=image_shape, num_classes=num_classes)
        listed = set(config.source_classes) | set(config.cover_classes or ())
        if max(listed) >= num_classes or min(listed) < 0:
            raise ValueError(f"attack.source_classes/cover_classes must lie in 0..{num_classes - 1}")
        self.sources = torch.tensor(sorted(config.source_classes))
        if config.cover_classes is None:
            covers = set(range(num_classes)) - set(config.source_classes) - {config.target}
        else:
            covers = set(config.cover_classes)
        self.covers = np.array(sorted(covers), dtype=np.int64)

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        is_source = torch.isin(labels, self.sources.to(labels.device))
        return torch.where(is_source, torch.full_like(labels, self.config.target), labels)

    def eligible(self, labels: np.ndarray) -> np.ndarray:
        return np.isin(labels, self.sources.numpy())

    def select_cover(self, labels: np.ndarray, seed: int, poison: np.ndarray) -> np.ndarray:
        return draw_cover(labels, seed, poison, self.config.cover_rate, allowed=np.isin(labels, self.covers))
