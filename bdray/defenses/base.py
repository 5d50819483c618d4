"""The defense interface and registry.

A detector is fitted on what the defender may see (the suspect model and a small clean set), then
``score(images)`` says how suspicious each input is (higher = more suspicious) and
``calibrate(clean, fpr)`` sets the threshold on held-out clean data. Fitted state ends in ``_``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bdray.data.base import ImageSet
from bdray.metrics import calibrate_threshold
from bdray.registry import Registry


class DefenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    target_fpr: float = Field(0.01, gt=0, lt=1, description="false-positive rate the threshold is calibrated to")


class Detector:
    """Base class of input detectors."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig

    def __init__(self, config: DefenseConfig) -> None:
        self.config = config
        self.threshold_: float | None = None

    def fit(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> Detector:
        raise NotImplementedError

    def score(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def calibrate(self, clean: ImageSet, fpr: float | None = None) -> Detector:
        self.threshold_ = calibrate_threshold(self.score(clean.images), fpr or self.config.target_fpr)
        return self

    def reject(self, images: np.ndarray) -> np.ndarray:
        if self.threshold_ is None:
            raise RuntimeError(f"{type(self).__name__}.reject needs calibrate() first")
        return self.score(images) > self.threshold_


DefenseType = type[Detector]
DEFENSES: Registry[DefenseType] = Registry("defense")


def register_defense(name: str) -> Callable[[DefenseType], DefenseType]:
    def decorator(cls: DefenseType) -> DefenseType:
        cls.name = name
        return DEFENSES.register(name)(cls)

    return decorator


def list_defenses() -> list[str]:
    return DEFENSES.names()


def defense_class(name: str) -> DefenseType:
    return DEFENSES.get(name)


def build_defense(config: DefenseConfig | dict) -> Detector:
    """A detector from its config, or from a plain dict validated into the config its name selects."""
    if isinstance(config, dict):
        config = defense_class(str(config["name"])).Config.model_validate(config)
    return defense_class(config.name)(config)
