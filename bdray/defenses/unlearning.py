"""Repairs that optimize against the backdoor first: Neural Cleanse, ANP and I-BAU.

Each is a :class:`~bdray.defenses.repair.Repair` (``fit`` -> ``repaired_``, input model untouched).
Every random draw (batches, initial masks, perturbations) comes from generators seeded by ``fit``'s
seed, so a repair is reproducible on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from bdray.data.base import ImageSet
from bdray.defenses.layers import as_float, bn_layers, model_device
from bdray.defenses.repair import Repair, RepairConfig, register_repair
from bdray.train import TrainRecipe, fit


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with no parameter gradients (restored on exit)."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``steps`` batches drawn as consecutive slices of seeded shuffles (an epoch-like pass)."""
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


# -- Neural Cleanse -------------------------------------------------------------------------------

NC_UNLEARN_RECIPE = TrainRecipe(
    epochs=1, batch_size=64, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="constant"
)


class NeuralCleanseConfig(RepairConfig):
    steps: int = Field(1000, ge=1, description="optimization steps (every class's trigger is optimized at once)")
    batch_size: int = Field(32, ge=1, description="clean images per step and class")
    lr: float = Field(0.1, gt=0, description="Adam learning rate of mask and pattern")
    init_cost: float = Field(1e-3, ge=0, description="initial weight of the mask's L1 norm")
    cost_multiplier: float = Field(1.5, gt=1, description="cost x this when the trigger works, / this^1.5 when not")
    patience: int = Field(5, ge=1, description="checks in a row before the cost changes")
    check_every: int = Field(10, ge=1, description="steps between checks of the trigger's success rate")
    attack_threshold: float = Field(0.99, gt=0, le=1, description="success rate a reversed trigger must reach")
    anomaly_threshold: float = Field(2.0, gt=0, description="flag classes whose anomaly index exceeds this")
    unlearn_fraction: float = Field(0.2, gt=0, le=1, description="share of the clean set stamped with the trigger")
    unlearn: TrainRecipe = Field(NC_UNLEARN_RECIPE, description="finetuning on the stamped set (A.4: lr 1e-2, 1 epoch)")


def anomaly_index(norms: np.ndarray) -> np.ndarray:
    """|norm - median| / (1.4826 * MAD): 1.4826 makes the MAD a consistent std estimate under normality."""
    norms = np.asarray(norms, dtype=np.float64)
    med = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - med))
    return np.abs(norms - med) / max(mad, 1e-12)


@register_repair("neural_cleanse")
class NeuralCleanse(Repair):
    """Wang et al., S&P 2019: reverse-engineer, for every class, the smallest mask (and pattern) that
    sends clean images there; a class whose mask is an outlier on the small side (anomaly index > 2
    by the MAD) is the target. Unlearn by finetuning on clean images stamped with its reversed trigger
    and labelled correctly. A model with no flagged class is returned unchanged."""

    Config = NeuralCleanseConfig
    config: NeuralCleanseConfig

    def __init__(self, config: NeuralCleanseConfig) -> None:
        super().__init__(config)
        self.masks_: torch.Tensor | None = None  # (K, 1, H, W)
        self.patterns_: torch.Tensor | None = None  # (K, C, H, W)
        self.reached_: np.ndarray | None = None  # (K,) the trigger reached attack_threshold
        self.norms_: np.ndarray | None = None
        self.anomaly_: np.ndarray | None = None
        self.flagged_: list[int] = []
        self.target_: int | None = None

    def reverse_triggers(self, model: nn.Module, clean: ImageSet, *, seed: int) -> None:
        """Optimize K masks and patterns jointly: one forward pass covers every class's candidates."""
        cfg = self.config
        k = clean.num_classes
        device = model_device(model)
        x = as_float(clean.images, device)
        _, c, h, w = x.shape
        gen = torch.Generator().manual_seed(seed)

        def init(shape: tuple[int, ...]) -> torch.Tensor:
            # Uniform in [0, 1] after the tanh squashing below.
            u = torch.rand(shape, generator=gen) * 2 - 1
            return torch.atanh(u * 0.99).to(device).requires_grad_(True)

        mask_p, pattern_p = init((k, 1, h, w)), init((k, c, h, w))
        opt = torch.optim.Adam([mask_p, pattern_p], lr=cfg.lr, betas=(0.5, 0.9))
        targets = torch.arange(k, device=device)
        cost = torch.full((k,), cfg.init_cost, device=device)
        best_norm = torch.full((k,), float("inf"), device=device)
        best_mask = torch.zeros(k, 1, h, w, device=device)
        best_pattern = torch.zeros(k, c, h, w, device=device)
        up = torch.zeros(k, dtype=torch.long, device=device)
        down = torch.zeros(k, dtype=torch.long, device=device)
        hits = torch.zeros(k, device=device)
        seen = 0
        rng = np.random.default_rng(seed)
        with frozen(model):
            for step, idx in enumerate(_batches(len(x), min(cfg.batch_size, len(x)), cfg.steps, rng), start=1):
                mask, pattern = (torch.tanh(mask_p) + 1) / 2, (torch.tanh(pattern_p) + 1) / 2
                xb = x[torch.from_numpy(idx).to(device)]
                stamped = (1 - mask[:, None]) * xb[None] + (mask * pattern)[:, None]  # (K, B, C, H, W)
                logits = model(stamped.flatten(0, 1)).view(k, len(idx), -1)
                ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat_interleave(len(idx)), reduction="none")
                l1 = mask.flatten(1).sum(1)
                loss = (ce.view(k, -1).mean(1) + cost * l1).sum()  # classes share no parameters: sum = K problems
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    hits += (logits.argmax(2) == targets[:, None]).float().sum(1)
                    seen += len(idx)
                    if step % cfg.check_every:
                        continue
                    rate, hits, seen = hits / seen, torch.zeros_like(hits), 0
                    ok = rate >= cfg.attack_threshold
                    better = ok & (l1 < best_norm)
                    best_norm = torch.where(better, l1, best_norm)
                    best_mask[better], best_pattern[better] = mask[better], pattern[better]
                    # NC's cost schedule: raise the L1 weight while the trigger keeps working, lower it
                    # (faster) while it does not, so each mask shrinks to the edge of working.
                    up, down = torch.where(ok, up + 1, 0), torch.where(ok, 0, down + 1)
                    cost = torch.where(up >= cfg.patience, cost * cfg.cost_multiplier, cost)
                    cost = torch.where(down >= cfg.patience, cost / cfg.cost_multiplier**1.5, cost)
                    up, down = torch.where(up >= cfg.patience, 0, up), torch.where(down >= cfg.patience, 0, down)
        with torch.no_grad():
            mask, pattern = (torch.tanh(mask_p) + 1) / 2, (torch.tanh(pattern_p) + 1) / 2
            reached = torch.isfinite(best_norm)
            best_mask[~reached], best_pattern[~reached] = mask[~reached], pattern[~reached]
        self.masks_, self.patterns_ = best_mask.cpu(), best_pattern.cpu()
        self.reached_ = reached.cpu().numpy()
        self.norms_ = self.masks_.flatten(1).sum(1).numpy()

    def detect(self) -> list[int]:
        """Classes whose mask norm is an outlier below the median, most anomalous first."""
        self.anomaly_ = anomaly_index(self.norms_)
        below = self.norms_ < np.median(self.norms_)
        flagged = np.flatnonzero((self.anomaly_ > self.config.anomaly_threshold) & below)
        self.flagged_ = [int(c) for c in flagged[np.argsort(-self.anomaly_[flagged])]]
        return self.flagged_

    def stamp(self, images: np.ndarray, target: int) -> np.ndarray:
        """uint8 images with class ``target``'s reversed trigger."""
        x = as_float(images)
        out = (1 - self.masks_[target]) * x + self.masks_[target] * self.patterns_[target]
        return (out.clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    def _repair(self, model: nn.Module, clean: ImageSet, *, seed: int) -> nn.Module:
        self.reverse_triggers(model, clean, seed=seed)
        flagged = self.detect()
        self.target_ = flagged[0] if flagged else None
        if self.target_ is None:
            return model
        rng = np.random.default_rng(seed + 1)
        pick = rng.choice(len(clean), round(self.config.unlearn_fraction * len(clean)), replace=False)
        images = clean.images.copy()
        images[pick] = self.stamp(images[pick], self.target_)
        return fit(model, clean.replace(images=images), self.config.unlearn, seed=seed, device=model_device(model))


# -- ANP ------------------------------------------------------------------------------------------


class ANPConfig(RepairConfig):
    eps: float = Field(0.4, ge=0, lt=1, description="bound of the multiplicative neuron perturbation")
    pgd_steps: int = Field(1, ge=1, description="ascent steps on the perturbation per iteration")
    alpha: float = Field(0.2, ge=0, le=1, description="weight of the natural loss (1 - alpha: perturbed loss)")
    mask_lr: float = Field(0.2, gt=0, description="SGD (momentum 0.9) learning rate of the neuron masks")
    iterations: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    threshold: float = Field(0.2, ge=0, le=1, description="prune neurons whose mask ends below this")


class _BNPerturbation:
    """Masks and perturbations of every BN neuron, applied through forward hooks.

    A hooked BN outputs x_hat * gamma * (m + delta) + beta * (1 + xi) with x_hat normalized by the
    running statistics; the model's own parameters never change until pruning.
    """

    def __init__(self, layers: list[nn.BatchNorm2d], device: torch.device) -> None:
        self.layers = layers
        self.masks = [torch.ones(m.num_features, device=device, requires_grad=True) for m in layers]
        self.d_weight = [torch.zeros(m.num_features, device=device, requires_grad=True) for m in layers]
        self.d_bias = [torch.zeros(m.num_features, device=device, requires_grad=True) for m in layers]
        self.perturb = False
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor], _out: torch.Tensor) -> torch.Tensor:
            x_hat = F.batch_norm(inputs[0], module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
            scale = self.masks[i] + (self.d_weight[i] if self.perturb else 0)
            shift = 1 + self.d_bias[i] if self.perturb else 1
            return x_hat * (module.weight * scale).view(1, -1, 1, 1) + (module.bias * shift).view(1, -1, 1, 1)

        return hook

    def perturbations(self) -> list[torch.Tensor]:
        return self.d_weight + self.d_bias

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@register_repair("anp")
class ANP(Repair):
    """Wu & Wang, NeurIPS 2021: backdoor neurons are the ones whose small multiplicative perturbation
    wrecks the clean loss. Learn a [0, 1] mask per BN neuron that keeps the loss low under the worst
    such perturbation (min over masks, max over perturbations), then prune neurons whose mask fell
    below the threshold (their BN weight and bias are set to 0)."""

    Config = ANPConfig
    config: ANPConfig

    def __init__(self, config: ANPConfig) -> None:
        super().__init__(config)
        self.masks_: dict[str, np.ndarray] = {}
        self.pruned_: dict[str, np.ndarray] = {}

    def _repair(self, model: nn.Module, clean: ImageSet, *, seed: int) -> nn.Module:
        cfg = self.config
        named = bn_layers(model)
        if not named:
            raise ValueError("ANP perturbs BatchNorm neurons; this model has no BatchNorm2d layer")
        device = model_device(model)
        x = as_float(clean.images, device)
        y = torch.from_numpy(clean.labels).to(device)
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        with frozen(model):
            state = _BNPerturbation([m for _, m in named], device)
            opt = torch.optim.SGD(state.masks, lr=cfg.mask_lr, momentum=0.9)
            try:
                for idx in _batches(len(x), min(cfg.batch_size, len(x)), cfg.iterations, rng):
                    xb, yb = x[torch.from_numpy(idx).to(device)], y[torch.from_numpy(idx).to(device)]
                    if cfg.eps > 0:
                        self._worst_perturbation(model, state, xb, yb, gen)
                    state.perturb = False
                    loss = cfg.alpha * F.cross_entropy(model(xb), yb)
                    if cfg.eps > 0:
                        state.perturb = True
                        loss = loss + (1 - cfg.alpha) * F.cross_entropy(model(xb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for m in state.masks:
                            m.clamp_(0, 1)
            finally:
                state.remove()
        with torch.no_grad():
            for (name, bn), mask in zip(named, state.masks, strict=True):
                self.masks_[name] = mask.detach().cpu().numpy()
                index = torch.nonzero(mask < cfg.threshold).flatten()
                if len(index):
                    bn.weight[index], bn.bias[index] = 0, 0
                    self.pruned_[name] = index.cpu().numpy()
        return model

    def _worst_perturbation(
        self, model: nn.Module, state: _BNPerturbation, xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator
    ) -> None:
        """Random start in [-eps, eps], then signed ascent steps on the clean loss (ANP's inner max)."""
        eps = self.config.eps
        with torch.no_grad():
            for d in state.perturbations():
                d.copy_((torch.rand(d.shape, generator=gen) * 2 - 1).mul_(eps))
        state.perturb = True
        for _ in range(self.config.pgd_steps):
            loss = F.cross_entropy(model(xb), yb)
            grads = torch.autograd.grad(loss, state.perturbations())
            with torch.no_grad():
                for d, g in zip(state.perturbations(), grads, strict=True):
                    d.add_(g.sign(), alpha=eps / self.config.pgd_steps).clamp_(-eps, eps)


# -- I-BAU ----------------------------------------------------------------------------------------


class IBAUConfig(RepairConfig):
    rounds: int = Field(5, ge=1, description="passes over the clean set")
    batch_size: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the model (outer minimization)")
    radius: float = Field(10.0, gt=0, description="L2 bound of the universal perturbation, in [0, 1] pixel units")
    inner_steps: int = Field(5, ge=1, description="normalized-gradient ascent steps of the inner maximization")
    inner_step_size: float = Field(0.4, gt=0, description="ascent step, as a fraction of the radius")
    fixed_point_iters: int = Field(5, ge=0, description="terms of the Neumann series of the implicit gradient")
    fixed_point_lr: float = Field(0.1, gt=0, description="step of the fixed-point map delta + lr * grad_delta L")


def _project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    norm = delta.norm()
    return delta * (radius / norm) if norm > radius else delta


@register_repair("i_bau")
class IBAU(Repair):
    """Zeng et al., ICLR 2022: min over the model of max over one universal perturbation (norm-bounded)
    of the clean-set loss, solved with the implicit hypergradient: the model's update accounts for how
    the worst perturbation moves when the model moves, via the fixed point of the inner ascent map
    (Neumann-series approximation of the inverse Jacobian)."""

    Config = IBAUConfig
    config: IBAUConfig

    def __init__(self, config: IBAUConfig) -> None:
        super().__init__(config)
        self.delta_: torch.Tensor | None = None  # the last universal perturbation found

    def _inner_max(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        delta = torch.zeros_like(xb[0])
        for _ in range(cfg.inner_steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                step = g / g.norm().clamp_min(1e-12) * cfg.inner_step_size * cfg.radius
                delta = _project(delta + step, cfg.radius)
        return delta.detach()

    def _hypergradient(
        self, model: nn.Module, params: list[nn.Parameter], xb: torch.Tensor, yb: torch.Tensor, delta: torch.Tensor
    ) -> list[torch.Tensor]:
        """d/dtheta L(theta, delta*(theta)) = dL/dtheta + (dPhi/dtheta)^T (I - dPhi/ddelta)^-T dL/ddelta."""
        cfg = self.config
        delta = delta.clone().requires_grad_(True)
        outer = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
        grads = torch.autograd.grad(outer, [*params, delta], allow_unused=True)
        direct, v = list(grads[:-1]), grads[-1]
        if cfg.fixed_point_iters == 0:
            return [torch.zeros_like(p) if g is None else g for p, g in zip(params, direct, strict=True)]
        inner = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
        (g_delta,) = torch.autograd.grad(inner, delta, create_graph=True)
        phi = delta + cfg.fixed_point_lr * g_delta  # the ascent map whose fixed point is delta*
        w, p = v, v
        for _ in range(cfg.fixed_point_iters):
            (p,) = torch.autograd.grad(phi, delta, grad_outputs=p, retain_graph=True)
            w = w + p
        indirect = torch.autograd.grad(phi, params, grad_outputs=w, allow_unused=True)
        total = []
        for q, d, i in zip(params, direct, indirect, strict=True):
            g = torch.zeros_like(q)  # a parameter the loss does not reach (allow_unused) gets no update
            total.append(g + (d if d is not None else 0) + (i if i is not None else 0))
        return total

    def _repair(self, model: nn.Module, clean: ImageSet, *, seed: int) -> nn.Module:
        cfg = self.config
        device = model_device(model)
        x = as_float(clean.images, device)
        y = torch.from_numpy(clean.labels).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        rng = np.random.default_rng(seed)
        steps = cfg.rounds * -(-len(x) // cfg.batch_size)
        # BN stays in eval mode: perturbed batches must not rewrite the running statistics, and the
        # second-order terms are taken through a fixed normalization.
        model.eval()
        for idx in _batches(len(x), min(cfg.batch_size, len(x)), steps, rng):
            t = torch.from_numpy(idx).to(device)
            xb, yb = x[t], y[t]
            delta = self._inner_max(model, xb, yb)
            grads = self._hypergradient(model, params, xb, yb, delta)
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.detach()
            opt.step()
            self.delta_ = delta.cpu()
        return model


__all__ = [
    "ANP",
    "IBAU",
    "ANPConfig",
    "IBAUConfig",
    "NeuralCleanse",
    "NeuralCleanseConfig",
    "anomaly_index",
]
