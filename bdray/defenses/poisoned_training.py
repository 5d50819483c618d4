"""Poisoned-training baselines: defenses that, like AdvrBD, see only the untrusted training set.

AdvrBD (Table II) compares against ABL, DBR and CutMix among others; each is registered here under
:func:`~bdray.defenses.advrbd.register_poisoned_training` so ``get_poisoned_training({"name": ...})``
builds it from a config section:

- ``abl``: Anti-Backdoor Learning (Li et al., NeurIPS 2021). Train with the local gradient ascent
  (LGA) loss, isolate the lowest-loss fraction, finetune on the rest, unlearn the isolated samples.
- ``dbr``: D-BR (Chen et al., NeurIPS 2022, AdvrBD's reference [13]). Score every sample by its
  feature consistency towards rotation/affine transformations (FCT), then unlearn the most sensitive
  fraction and relearn the least sensitive one on a backdoored model.
- ``dbd``: DBD, backdoor defense via decoupling the training process (Huang et al., ICLR 2022; AdvrBD's
  reference [35]). SimCLR on the images without labels, a linear head with symmetric cross-entropy,
  the low-loss fraction as credible, then semi-supervised finetuning.
- ``cutmix``: train with CutMix (Yun et al., ICCV 2019) as a data-augmentation defense (Borgnia et al.,
  ICASSP 2021, AdvrBD's reference [52]).

Every stage reuses bdray's training loop (:func:`bdray.train.fit`, or its custom-loss variant
:func:`bdray.defenses.repair.train_with_loss`, same sample order and augmentation) and draws its
randomness from generators seeded by ``fit(..., seed=)``: the same seed gives the same weights on the
CPU. Defaults, sources and simplifications: docs/defenses.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from bdray.data.base import ImageSet
from bdray.defenses.advrbd import (
    Builder,
    PoisonedTrainingConfig,
    PoisonedTrainingDefense,
    register_poisoned_training,
    top_fraction,
)
from bdray.defenses.layers import last_linear, penultimate_features
from bdray.defenses.repair import train_with_loss
from bdray.train import TrainRecipe, fit, predict_proba
from bdray.train.loop import augment_batch, augment_generator, epoch_order, to_float, worker_batches
from bdray.train.recipe import Augment

# -- shared pieces --------------------------------------------------------------------------------


def per_sample_loss(model: nn.Module, data: ImageSet, *, device: str | torch.device = "cpu") -> np.ndarray:
    """Cross-entropy of every sample under ``model`` (eval mode, no augmentation), (N,)."""
    probs = predict_proba(model, data.images, device=device)
    return -np.log(np.clip(probs[np.arange(len(data)), data.labels], 1e-12, 1.0))


def lowest_fraction(scores: np.ndarray, rate: float) -> np.ndarray:
    """Mask of the ``rate * N`` lowest scores (ties by index)."""
    return top_fraction(-scores, rate)


def ascent_descent_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageSet, recipe: TrainRecipe, *, seed: int,
    epoch: int, sign: float, device: torch.device,
) -> None:
    """One pass of bdray's loop over ``data`` minimising ``sign * CE`` (sign -1: gradient ascent).

    The optimizer is the caller's, so alternating ascent and descent passes (D-BR) share momentum.
    """
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    gen = augment_generator(seed, epoch)
    model.train()
    for idx in worker_batches(len(data), recipe.batch_size, seed=seed, epoch=epoch):
        x = augment_batch(to_float(images[idx]), recipe.augment, gen).to(device)
        loss = sign * F.cross_entropy(model(x).float(), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class _TrainsModels(PoisonedTrainingDefense):
    """A poisoned-training defense that builds its models with a builder (as :class:`AdvrBD` does)."""

    def __init__(self, config: PoisonedTrainingConfig, build: Builder | None = None) -> None:
        super().__init__(config)
        self.build = build

    def set_builder(self, build: Builder) -> _TrainsModels:
        self.build = build
        return self

    def _new_model(self, seed: int) -> nn.Module:
        if self.build is None:
            raise RuntimeError(f"{type(self).__name__} needs a model builder: {type(self).__name__}(config, build) "
                               "or .set_builder(build)")
        torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
        return self.build()

    @property
    def model_(self) -> nn.Module:
        return self.final_model_

    def repair(self) -> nn.Module:
        return self.final_model_


# -- ABL ------------------------------------------------------------------------------------------


class ABLConfig(PoisonedTrainingConfig):
    """Anti-Backdoor Learning. Defaults: the paper (gamma, isolation ratio, T_te = 20 isolation epochs)
    and the authors' released configuration for the finetuning and unlearning recipes (docs/defenses.md)."""

    name: Literal["abl"] = "abl"
    isolation: TrainRecipe = Field(
        TrainRecipe(epochs=20, batch_size=64, lr=0.1, weight_decay=1e-4, nesterov=True, schedule="constant"),
        description="training with the LGA loss before isolation (the paper's T_te = 20 epochs)")
    gamma: float = Field(0.5, ge=0, description="LGA threshold: a sample whose loss falls below it is pushed back up")
    isolation_ratio: float = Field(0.01, gt=0, lt=1, description="fraction of lowest-loss samples isolated as poisons")
    finetune: TrainRecipe | None = Field(
        TrainRecipe(epochs=60, batch_size=64, lr=0.1, weight_decay=1e-4, nesterov=True, schedule="multistep",
                    milestones=(40,), lr_decay=0.1),
        description="continue training the isolation model on the other samples (None: skip, go to unlearning)")
    unlearn: TrainRecipe = Field(
        TrainRecipe(epochs=5, batch_size=64, lr=5e-4, weight_decay=1e-4, nesterov=True, schedule="constant"),
        description="gradient ascent on the isolated samples")


def lga_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's local gradient ascent: mean of sign(CE_i - gamma) * CE_i over the batch.

    Samples already fitted below gamma get their loss pushed back up, so clean samples hover around
    gamma while the backdoor, learnt much faster, keeps its samples lower: that gap is what isolates them.
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
    return (torch.sign(ce - gamma) * ce).mean()


@register_poisoned_training("abl")
class ABL(_TrainsModels):
    """Fitted state: ``isolation_model_``, ``losses_`` (per sample, after isolation training),
    ``isolated_`` (mask of suspected poisons), ``finetuned_model_``, ``final_model_`` (after unlearning)."""

    Config = ABLConfig
    config: ABLConfig

    def fit(self, poisoned: ImageSet, *, seed: int, device: str | torch.device = "cpu") -> ABL:
        cfg, device = self.config, torch.device(device)
        model = self._new_model(seed).to(device)
        self.isolation_model_ = train_with_loss(model, poisoned, cfg.isolation,
                                                lambda m, x, y: lga_loss(m(x), y, cfg.gamma), seed=seed)
        self.losses_ = per_sample_loss(self.isolation_model_, poisoned, device=device)
        self.isolated_ = lowest_fraction(self.losses_, cfg.isolation_ratio)
        model = copy.deepcopy(self.isolation_model_)
        if cfg.finetune is not None:
            # The released code finetunes on the other 99% before unlearning, to recover clean accuracy.
            fit(model, poisoned.subset(np.flatnonzero(~self.isolated_)), cfg.finetune, seed=seed + 1, device=device)
        self.finetuned_model_ = copy.deepcopy(model)
        isolated = poisoned.subset(np.flatnonzero(self.isolated_))
        optimizer = cfg.unlearn.make_optimizer(model.parameters())
        for epoch in range(cfg.unlearn.epochs):
            ascent_descent_epoch(model, optimizer, isolated, cfg.unlearn, seed=seed + 2, epoch=epoch, sign=-1.0,
                                 device=device)
        self.final_model_ = model.eval()
        return self


# -- CutMix ---------------------------------------------------------------------------------------


class CutMixConfig(PoisonedTrainingConfig):
    """Training with CutMix. Defaults: Yun et al.'s CIFAR settings (beta 1, probability 0.5); AdvrBD
    states a probability and a beta but the paper's text lost the numbers."""

    name: Literal["cutmix"] = "cutmix"
    train: TrainRecipe = Field(TrainRecipe(epochs=5), description="the model trained from scratch with CutMix")
    prob: float = Field(0.5, ge=0, le=1, description="probability that a batch is mixed")
    beta: float = Field(1.0, gt=0, description="lambda ~ Beta(beta, beta): the kept share of each image")


@dataclass(frozen=True)
class CutMixParams:
    """One batch's draw: the partner of each sample and the box pasted from it (rows y0:y1, cols x0:x1)."""

    apply: bool
    perm: torch.Tensor  # (B,) int64
    box: tuple[int, int, int, int]  # y0, y1, x0, x1

    def kept(self, height: int, width: int) -> float:
        """lambda: the share of each image left as it was (box area measured after clipping)."""
        if not self.apply:
            return 1.0
        y0, y1, x0, x1 = self.box
        return 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def cutmix_params(
    batch: int, height: int, width: int, *, prob: float, beta: float, generator: torch.Generator
) -> CutMixParams:
    """Draw CutMix's randomness for one batch: apply?, lambda ~ Beta(beta, beta), a box of area
    (1 - lambda) H W centred uniformly (clipped at the border), and a random partner per sample."""
    apply = bool(torch.rand((), generator=generator) < prob)
    perm = torch.randperm(batch, generator=generator)
    # torch's Beta sampler takes no generator: draw it from a numpy stream seeded by this one.
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
    lam = float(rng.beta(beta, beta))
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    box = (max(cy - ch // 2, 0), min(cy + ch // 2, height), max(cx - cw // 2, 0), min(cx + cw // 2, width))
    return CutMixParams(apply, perm, box)


def cutmix(
    x: torch.Tensor, labels: torch.Tensor, params: CutMixParams, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste each partner's box into its sample; soft targets weigh the labels by pixel share.

    x (B, C, H, W) -> (mixed copy (B, C, H, W), targets (B, num_classes)); ``x`` is not modified.
    """
    targets = F.one_hot(labels, num_classes).float()
    if not params.apply:
        return x.clone(), targets
    y0, y1, x0, x1 = params.box
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[params.perm][:, :, y0:y1, x0:x1]
    lam = params.kept(x.shape[-2], x.shape[-1])
    return out, lam * targets + (1.0 - lam) * targets[params.perm]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log p_k (= lam CE(y_a) + (1 - lam) CE(y_b) for CutMix targets)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


@register_poisoned_training("cutmix")
class CutMix(_TrainsModels):
    """Fitted state: ``final_model_``."""

    Config = CutMixConfig
    config: CutMixConfig

    def fit(self, poisoned: ImageSet, *, seed: int, device: str | torch.device = "cpu") -> CutMix:
        cfg = self.config
        model = self._new_model(seed).to(device)
        # The loop calls the loss once per batch in a fixed order, so one seeded stream gives every
        # batch the same draw on every run.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        _, _, h, w = poisoned.images.shape

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            params = cutmix_params(len(x), h, w, prob=cfg.prob, beta=cfg.beta, generator=gen)
            mixed, targets = cutmix(x, y, params, poisoned.num_classes)
            return soft_cross_entropy(m(mixed), targets)

        self.final_model_ = train_with_loss(model, poisoned, cfg.train, loss, seed=seed).eval()
        return self


# -- D-BR -----------------------------------------------------------------------------------------


class DBRConfig(PoisonedTrainingConfig):
    """D-BR: sample distinguishment by FCT, then backdoor removal. Defaults: the authors' README
    (clean ratio 0.2, poison ratio 0.05, 2 epochs without augmentation for the SD model, 20 epochs of
    unlearn + relearn at lr 1e-4, SGD momentum 0.9, weight decay 5e-4)."""

    name: Literal["dbr"] = "dbr"
    train: TrainRecipe = Field(TrainRecipe(epochs=5), description="the backdoored model the BR module repairs")
    sd_train: TrainRecipe = Field(TrainRecipe(epochs=2), description="the SD module's model: a short training "
                                  "without augmentation (keep it off), so poisons are fitted and clean samples barely")
    clean_ratio: float = Field(0.2, gt=0, lt=1, description="least transformation-sensitive fraction: relearned")
    poison_ratio: float = Field(0.05, gt=0, lt=1, description="most transformation-sensitive fraction: unlearned")
    rotation: float = Field(180.0, ge=0, le=180, description="FCT transform: rotation by U(-r, r) degrees")
    translate: float = Field(0.1, ge=0, lt=1, description="FCT transform: shift by U(-t, t) of the image side")
    br: TrainRecipe = Field(
        TrainRecipe(epochs=20, batch_size=128, lr=1e-4, weight_decay=5e-4, schedule="constant"),
        description="each epoch: one ascent pass over the unlearned set, one descent pass over the relearned set")

    @model_validator(mode="after")
    def _check(self) -> DBRConfig:
        if self.clean_ratio + self.poison_ratio > 1:
            raise ValueError(f"clean_ratio + poison_ratio = {self.clean_ratio + self.poison_ratio:.3f} exceeds 1: "
                             "the clean and poisoned sets would overlap")
        return self


def rotate_shift(x: torch.Tensor, angles: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate (degrees, (B,)) and shift (fractions of the side, (B, 2)) each image; zeros fill the rest."""
    rad = angles * math.pi / 180.0
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.stack([torch.stack([cos, -sin, 2 * shifts[:, 0]], 1),
                         torch.stack([sin, cos, 2 * shifts[:, 1]], 1)], 1)  # (B, 2, 3); grid spans [-1, 1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fct_scores(
    model: nn.Module, images: np.ndarray, *, rotation: float, translate: float, seed: int, batch_size: int = 1000
) -> np.ndarray:
    """D-BR's feature consistency towards transformations: mean squared change of the penultimate
    features under a random rotation + shift, (N,). Higher = more sensitive = more likely poisoned."""
    rng = np.random.default_rng(seed)  # drawn for the whole set at once: scores do not depend on batching
    angles = torch.from_numpy(rng.uniform(-rotation, rotation, len(images)).astype(np.float32))
    shifts = torch.from_numpy(rng.uniform(-translate, translate, (len(images), 2)).astype(np.float32))
    out = np.empty(len(images), np.float32)
    for s in range(0, len(images), batch_size):
        x = to_float(torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size])))
        moved = rotate_shift(x, angles[s : s + batch_size], shifts[s : s + batch_size])
        f1, _ = penultimate_features(model, x, batch_size)
        f2, _ = penultimate_features(model, moved, batch_size)
        out[s : s + batch_size] = ((f1 - f2) ** 2).mean(1)
    return out


@register_poisoned_training("dbr")
class DBR(_TrainsModels):
    """Fitted state: ``sd_model_``, ``fct_``, ``unlearned_`` / ``relearned_`` (masks), ``backdoored_model_``,
    ``final_model_``."""

    Config = DBRConfig
    config: DBRConfig

    def fit(
        self, poisoned: ImageSet, *, seed: int, device: str | torch.device = "cpu",
        poisoned_model: nn.Module | None = None,
    ) -> DBR:
        cfg, device = self.config, torch.device(device)
        self.sd_model_ = fit(self._new_model(seed).to(device), poisoned, cfg.sd_train, seed=seed, device=device)
        self.fct_ = fct_scores(self.sd_model_, poisoned.images, rotation=cfg.rotation, translate=cfg.translate,
                               seed=seed)
        self.unlearned_ = top_fraction(self.fct_, cfg.poison_ratio)
        self.relearned_ = lowest_fraction(self.fct_, cfg.clean_ratio)
        if poisoned_model is None:
            poisoned_model = fit(self._new_model(seed + 1).to(device), poisoned, cfg.train, seed=seed + 1,
                                 device=device)
        self.backdoored_model_ = poisoned_model
        model = copy.deepcopy(poisoned_model).to(device)
        unlearn = poisoned.subset(np.flatnonzero(self.unlearned_))
        relearn = poisoned.subset(np.flatnonzero(self.relearned_))
        optimizer = cfg.br.make_optimizer(model.parameters())
        for epoch in range(cfg.br.epochs):
            ascent_descent_epoch(model, optimizer, unlearn, cfg.br, seed=seed + 2, epoch=epoch, sign=-1.0,
                                 device=device)
            ascent_descent_epoch(model, optimizer, relearn, cfg.br, seed=seed + 3, epoch=epoch, sign=1.0,
                                 device=device)
        self.final_model_ = model.eval()
        return self


# -- DBD ------------------------------------------------------------------------------------------


class SimCLRConfig(BaseModel):
    """Stage 1: self-supervised contrastive learning of the backbone on the images, labels unused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(0.4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    temperature: float = Field(0.5, gt=0)
    proj_dim: int = Field(128, ge=1, description="output size of the 2-layer projection head (dropped afterwards)")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random resized crop: range of the area kept")
    jitter: float = Field(0.4, ge=0, lt=1, description="brightness and contrast factors drawn from U(1-j, 1+j)")
    jitter_prob: float = Field(0.8, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> SimCLRConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self


class LinearStageConfig(BaseModel):
    """Stage 2: the backbone frozen, a fresh linear head trained with symmetric cross-entropy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.002, gt=0, description="Adam")
    alpha: float = Field(0.1, ge=0, description="weight of CE in SCE")
    beta: float = Field(1.0, ge=0, description="weight of reverse CE in SCE")


class SemiConfig(BaseModel):
    """Stage 4: the whole model finetuned, credible samples labeled, the others unlabeled (MixMatch-like)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(190, ge=1)
    batch_size: int = Field(64, ge=1, description="labeled and unlabeled samples per step, each")
    lr: float = Field(0.002, gt=0, description="Adam")
    lambda_u: float = Field(15.0, ge=0, description="weight of the unlabeled consistency loss")
    temperature: float = Field(0.5, gt=0, description="sharpening of the guessed labels")
    views: int = Field(2, ge=1, description="augmented views averaged to guess an unlabeled sample's label")
    augment: Augment = Augment(crop_padding=2, hflip=True)


class DBDConfig(PoisonedTrainingConfig):
    """Backdoor defense via decoupling the training process. Defaults: the paper's CIFAR-10 settings
    as we recall them (check docs/defenses.md before quoting them)."""

    name: Literal["dbd"] = "dbd"
    simclr: SimCLRConfig = SimCLRConfig()
    linear: LinearStageConfig = LinearStageConfig()
    credible_ratio: float = Field(0.5, gt=0, lt=1, description="fraction with the lowest SCE loss kept labeled")
    semi: SemiConfig = SemiConfig()


def simclr_view(x: torch.Tensor, config: SimCLRConfig, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR view per image, batched: random resized crop + flip (one affine warp), then brightness
    and contrast jitter. Channel-count agnostic, so it also serves grey-scale sets (no hue jitter)."""
    b = len(x)
    lo, hi = config.crop_scale
    area = lo + (hi - lo) * torch.rand(b, generator=generator)
    log_ratio = (torch.rand(b, generator=generator) * 2 - 1) * math.log(4 / 3)
    sw = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width / image width
    sh = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sw)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([sw * flip, zero, tx], 1), torch.stack([zero, sh, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    on = (torch.rand(b, generator=generator) < config.jitter_prob).float()[:, None, None, None]
    bright = 1 + (torch.rand(b, generator=generator) * 2 - 1)[:, None, None, None] * config.jitter * on
    contrast = 1 + (torch.rand(b, generator=generator) * 2 - 1)[:, None, None, None] * config.jitter * on
    mean = out.mean((1, 2, 3), keepdim=True)
    return (((out - mean) * contrast.to(x.device) + mean) * bright.to(x.device)).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the other 2B - 1 views of the batch."""
    b = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, partner)


def symmetric_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Per-sample SCE (Wang et al., 2019): alpha CE + beta reverse CE, with log 0 clipped to log 1e-4,
    so reverse CE = -log(1e-4) (1 - p_y): bounded, hence robust to the wrong labels of poisons."""
    logp = F.log_softmax(logits.float(), dim=1)
    ce = F.nll_loss(logp, labels, reduction="none")
    rce = -math.log(1e-4) * (1 - logp.exp().gather(1, labels[:, None])[:, 0])
    return alpha * ce + beta * rce


class _FeatureTap:
    """The input of the model's last linear layer during a forward, with gradients (its backbone output)."""

    def __init__(self, model: nn.Module) -> None:
        self.head = last_linear(model)
        self.value: torch.Tensor | None = None
        self._handle = self.head.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        self.value = inputs[0].flatten(1)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        model(x)
        assert self.value is not None
        return self.value

    def close(self) -> None:
        self._handle.remove()


def train_simclr(
    model: nn.Module, images: np.ndarray, config: SimCLRConfig, *, seed: int, device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Stage 1: contrastive training of everything below the last linear layer (in place)."""
    tap = _FeatureTap(model)
    dim = tap.head.in_features
    proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, config.proj_dim)).to(device)
    params = [p for n, p in model.named_parameters() if not any(p is q for q in tap.head.parameters())]
    optimizer = torch.optim.SGD([*params, *proj.parameters()], lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(images) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    data = torch.from_numpy(images)
    try:
        for epoch in range(config.epochs):
            gen = augment_generator(seed, epoch)
            model.train()
            total = 0.0
            for idx in worker_batches(len(images), config.batch_size, seed=seed, epoch=epoch):
                if len(idx) < 2:  # a lone sample has no negatives
                    continue
                x = to_float(data[idx])
                v1 = simclr_view(x, config, gen).to(device)
                v2 = simclr_view(x, config, gen).to(device)
                loss = nt_xent(proj(tap(model, v1)), proj(tap(model, v2)), config.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach())
            if on_epoch is not None:
                on_epoch(epoch, total)
    finally:
        tap.close()
    return model


def train_linear_head(
    model: nn.Module, data: ImageSet, config: LinearStageConfig, *, seed: int, device: torch.device
) -> np.ndarray:
    """Stage 2: a fresh last linear layer on frozen backbone features with SCE; returns each sample's
    SCE loss under the trained head (N,), the credibility score of stage 3 (low = credible)."""
    feats_np, _ = penultimate_features(model, data.images)  # once, eval mode: the backbone is frozen
    feats, labels = torch.from_numpy(feats_np).to(device), torch.from_numpy(data.labels).to(device)
    head = last_linear(model)
    torch.manual_seed(seed)
    head.reset_parameters()
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
    for epoch in range(config.epochs):
        for idx in worker_batches(len(data), config.batch_size, seed=seed, epoch=epoch):
            loss = symmetric_cross_entropy(head(feats[idx]), labels[idx], config.alpha, config.beta).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return symmetric_cross_entropy(head(feats), labels, config.alpha, config.beta).cpu().numpy()


def train_semi_supervised(
    model: nn.Module, data: ImageSet, credible: np.ndarray, config: SemiConfig, *, seed: int, device: torch.device
) -> nn.Module:
    """Stage 4: CE on the credible (labeled) samples plus lambda_u x the squared distance between the
    model's outputs on augmented unlabeled samples and their sharpened guessed labels (MixMatch's
    label guessing and unlabeled loss, without its MixUp)."""
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    lab_idx, unl_idx = torch.from_numpy(np.flatnonzero(credible)), torch.from_numpy(np.flatnonzero(~credible))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    for epoch in range(config.epochs):
        gen = augment_generator(seed, epoch)
        unl_order = epoch_order(len(unl_idx), seed=seed + 1, epoch=epoch) if len(unl_idx) else None
        model.train()
        for step, batch in enumerate(worker_batches(len(lab_idx), config.batch_size, seed=seed, epoch=epoch)):
            idx = lab_idx[batch]
            x = augment_batch(to_float(images[idx]), config.augment, gen).to(device)
            loss = F.cross_entropy(model(x).float(), labels[idx].to(device))
            if unl_order is not None and config.lambda_u > 0:
                take = unl_order[(step * config.batch_size + torch.arange(config.batch_size)) % len(unl_idx)]
                xu = to_float(images[unl_idx[take]])
                views = [augment_batch(xu, config.augment, gen).to(device) for _ in range(config.views)]
                with torch.no_grad():  # label guessing is a target, not a path for gradients
                    guess = torch.stack([F.softmax(model(v).float(), 1) for v in views]).mean(0)
                    guess = guess ** (1 / config.temperature)
                    guess = guess / guess.sum(1, keepdim=True)
                probs = torch.stack([F.softmax(model(v).float(), 1) for v in views])  # (K, B, C)
                loss = loss + config.lambda_u * ((probs - guess) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


@register_poisoned_training("dbd")
class DBD(_TrainsModels):
    """Fitted state: ``sce_loss_`` (stage 2 loss per sample), ``credible_`` (mask), ``final_model_``."""

    Config = DBDConfig
    config: DBDConfig

    def fit(self, poisoned: ImageSet, *, seed: int, device: str | torch.device = "cpu") -> DBD:
        cfg, device = self.config, torch.device(device)
        model = self._new_model(seed).to(device)
        train_simclr(model, poisoned.images, cfg.simclr, seed=seed, device=device)
        self.sce_loss_ = train_linear_head(model, poisoned, cfg.linear, seed=seed + 1, device=device)
        self.credible_ = lowest_fraction(self.sce_loss_, cfg.credible_ratio)
        self.final_model_ = train_semi_supervised(model, poisoned, self.credible_, cfg.semi, seed=seed + 2,
                                                  device=device).eval()
        return self
