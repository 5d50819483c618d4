"""Model introspection shared by the baseline defenses: features, conv/BN channels, batched forwards.

bdray's models are plain ``nn.Module`` trees (``Classifier`` around a backbone), so the baselines
find what they need by walking the modules instead of asking each architecture for hooks:

- the penultimate features are the input of the last ``nn.Linear`` (compact CNN, CIFAR ResNet,
  torchvision's ResNets and the MLP all end in one);
- a convolution's channels are pruned at the ``BatchNorm2d`` registered right after it when there
  is one (zeroing its weight *and* bias makes the channel output exactly 0 after the BN).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bdray.train.loop import to_float


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def as_float(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 or float (N, C, H, W) -> float32 in [0, 1] on ``device``."""
    return to_float(torch.as_tensor(images)).to(device)


@torch.no_grad()
def batched_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of float images in [0, 1], ``batch_size`` at a time, on the model's device (eval mode)."""
    model.eval()
    device = model_device(model)
    out = [model(x[s : s + batch_size].to(device)).float() for s in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to read penultimate features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(
    model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D), logits (N, K)): the input of the last linear layer and the model's output."""
    model.eval()
    device = model_device(model)
    x = as_float(images)
    feats: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].flatten(1).cpu()))
    try:
        logits = [model(x[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(x), batch_size)]
    finally:
        handle.remove()
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


@dataclass(frozen=True)
class ConvUnit:
    """A convolution and the BatchNorm that normalizes its output (None when it has none)."""

    name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None

    @property
    def channels(self) -> int:
        return self.conv.out_channels

    @property
    def output(self) -> nn.Module:
        """The module whose output carries the channel (the BN when there is one)."""
        return self.bn if self.bn is not None else self.conv

    @torch.no_grad()
    def zero_channels(self, index: torch.Tensor | np.ndarray) -> None:
        """Make the given output channels exactly 0 (before any following activation)."""
        index = torch.as_tensor(index, dtype=torch.long)
        if self.bn is not None:
            self.bn.weight[index] = 0
            self.bn.bias[index] = 0
        else:
            self.conv.weight[index] = 0
            if self.conv.bias is not None:
                self.conv.bias[index] = 0

    def channel_tensors(self) -> list[tuple[nn.Module, str]]:
        """The (module, parameter name) pairs whose entries define each output channel."""
        if self.bn is not None:
            return [(self.bn, "weight"), (self.bn, "bias")]
        pairs = [(self.conv, "weight")]
        return pairs + ([(self.conv, "bias")] if self.conv.bias is not None else [])


def conv_units(model: nn.Module) -> list[ConvUnit]:
    """Every Conv2d in registration order, each paired with the BatchNorm2d registered right after it.

    Registration order matches data flow in bdray's and torchvision's CNNs (conv, bn, relu; a
    residual block's shortcut conv and its BN come as a pair too), which is all this relies on.
    """
    modules = list(model.named_modules())
    units = []
    for i, (name, module) in enumerate(modules):
        if not isinstance(module, nn.Conv2d):
            continue
        nxt = modules[i + 1][1] if i + 1 < len(modules) else None
        bn = nxt if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == module.out_channels else None
        units.append(ConvUnit(name, module, bn))
    return units


def last_conv_unit(model: nn.Module, name: str | None = None) -> ConvUnit:
    units = conv_units(model)
    if not units:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer")
    if name is None:
        return units[-1]
    for unit in units:
        if unit.name == name:
            return unit
    raise ValueError(f"no Conv2d named '{name}'; convolutions: {', '.join(u.name for u in units)}")


@contextmanager
def channel_mask(unit: ConvUnit, mask: torch.Tensor) -> Iterator[None]:
    """Multiply the unit's output channels by ``mask`` (C,) while the context is open (no weight change)."""
    handle = unit.output.register_forward_hook(lambda _m, _i, out: out * mask.to(out).view(1, -1, 1, 1))
    try:
        yield
    finally:
        handle.remove()


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
