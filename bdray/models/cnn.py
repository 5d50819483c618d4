"""Small CNNs sized for 28x28 / 32x32 inputs on a CPU."""

from __future__ import annotations

from torch import nn

from bdray.models.registry import register_model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register_model("compact_cnn")
def compact_cnn(*, in_channels: int, num_classes: int, image_size: int, width: int = 16) -> nn.Module:
    """Three conv+BN blocks with pooling, then a linear head: ~15 s per Fashion-MNIST epoch on 2 cores."""
    del image_size  # global pooling makes the head size-independent
    return nn.Sequential(
        _block(in_channels, width),
        nn.MaxPool2d(2),
        _block(width, 2 * width),
        nn.MaxPool2d(2),
        _block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


@register_model("mlp")
def mlp(*, in_channels: int, num_classes: int, image_size: int, hidden: int = 128) -> nn.Module:
    """No BatchNorm: the model of choice for exact DDP-vs-single-process gradient checks."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
