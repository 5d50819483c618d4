"""ResNet-18 in its CIFAR form (3x3 stem, no max-pool), the backdoor literature's default model."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bdray.models.blocks import GlobalAvgPool, register_stages
from bdray.models.registry import register_model


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_stages(CifarResNet)
def _stages(model: nn.Module) -> list[nn.Module]:
    """stem, each residual block, pooling, head: 10 blocks for ResNet-18 (bdray.models.blocks)."""
    assert isinstance(model, CifarResNet)
    return [model.stem, *model.layers, GlobalAvgPool(), model.head]


@register_model("resnet18_cifar")
def resnet18_cifar(*, in_channels: int, num_classes: int, image_size: int, width: int = 64) -> nn.Module:
    del image_size
    return CifarResNet((2, 2, 2, 2), in_channels, num_classes, width)
