"""Model builders by name, for any channel count, class count and image size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bdray.registry import Registry

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    return MODELS.register(name)


def list_models(include: str = "*", exclude: str | None = None) -> list[str]:
    return MODELS.names(include, exclude)


class Classifier(nn.Module):
    """A backbone behind its own input normalization.

    Keeping mean/std inside the model makes every bdray model take images in [0, 1]: triggers,
    noise and the deployed filter all work in pixel space, and a saved model carries its
    preprocessing with it.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) in [0, 1]
        return self.backbone((x - self.mean) / self.std)


def get_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> Classifier:
    """Build model ``name`` wrapped with its normalization (defaults: mean 0.5, std 0.5)."""
    builder = MODELS.get(name)
    backbone = builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
    mean = tuple(mean) if mean else (0.5,) * in_channels
    std = tuple(std) if std else (0.5,) * in_channels
    return Classifier(backbone, mean, std)


class ModelSpec(dict):
    """Everything needed to rebuild an architecture: JSON-serializable, so artifacts stay pickle-free."""

    def build(self) -> Classifier:
        spec = dict(self)
        return get_model(spec.pop("name"), **spec.pop("kwargs", {}), **spec)
