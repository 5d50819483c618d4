"""Model-repairing baselines: the suspect model in, a repaired copy out.

A :class:`Repair` is fitted on what a post-development defender has (the suspect model and a small
clean set): ``fit(model, clean, seed=...)`` leaves the repaired model in ``repaired_`` and never
touches the model it was given. The repaired model is a plain module of the same architecture (pruned
channels are zeroed weights, not removed ones), so it saves with ``save_weights``, loads into
``ModelSpec.build()`` and can stand in for BaDExpert's auxiliary model M' (``set_models``).

Fine-tuning, Fine-Pruning, NAD and CLP live here; the methods that optimise a trigger or a
perturbation (Neural Cleanse, ANP, I-BAU) are in :mod:`bdray.defenses.unlearning`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

from bdray.data.base import ImageSet
from bdray.defenses.badexpert import AUXILIARY_RECIPE
from bdray.defenses.layers import (
    ConvUnit,
    as_float,
    batched_logits,
    channel_mask,
    conv_units,
    last_conv_unit,
    model_device,
)
from bdray.registry import Registry
from bdray.train import TrainRecipe, fit
from bdray.train.loop import augment_batch, augment_generator, to_float, worker_batches

# -- interface and registry -----------------------------------------------------------------------


class RepairConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str


class Repair:
    """Base class of model repairs: ``fit`` -> ``repaired_`` (a new model; the input is not modified)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[RepairConfig]] = RepairConfig

    def __init__(self, config: RepairConfig) -> None:
        self.config = config
        self.repaired_: nn.Module | None = None

    def fit(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> Repair:
        work = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            # Methods that draw from torch's global generator (dropout, init) stay reproducible.
            torch.manual_seed(seed)
            self.repaired_ = self._repair(work, clean, seed=seed).eval()
        return self

    def _repair(self, model: nn.Module, clean: ImageSet, *, seed: int) -> nn.Module:
        """Repair ``model`` (a private copy, free to modify) and return it."""
        raise NotImplementedError


RepairType = type[Repair]
REPAIRS: Registry[RepairType] = Registry("repair")


def register_repair(name: str) -> Callable[[RepairType], RepairType]:
    def decorator(cls: RepairType) -> RepairType:
        cls.name = name
        return REPAIRS.register(name)(cls)

    return decorator


def list_repairs() -> list[str]:
    return REPAIRS.names()


def repair_class(name: str) -> RepairType:
    cls = REPAIRS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Repair)):
        raise KeyError(f"repair '{name}' does not resolve to a subclass of bdray.defenses.repair.Repair")
    return cls


def build_repair(config: RepairConfig | dict[str, Any]) -> Repair:
    """A repair from its config, or from a plain dict validated into the config its name selects."""
    if isinstance(config, dict):
        config = repair_class(config["name"]).Config.model_validate(config)
    return repair_class(config.name)(config)


# -- shared pieces --------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_with_loss(
    model: nn.Module, data: ImageSet, recipe: TrainRecipe, loss_fn: LossFn, *, seed: int
) -> nn.Module:
    """bdray's training loop (same sample order, augmentation, optimizer, schedule) with a custom loss.

    ``loss_fn(model, x, y)`` gets float images in [0, 1] on the model's device and mapped labels.
    """
    device = model_device(model)
    images = torch.from_numpy(data.images)
    labels = (torch.from_numpy(data.labels) + recipe.label_shift) % data.num_classes
    optimizer = recipe.make_optimizer(model.parameters())
    scheduler = recipe.make_scheduler(optimizer, -(-len(data) // recipe.batch_size))
    for epoch in range(recipe.epochs):
        gen = augment_generator(seed, epoch)
        model.train()
        for idx in worker_batches(len(data), recipe.batch_size, seed=seed, epoch=epoch):
            x = augment_batch(to_float(images[idx]), recipe.augment, gen).to(device)
            loss = loss_fn(model, x, labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model


def clean_accuracy(model: nn.Module, data: ImageSet, batch_size: int = 1000) -> float:
    pred = batched_logits(model, as_float(data.images), batch_size).argmax(1).cpu().numpy()
    return float((pred == data.labels).mean())


def fit_keeping_pruned(
    model: nn.Module, data: ImageSet, recipe: TrainRecipe, pruned: dict[str, np.ndarray], *, seed: int
) -> nn.Module:
    """Finetune while pruned channels stay exactly 0, then fold the masks back into plain weights.

    torch's pruning reparametrization (weight = weight_orig * mask) keeps masked entries at 0 and
    their gradients at 0 during training; ``prune.remove`` restores an ordinary state_dict after.
    """
    units = {u.name: u for u in conv_units(model)}
    masked = []
    for name, index in pruned.items():
        if len(index) == 0:
            continue
        for module, param in units[name].channel_tensors():
            mask = torch.ones_like(getattr(module, param))
            mask[torch.as_tensor(index, dtype=torch.long)] = 0
            prune.custom_from_mask(module, param, mask)
            masked.append((module, param))
    fit(model, data, recipe, seed=seed, device=model_device(model))
    for module, param in masked:
        prune.remove(module, param)
    return model


# -- Fine-tuning ----------------------------------------------------------------------------------


class FineTuningConfig(RepairConfig):
    recipe: TrainRecipe = Field(AUXILIARY_RECIPE, description="finetuning on the clean set (default: BaDExpert's M')")


@register_repair("finetune")
class FineTuning(Repair):
    """Finetune all layers on the clean set with correct labels (BaDExpert's M', NAD's teacher)."""

    Config = FineTuningConfig
    config: FineTuningConfig

    def _repair(self, model: nn.Module, clean: ImageSet, *, seed: int) -> nn.Module:
        return fit(model, clean, self.config.recipe, seed=seed, device=model_device(model))


# -- Fine-Pruning ---------------------------------------------------------------------------------

FINE_PRUNING_RECIPE = TrainRecipe(
    epochs=10, batch_size=64, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="cosine"
)


class FinePruningConfig(RepairConfig):
    max_ca_drop: float = Field(
        0.10, gt=0, lt=1, description="prune until clean accuracy on the defender's set drops by this much (A.4: 10%)"
    )
    prune_ratio: float | None = Field(
        None, gt=0, lt=1, description="prune this fraction of channels instead of searching by accuracy"
    )
    layer: str | None = Field(None, description="module name of the Conv2d to prune (default: the last one)")
    recipe: TrainRecipe | None = Field(FINE_PRUNING_RECIPE, description="finetuning after pruning (None: prune only)")


@register_repair("fine_pruning")
class FinePruning(Repair):
    """Liu et al., RAID 2018: prune the last convolution's channels that stay dormant on clean data
    (a backdoor tends to live in them), then finetune on the clean set."""

    Config = FinePruningConfig
    config: FinePruningConfig

    def __init__(self, config: FinePruningConfig) -> None:
        super().__init__(config)
        self.pruned_: np.ndarray | None = None
        self.activation_: np.ndarray | None = None

    @torch.no_grad()
    def channel_activation(self, model: nn.Module, unit: ConvUnit, clean: ImageSet) -> np.ndarray:
        """Mean post-ReLU activation of each channel over the clean set."""
        sums: list[torch.Tensor] = []
        handle = unit.output.register_forward_hook(lambda _m, _i, out: sums.append(out.relu().sum((0, 2, 3)).cpu()))
        try:
            batched_logits(model, as_float(clean.images))
        finally:
            handle.remove()
        return (torch.stack(sums).sum(0) / len(clean)).numpy()

    def _repair(self, model: nn.Module, clean: ImageSet, *, seed: int) -> nn.Module:
        cfg = self.config
        unit = last_conv_unit(model, cfg.layer)
        self.activation_ = self.channel_activation(model, unit, clean)
        order = np.argsort(self.activation_, kind="stable")  # most dormant first
        if cfg.prune_ratio is not None:
            count = min(round(cfg.prune_ratio * unit.channels), unit.channels - 1)
        else:
            count = self._search(model, unit, order, clean)
        self.pruned_ = np.sort(order[:count])
        unit.zero_channels(self.pruned_)
        if cfg.recipe is None:
            return model
        return fit_keeping_pruned(model, clean, cfg.recipe, {unit.name: self.pruned_}, seed=seed)

    def _search(self, model: nn.Module, unit: ConvUnit, order: np.ndarray, clean: ImageSet) -> int:
        """Largest prefix of ``order`` prunable before clean accuracy falls by ``max_ca_drop``."""
        base = clean_accuracy(model, clean)
        mask = torch.ones(unit.channels)
        for count in range(1, unit.channels):
            mask[order[count - 1]] = 0
            with channel_mask(unit, mask):
                if clean_accuracy(model, clean) < base - self.config.max_ca_drop:
                    return count - 1
        return unit.channels - 1  # keep one channel: a layer of zeros is no model


# -- NAD ------------------------------------------------------------------------------------------

NAD_STUDENT_RECIPE = TrainRecipe(
    epochs=20, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
    schedule="multistep", milestones=(2,), lr_decay=0.5,
)


class NADConfig(RepairConfig):
    teacher: TrainRecipe = Field(AUXILIARY_RECIPE, description="teacher finetuning (A.4: 10 epochs, lr 0.1, x0.1 / 2)")
    student: TrainRecipe = Field(NAD_STUDENT_RECIPE, description="distillation (A.4: 20 epochs, lr 0.1 then 0.05)")
    betas: tuple[float, ...] = Field(
        (500.0, 1000.0, 1000.0), description="attention-loss weight per distilled stage, shallow to deep"
    )
    p: float = Field(2.0, gt=0, description="attention map = mean over channels of |activation|^p")

    @model_validator(mode="after")
    def _check(self) -> NADConfig:
        if not self.betas or any(b < 0 for b in self.betas):
            raise ValueError(f"betas must be one or more non-negative weights, got {self.betas}")
        return self


def stage_units(model: nn.Module, image_shape: tuple[int, int, int]) -> list[ConvUnit]:
    """The last conv unit at each spatial resolution, shallow to deep (NAD's 'groups')."""
    sizes: dict[str, tuple[int, int]] = {}
    units = conv_units(model)
    hooks = [u.output.register_forward_hook(lambda _m, _i, out, n=u.name: sizes.__setitem__(n, tuple(out.shape[-2:])))
             for u in units]
    try:
        batched_logits(model, torch.zeros(1, *image_shape))
    finally:
        for h in hooks:
            h.remove()
    last: dict[tuple[int, int], ConvUnit] = {}
    for u in units:
        if u.name in sizes:
            last.pop(sizes[u.name], None)  # re-insert so dict order follows the last unit of each size
            last[sizes[u.name]] = u
    return list(last.values())


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): channel-pooled |F|^p, L2-normalized per sample."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


@register_repair("nad")
class NAD(Repair):
    """Li et al., ICLR 2021: finetune a teacher on clean data, then retrain the suspect model (the
    student) on the same data with cross-entropy plus a loss pulling its attention maps toward the
    teacher's at several depths."""

    Config = NADConfig
    config: NADConfig

    def __init__(self, config: NADConfig) -> None:
        super().__init__(config)
        self.teacher_: nn.Module | None = None

    def _repair(self, model: nn.Module, clean: ImageSet, *, seed: int) -> nn.Module:
        cfg = self.config
        teacher = fit(copy.deepcopy(model), clean, cfg.teacher, seed=seed, device=model_device(model)).eval()
        self.teacher_ = teacher
        stages_s = stage_units(model, clean.image_shape)
        stages_t = stage_units(teacher, clean.image_shape)
        if len(stages_s) < len(cfg.betas):
            raise ValueError(f"nad.betas has {len(cfg.betas)} weights but the model has {len(stages_s)} stages")
        stages_s, stages_t = stages_s[-len(cfg.betas) :], stages_t[-len(cfg.betas) :]
        captured: dict[str, list[torch.Tensor]] = {"s": [], "t": []}

        def keep(key: str) -> Callable:
            # Clone and apply the block's ReLU here: the model's own in-place ReLU would overwrite the
            # captured tensor, and NAD distills post-activation features.
            return lambda _m, _i, out: captured[key].append(out.clone().relu())

        hooks = [u.output.register_forward_hook(keep("s")) for u in stages_s]
        hooks += [u.output.register_forward_hook(keep("t")) for u in stages_t]

        def loss_fn(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            captured["s"].clear()
            captured["t"].clear()
            loss = F.cross_entropy(student(x), y)
            with torch.no_grad():
                teacher(x)
            for beta, fs, ft in zip(cfg.betas, captured["s"], captured["t"], strict=True):
                loss = loss + beta * (attention_map(fs, cfg.p) - attention_map(ft, cfg.p)).pow(2).mean()
            return loss

        try:
            return train_with_loss(model, clean, cfg.student, loss_fn, seed=seed + 1)
        finally:
            for h in hooks:
                h.remove()


# -- CLP ------------------------------------------------------------------------------------------


class CLPConfig(RepairConfig):
    u: float = Field(3.0, ge=0, description="prune channels whose UCLC exceeds mean + u * std of their layer")
    recipe: TrainRecipe | None = Field(None, description="optional finetuning after pruning (CLP itself is data-free)")


@torch.no_grad()
def channel_lipschitz(unit: ConvUnit) -> torch.Tensor:
    """Upper bound of each output channel's Lipschitz constant (CLP's UCLC), from the weights alone.

    With BN folded in, channel k computes (gamma_k / sigma_k) * (W_k * x) + const; its spectral norm
    is bounded by that of W_k (in, kh * kw) scaled by |gamma_k / sigma_k|.
    """
    w = unit.conv.weight.detach().flatten(2)  # (out, in, kh * kw)
    if unit.bn is not None:
        scale = unit.bn.weight.detach() / torch.sqrt(unit.bn.running_var + unit.bn.eps)
        w = w * scale.view(-1, 1, 1)
    return torch.linalg.matrix_norm(w, ord=2)  # (out,)


@register_repair("clp")
class CLP(Repair):
    """Zheng et al., ECCV 2022: channels a trigger drives hard have an outlying Lipschitz bound;
    prune, per layer, those above mean + u * std. Needs no data."""

    Config = CLPConfig
    config: CLPConfig

    def __init__(self, config: CLPConfig) -> None:
        super().__init__(config)
        self.pruned_: dict[str, np.ndarray] = {}

    def _repair(self, model: nn.Module, clean: ImageSet, *, seed: int) -> nn.Module:
        self.pruned_ = {}
        for unit in conv_units(model):
            uclc = channel_lipschitz(unit)
            if len(uclc) < 2:
                continue
            index = torch.nonzero(uclc > uclc.mean() + self.config.u * uclc.std()).flatten()
            if len(index):
                unit.zero_channels(index)
                self.pruned_[unit.name] = index.cpu().numpy()
        if self.config.recipe is None:
            return model
        return fit_keeping_pruned(model, clean, self.config.recipe, self.pruned_, seed=seed)


__all__ = [
    "CLP",
    "NAD",
    "REPAIRS",
    "CLPConfig",
    "FinePruning",
    "FinePruningConfig",
    "FineTuning",
    "FineTuningConfig",
    "NADConfig",
    "Repair",
    "RepairConfig",
    "attention_map",
    "build_repair",
    "channel_lipschitz",
    "list_repairs",
    "register_repair",
    "repair_class",
    "stage_units",
    "train_with_loss",
]
