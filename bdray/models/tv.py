"""torchvision architectures by name, adapted to any channel count, class count and image size.

Weights are never downloaded: models start from random initialization (a suspect model's weights
come from a checkpoint file instead).
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from bdray.models.registry import register_model


def _swap_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )


@register_model("resnet18")
def resnet18(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    del image_size
    model = tvm.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _swap_conv(model.conv1, in_channels)
    return model


@register_model("vgg16_bn")
def vgg16_bn(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    del image_size  # torchvision's VGG pools adaptively to 7x7 before the classifier
    model = tvm.vgg16_bn(weights=None, num_classes=num_classes)
    model.features[0] = _swap_conv(model.features[0], in_channels)
    return model


@register_model("mobilenet_v2")
def mobilenet_v2(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    del image_size
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0] = _swap_conv(model.features[0][0], in_channels)
    return model


@register_model("vit_b_16")
def vit_b_16(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if image_size % 16:
        raise ValueError(f"model vit_b_16 needs an image size divisible by 16, got {image_size}")
    model = tvm.vit_b_16(weights=None, num_classes=num_classes, image_size=image_size)
    model.conv_proj = _swap_conv(model.conv_proj, in_channels)
    return model
