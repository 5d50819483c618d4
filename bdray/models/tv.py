"""torchvision architectures by name, adapted to any channel count, class count and image size.

Weights are never downloaded: models start from random initialization (a suspect model's weights
come from a checkpoint file instead).
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from bdray.models.blocks import GlobalAvgPool, register_stages
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


# How each family's forward unrolls into stages (bdray.models.blocks); ViT has none (its class token
# and position embedding are added between modules), so it cannot freeze a prefix of blocks.


@register_stages(tvm.ResNet)
def _resnet_stages(model: nn.Module) -> list[nn.Module]:
    assert isinstance(model, tvm.ResNet)
    residual = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    return [model.conv1, model.bn1, model.relu, model.maxpool, *residual, model.avgpool, nn.Flatten(1), model.fc]


@register_stages(tvm.VGG)
def _vgg_stages(model: nn.Module) -> list[nn.Module]:
    assert isinstance(model, tvm.VGG)
    return [*model.features, model.avgpool, nn.Flatten(1), *model.classifier]


@register_stages(tvm.MobileNetV2)
def _mobilenet_v2_stages(model: nn.Module) -> list[nn.Module]:
    assert isinstance(model, tvm.MobileNetV2)
    return [*model.features, GlobalAvgPool(), *model.classifier]
