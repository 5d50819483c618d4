"""Training recipes: optimizer, schedule, augmentation and label map as one validated object."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from torch import nn


class Augment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_padding: int = Field(0, ge=0, description="random crop after zero padding by this many pixels")
    hflip: bool = False


class TrainRecipe(BaseModel):
    """How to train (or finetune) a model. The same loop serves M, the expert B and M'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "multistep", "cosine"] = "cosine"
    milestones: tuple[int, ...] = ()
    lr_decay: float = Field(0.1, gt=0, le=1)
    label_shift: int = Field(0, description="train on (y + label_shift) mod C; BaDExpert's expert uses 1")
    augment: Augment = Augment()
    trainable_blocks: int | None = Field(
        None,
        ge=1,
        description="train only the last k blocks (bdray.models.blocks); the earlier ones keep their "
        "weights and BatchNorm statistics. None: every layer trains",
    )

    @model_serializer(mode="wrap")
    def _omit_unset_blocks(self, handler: SerializerFunctionWrapHandler) -> dict:
        # Stage keys hash a recipe's dump: leaving the unset field out keeps every key made before it existed.
        data = handler(self)
        if self.trainable_blocks is None:
            data.pop("trainable_blocks", None)
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainRecipe:
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones (epochs at which lr is multiplied by lr_decay)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        return self

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay
        )

    def make_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        """A per-step scheduler (cosine decays smoothly over every step of every epoch)."""
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs * steps_per_epoch)
        if self.schedule == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=[m * steps_per_epoch for m in self.milestones], gamma=self.lr_decay
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
