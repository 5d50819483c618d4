"""A model as a sequence of blocks: what a recipe may freeze and what shared-prefix experts share.

Each architecture family says how its forward pass unrolls into *stages*, modules that compose in
order into the model (:func:`register_stages`, one adapter per model class, kept beside the model).
The stages are then grouped into *blocks*: a block starts at each stage that holds a convolution
or a linear layer, and BatchNorm, activation, pooling and flattening stages join the block before
them. For the compact CNN that gives 4 blocks (3 conv+BN+ReLU(+pool) blocks and the linear head),
for the CIFAR ResNet-18 10 (stem, 8 residual blocks, head).

``trainable_blocks = k`` means: train the last ``k`` blocks; the first ``n - k`` (the *prefix*) keep
their weights and BatchNorm statistics. Models whose prefixes are bit-identical then share one
forward pass through it (:func:`split_model`, ``bdray.detect.Filter``).

:mod:`bdray.defenses.layers` walks conv/BN units for pruning; those are not a sequential split (a
residual block's shortcut runs beside its main path), so blocks have their own walk here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bdray.models.registry import Classifier

StageFn = Callable[[nn.Module], list[nn.Module]]
_STAGES: dict[type[nn.Module], StageFn] = {}


def register_stages(cls: type[nn.Module]) -> Callable[[StageFn], StageFn]:
    """Register how instances of ``cls`` unroll into stages; a second adapter for one class raises."""

    def decorator(fn: StageFn) -> StageFn:
        if cls in _STAGES:
            raise ValueError(f"stages of {cls.__name__} are already registered")
        _STAGES[cls] = fn
        return fn

    return decorator


class Normalize(nn.Module):
    """A :class:`Classifier`'s input normalization as a stage (reads the classifier's own buffers)."""

    def __init__(self, owner: Classifier) -> None:
        super().__init__()
        # Not a submodule: the classifier contains this stage's blocks, registering it back would loop.
        object.__setattr__(self, "owner", owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.owner.mean) / self.owner.std


class GlobalAvgPool(nn.Module):
    """``adaptive_avg_pool2d(x, 1)`` then flatten: (B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@register_stages(Classifier)
def _classifier_stages(model: nn.Module) -> list[nn.Module]:
    assert isinstance(model, Classifier)
    return [Normalize(model), *model_stages(model.backbone)]


@register_stages(nn.Sequential)
def _sequential_stages(model: nn.Module) -> list[nn.Module]:
    return list(model.children())


def model_stages(model: nn.Module) -> list[nn.Module]:
    """Modules whose composition in order is ``model``'s forward pass (they are the model's own)."""
    for cls in type(model).__mro__:
        if cls in _STAGES:
            return _STAGES[cls](model)
    supported = ", ".join(sorted(c.__name__ for c in _STAGES))
    raise ValueError(
        f"{type(model).__name__} cannot be split into blocks (no stage adapter; bdray.models.blocks knows {supported})"
    )


def _starts_block(stage: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in stage.modules())


def model_blocks(model: nn.Module) -> list[nn.Sequential]:
    """The model's blocks, in order: each an ``nn.Sequential`` over the model's own modules."""
    groups: list[list[nn.Module]] = []
    leading: list[nn.Module] = []
    for stage in model_stages(model):
        if _starts_block(stage):
            groups.append([*leading, stage])
            leading = []
        elif groups:
            groups[-1].append(stage)
        else:
            leading.append(stage)  # the input normalization joins the first block
    if not groups:
        raise ValueError(f"{type(model).__name__} has no convolution or linear layer to form blocks")
    return [nn.Sequential(*g) for g in groups]


def num_blocks(model: nn.Module) -> int:
    return len(model_blocks(model))


def prefix_length(model: nn.Module, trainable_blocks: int, field: str = "trainable_blocks") -> int:
    """How many leading blocks stay frozen when the last ``trainable_blocks`` train; a clear error if
    the model has fewer blocks. ``field`` names the setting in the message."""
    n = num_blocks(model)
    if not 1 <= trainable_blocks <= n:
        raise ValueError(
            f"{field}: {trainable_blocks} is not in 1..{n}, the blocks of {type(model).__name__} "
            f"({describe_blocks(model)})"
        )
    return n - trainable_blocks


def split_model(model: nn.Module, trainable_blocks: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, suffix): ``suffix(prefix(x)) == model(x)``; the suffix is the last ``trainable_blocks``."""
    blocks = model_blocks(model)
    cut = prefix_length(model, trainable_blocks)
    return nn.Sequential(*blocks[:cut]), nn.Sequential(*blocks[cut:])


def freeze_prefix(model: nn.Module, trainable_blocks: int | None) -> list[nn.Parameter]:
    """Stop gradients to the prefix (all but the last ``trainable_blocks`` blocks); returns the
    parameters left to train (all of them for None). Call :func:`prefix_eval` after every
    ``model.train()`` so the prefix's BatchNorm statistics stay as they are."""
    if trainable_blocks is None:
        return list(model.parameters())
    prefix, _ = split_model(model, trainable_blocks)
    prefix.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def prefix_eval(model: nn.Module, trainable_blocks: int | None) -> None:
    """Put the prefix in eval mode (BatchNorm normalizes with, and no longer updates, its statistics)."""
    if trainable_blocks is not None:
        split_model(model, trainable_blocks)[0].eval()


def same_prefix(models: Sequence[nn.Module], trainable_blocks: int) -> bool:
    """Whether every model's prefix holds bit-identical parameters and buffers (same names, same values)."""
    states = [split_model(m, trainable_blocks)[0].state_dict() for m in models]
    first = states[0]
    return all(
        s.keys() == first.keys()
        and all(
            s[k].shape == first[k].shape and s[k].dtype == first[k].dtype and torch.equal(s[k], first[k]) for k in first
        )
        for s in states[1:]
    )


def block_flops(model: nn.Module, image_shape: Sequence[int]) -> list[int]:
    """FLOPs of each block for one image of ``image_shape`` (C, H, W), as torch's flop counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    x = torch.zeros(1, *image_shape, device=param.device if param is not None else "cpu")
    flops = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for block in model_blocks(model):
                with FlopCounterMode(display=False) as counter:
                    x = block(x)
                flops.append(int(counter.get_total_flops()))
    finally:
        model.train(was_training)
    return flops


def shared_pass_cost(model: nn.Module, trainable_blocks: int | None, image_shape: Sequence[int]) -> float:
    """FLOPs of M, B and M' on one input over those of M alone: 3 without a shared prefix, and
    1 + 2 x (the suffix's share of M's FLOPs) when one pass through the prefix feeds all three."""
    if trainable_blocks is None:
        return 3.0
    flops = block_flops(model, image_shape)
    cut = prefix_length(model, trainable_blocks)
    total = sum(flops)
    return 1.0 + 2.0 * sum(flops[cut:]) / total if total else 3.0


def describe_blocks(model: nn.Module) -> str:
    """The blocks by their first layer and its width, e.g. '1: Conv2d ->16, 2: Conv2d ->32, ..., 4: Linear ->10'."""
    parts = []
    for i, block in enumerate(model_blocks(model), 1):
        layer = next(m for m in block.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        parts.append(f"{i}: {type(layer).__name__} ->{width}")
    if len(parts) > 6:  # a deep model: its ends say enough
        parts = [*parts[:3], "...", *parts[-2:]]
    return ", ".join(parts)
