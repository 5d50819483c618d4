"""Post-development attacks: they change an already trained clean model instead of only its data.

- ``ft`` (BaDExpert's FT): finetune the clean model on its training set with ``poison_rate`` of it
  blend-poisoned (A.3: 20% injection, alpha 0.2).
- ``trojannn`` (Liu et al., NDSS 2018): pick an internal neuron of the clean model, optimize the
  pixels of a watermark-shaped patch so the neuron fires strongly, then retrain the model on the
  clean data with ``poison_rate`` of it carrying that trigger and the target label (A.3: 10%).

Both are attack classes (``post_training = True``) whose ``prepare`` may look at the model;
:func:`implant` runs prepare -> poison -> :func:`bdray.train.fit` on a copy of the model. Their
kernels also work as plain data-poisoning triggers, so every attack contract holds for them too.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from pydantic import Field
from torch import nn

from bdray.attacks.base import Attack, poison_dataset, register_attack
from bdray.attacks.patch import Blend, BlendConfig
from bdray.attacks.trojan import MaskedPatch, TrojanConfig
from bdray.data.base import ImageSet
from bdray.train import TrainRecipe, fit


class FTConfig(BlendConfig):
    poison_rate: float = Field(0.2, ge=0, lt=1, description="BaDExpert A.3: 20% injection ratio")
    alpha: float = Field(0.2, gt=0, le=1, description="BaDExpert A.3: 20% blending alpha")


@register_attack("ft")
class FT(Blend):
    """Finetune a clean model on blend-poisoned data."""

    Config = FTConfig
    config: FTConfig
    post_training = True


class TrojanNNConfig(TrojanConfig):
    poison_rate: float = Field(0.1, ge=0, lt=1, description="BaDExpert A.3: 10% injection ratio")
    neuron: int | None = Field(None, ge=0, description="penultimate-layer neuron; default: the most connected one")
    steps: int = Field(100, ge=1, description="gradient steps of the trigger optimization")
    lr: float = Field(0.1, gt=0, description="Adam learning rate of the trigger pixels (as logits)")
    probe_samples: int = Field(256, ge=1, description="clean images the neuron's activation is averaged over")


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("trojannn needs a model whose head is an nn.Linear (it probes the head's input)")
    return linears[-1]


@register_attack("trojannn")
class TrojanNN(MaskedPatch):
    """The Trojan watermark mask with pixels optimized against the clean model (after ``prepare``)."""

    Config = TrojanNNConfig
    config: TrojanNNConfig
    post_training = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        # The optimized pattern is what a stored attack needs to re-create its trigger.
        return {"pattern": self.pattern.contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> TrojanNN:
        if "pattern" in state:
            self.pattern = state["pattern"].float().clone()
        return self

    def prepare(self, model: nn.Module, clean: ImageSet, *, seed: int) -> TrojanNN:
        """Optimize the pattern inside the mask to maximize one penultimate neuron of ``model``.

        Liu et al. pick the neuron most strongly connected to its neighbour layer; here that is the
        input feature of the classifier head with the largest outgoing weight mass (L1 over classes).
        """
        cfg = self.config
        head = _last_linear(model)
        neuron = cfg.neuron if cfg.neuron is not None else int(head.weight.detach().abs().sum(0).argmax())
        if neuron >= head.in_features:
            raise ValueError(f"attack.neuron {neuron} is not below the head's {head.in_features} input features")
        device = next(model.parameters()).device
        take = np.sort(np.random.default_rng(seed).permutation(len(clean))[: cfg.probe_samples])
        x = torch.from_numpy(clean.images[take]).float().div(255).to(device)
        features: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
        was_training = model.training
        model.eval()
        logits = torch.logit(self.pattern.clamp(0.05, 0.95)).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=cfg.lr)
        s = cfg.patch_size
        mask = self.mask.to(device)
        try:
            for _ in range(cfg.steps):
                features.clear()
                stamped = x.clone()
                window = stamped[..., self.top : self.top + s, self.left : self.left + s]
                stamped[..., self.top : self.top + s, self.left : self.left + s] = (
                    (1 - mask) * window + mask * torch.sigmoid(logits)
                )
                model(stamped)
                loss = -features[0][:, neuron].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            hook.remove()
            model.train(was_training)
            for p in model.parameters():
                p.grad = None
        self.pattern = torch.sigmoid(logits.detach()).cpu()
        self.neuron_ = neuron
        return self


def implant(model: nn.Module, clean: ImageSet, attack: Attack, recipe: TrainRecipe, seed: int) -> nn.Module:
    """A backdoored copy of ``model``: the attack's prepare step, then ``fit`` on its poisoned ``clean``.

    ``model`` itself is left untouched; ``attack`` keeps what prepare made (TrojanNN's trigger), so
    ``triggered_testset(test, attack)`` measures the implanted backdoor afterwards.
    """
    if not attack.post_training:
        raise ValueError(f"attack '{attack.name}' is not a post-training attack; poison the data and train instead")
    backdoored = copy.deepcopy(model)
    attack.prepare(backdoored, clean, seed=seed)
    poisoned = poison_dataset(clean, attack, seed)
    return fit(backdoored, poisoned.data, recipe, seed=seed)
