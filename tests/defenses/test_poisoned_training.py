"""The poisoned-training baselines (ABL, D-BR, DBD, CutMix) on tiny generated data.

Two poisoned sets, 10% BadNet (white 3x3 patch, target 0), a width-8 compact CNN:

- *low contrast* (10 classes, 1,000 16x16 images at a fifth of the synthetic set's contrast plus noise):
  the clean task is slow to learn and the patch is loud, the regime ABL and D-BR assume (poisons are
  fitted first / are the transformation-sensitive ones);
- *plain* (4 classes, 600 images): class content dominates the images, the regime DBD's self-supervised
  features need (poisons stay near their source class, so their target label looks wrong).

Budgets are shrunk to seconds (epochs, and learning rates raised to match), never the logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from bdray import metrics
from bdray.attacks import build_attack, poison_dataset, triggered_testset
from bdray.data import ImageSet, get_dataset
from bdray.defenses.advrbd import get_poisoned_training, list_poisoned_training
from bdray.defenses.poisoned_training import (
    ABLConfig,
    CutMixConfig,
    DBDConfig,
    DBRConfig,
    SimCLRConfig,
    cutmix,
    cutmix_params,
    fct_scores,
    lga_loss,
    nt_xent,
    simclr_view,
    soft_cross_entropy,
    symmetric_cross_entropy,
)
from bdray.models import ModelSpec
from bdray.train import predict_proba


@dataclass(frozen=True)
class Poisoned:
    data: ImageSet
    is_poison: np.ndarray
    test: ImageSet
    triggered: ImageSet
    spec: ModelSpec

    def ca_asr(self, model: nn.Module) -> tuple[float, float]:
        ca = metrics.accuracy(predict_proba(model, self.test.images).argmax(1), self.test.labels)
        asr = metrics.accuracy(predict_proba(model, self.triggered.images).argmax(1), self.triggered.labels)
        return ca, asr


def _poison(train: ImageSet, test: ImageSet, num_classes: int) -> Poisoned:
    attack = build_attack({"name": "badnet", "poison_rate": 0.1, "target": 0, "pattern": "white"},
                          image_shape=train.image_shape, num_classes=num_classes)
    poisoned = poison_dataset(train, attack, seed=0)
    triggered, _ = triggered_testset(test, attack)
    spec = ModelSpec(name="compact_cnn", in_channels=1, num_classes=num_classes, image_size=16, kwargs={"width": 8})
    return Poisoned(poisoned.data, poisoned.is_poison, test, triggered, spec)


@pytest.fixture(scope="module")
def low_contrast() -> Poisoned:
    torch.set_num_threads(1)
    pair = get_dataset("synthetic", num_classes=10, image_size=16, train_size=1000, test_size=300, noise=20.0, seed=1)

    def soften(images: np.ndarray, seed: int) -> np.ndarray:
        noise = np.random.default_rng(seed).normal(0, 30, images.shape)
        return np.clip(128 + (images.astype(np.float32) - 128) * 0.2 + noise, 0, 255).astype(np.uint8)

    return _poison(pair.train.replace(images=soften(pair.train.images, 1)),
                   pair.test.replace(images=soften(pair.test.images, 2)), 10)


@pytest.fixture(scope="module")
def plain() -> Poisoned:
    torch.set_num_threads(1)
    pair = get_dataset("synthetic", num_classes=4, image_size=16, train_size=600, test_size=300, seed=1)
    return _poison(pair.train, pair.test, 4)


# -- configuration --------------------------------------------------------------------------------


def test_registered_with_the_papers_defaults() -> None:
    assert {"abl", "dbr", "dbd", "cutmix"} <= set(list_poisoned_training())
    abl = get_poisoned_training({"name": "abl"}).config
    assert isinstance(abl, ABLConfig) and abl.gamma == 0.5 and abl.isolation_ratio == 0.01
    assert abl.isolation.epochs == 20 and abl.unlearn.lr == 5e-4
    dbr = get_poisoned_training({"name": "dbr"}).config
    assert isinstance(dbr, DBRConfig) and (dbr.clean_ratio, dbr.poison_ratio) == (0.2, 0.05)
    dbd = get_poisoned_training({"name": "dbd"}).config
    assert isinstance(dbd, DBDConfig) and dbd.credible_ratio == 0.5 and dbd.linear.alpha == 0.1
    mix = get_poisoned_training({"name": "cutmix"}).config
    assert isinstance(mix, CutMixConfig) and (mix.prob, mix.beta) == (0.5, 1.0)
    for config in (abl, dbr, dbd, mix):  # a dumped config validates back to itself (MLflow params, stage keys)
        assert type(config).model_validate(config.model_dump(mode="json")) == config


def test_bad_configs_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match=r"isolation_ratioo\n  Extra inputs are not permitted"):
        get_poisoned_training({"name": "abl", "isolation_ratioo": 0.05})
    with pytest.raises(ValidationError, match=r"isolation_ratio\n  Input should be less than 1"):
        get_poisoned_training({"name": "abl", "isolation_ratio": 1.5})
    with pytest.raises(ValidationError, match="would overlap"):
        get_poisoned_training({"name": "dbr", "clean_ratio": 0.9, "poison_ratio": 0.2})
    with pytest.raises(ValidationError, match="crop_scale must satisfy"):
        get_poisoned_training({"name": "dbd", "simclr": {"crop_scale": [0.8, 0.2]}})
    with pytest.raises(ValidationError, match=r"semi.lambda_uu\n  Extra inputs"):
        get_poisoned_training({"name": "dbd", "semi": {"lambda_uu": 1.0}})
    with pytest.raises(KeyError, match="unknown poisoned-training defense 'abll'.*abl, advrbd"):
        get_poisoned_training({"name": "abll"})


def test_a_defense_without_a_model_builder_says_how_to_give_one(plain: Poisoned) -> None:
    with pytest.raises(RuntimeError, match=r"CutMix\(config, build\) or .set_builder"):
        get_poisoned_training({"name": "cutmix"}).fit(plain.data, seed=0)


# -- ABL ------------------------------------------------------------------------------------------


def test_lga_loss_turns_descent_into_ascent_below_gamma() -> None:
    labels = torch.tensor([0, 0])
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.0]], requires_grad=True)  # CE 0.018 (fitted) and 0.69
    ce = F.cross_entropy(logits, labels, reduction="none")
    loss = lga_loss(logits, labels, gamma=0.5)
    assert loss.item() == pytest.approx(((-ce[0] + ce[1]) / 2).item())
    loss.backward()
    # Descending this loss lowers the true-class logit of the fitted sample and raises the other's.
    assert logits.grad[0, 0] > 0 and logits.grad[1, 0] < 0


@pytest.fixture(scope="module")
def abl_run(low_contrast: Poisoned):
    config = {"name": "abl", "isolation": {"epochs": 4, "batch_size": 64, "lr": 0.01, "schedule": "constant"},
              "isolation_ratio": 0.05, "finetune": {"epochs": 3, "batch_size": 64, "lr": 0.01},
              "unlearn": {"epochs": 5, "batch_size": 64, "lr": 0.01, "schedule": "constant"}}
    return get_poisoned_training(config).set_builder(low_contrast.spec.build).fit(low_contrast.data, seed=0)


def test_abl_isolates_poisons_by_their_low_loss(low_contrast: Poisoned, abl_run) -> None:
    isolated = abl_run.isolated_
    assert isolated.sum() == 50  # 5% of 1,000
    # 10% of the set is poisoned; the isolated set must be mostly poisons (1.0 for seeds 0-2).
    assert low_contrast.is_poison[isolated].mean() >= 0.8
    assert abl_run.losses_[low_contrast.is_poison].mean() < abl_run.losses_[~low_contrast.is_poison].mean()


def test_abl_unlearning_removes_the_backdoor_and_keeps_accuracy(low_contrast: Poisoned, abl_run) -> None:
    ca_before, asr_before = low_contrast.ca_asr(abl_run.finetuned_model_)
    ca_after, asr_after = low_contrast.ca_asr(abl_run.repair())
    assert asr_before > 0.9, "the backdoor did not survive finetuning: nothing left to unlearn"
    assert asr_after < asr_before - 0.3
    assert ca_after > ca_before - 0.1


# -- CutMix ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_label_weights_are_the_pasted_box_areas(seed: int) -> None:
    b, h, w = 8, 12, 10
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, h, w).clone() / b  # image i is i/B
    labels = torch.arange(b) % 4
    before = x.clone()
    params = cutmix_params(b, h, w, prob=1.0, beta=1.0, generator=torch.Generator().manual_seed(seed))
    mixed, targets = cutmix(x, labels, params, num_classes=4)
    assert torch.equal(x, before), "cutmix must not modify its input"
    for i in range(b):
        j = int(params.perm[i])
        partner_share = float((mixed[i] == x[j, 0, 0, 0]).float().mean()) if j != i else 0.0
        lam = params.kept(h, w)
        if j != i:
            assert partner_share == pytest.approx(1 - lam)
        expected = torch.zeros(4)
        expected[labels[i]] += lam
        expected[labels[j]] += 1 - lam
        torch.testing.assert_close(targets[i], expected)
    assert targets.sum(1).allclose(torch.ones(b))


def test_cutmix_soft_loss_is_the_area_weighted_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(3)
    x, labels = torch.rand(6, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    params = cutmix_params(6, 8, 8, prob=1.0, beta=1.0, generator=gen)
    _, targets = cutmix(x, labels, params, num_classes=3)
    logits = torch.randn(6, 3, generator=gen)
    lam = params.kept(8, 8)
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[params.perm])
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)
    unmixed = cutmix_params(6, 8, 8, prob=0.0, beta=1.0, generator=gen)
    same, onehot = cutmix(x, labels, unmixed, num_classes=3)
    assert torch.equal(same, x) and torch.equal(onehot.argmax(1), labels) and unmixed.kept(8, 8) == 1.0


def test_cutmix_beta_sets_the_spread_of_the_kept_share() -> None:
    gen = torch.Generator().manual_seed(0)

    def kept(beta: float) -> np.ndarray:
        return np.array([cutmix_params(4, 32, 32, prob=1.0, beta=beta, generator=gen).kept(32, 32)
                         for _ in range(300)])

    # Beta(1, 1) is uniform; border clipping and whole-pixel sides make the kept share larger and wider.
    uniform, peaked = kept(1.0), kept(100.0)
    assert 0.5 < uniform.mean() < 0.8 and uniform.min() < 0.15 and uniform.max() > 0.9
    assert peaked.min() > 0.4 and peaked.std() < 0.6 * uniform.std()


# -- D-BR -----------------------------------------------------------------------------------------


def test_fct_scores_do_not_depend_on_the_batch(plain: Poisoned) -> None:
    model = plain.spec.build().eval()
    images = plain.data.images[:40]
    whole = fct_scores(model, images, rotation=180, translate=0.1, seed=2)
    pieces = fct_scores(model, images, rotation=180, translate=0.1, seed=2, batch_size=7)
    np.testing.assert_allclose(whole, pieces, rtol=1e-5, atol=1e-7)
    assert not np.allclose(whole, fct_scores(model, images, rotation=180, translate=0.1, seed=3))


def test_dbr_unlearns_the_transformation_sensitive_samples(low_contrast: Poisoned) -> None:
    config = {"name": "dbr", "train": {"epochs": 6, "batch_size": 64}, "sd_train": {"epochs": 2, "batch_size": 64},
              "br": {"epochs": 5, "lr": 0.005, "batch_size": 64, "schedule": "constant"}}
    dbr = get_poisoned_training(config).set_builder(low_contrast.spec.build).fit(low_contrast.data, seed=0)
    assert dbr.unlearned_.sum() == 50 and dbr.relearned_.sum() == 200
    assert low_contrast.is_poison[dbr.unlearned_].mean() >= 0.8  # base rate 0.1
    assert low_contrast.is_poison[dbr.relearned_].mean() <= 0.02
    ca_before, asr_before = low_contrast.ca_asr(dbr.backdoored_model_)
    ca_after, asr_after = low_contrast.ca_asr(dbr.repair())
    assert asr_before > 0.9 and asr_after < asr_before - 0.5
    assert ca_after > ca_before - 0.15


# -- DBD ------------------------------------------------------------------------------------------


def test_nt_xent_rewards_matching_views() -> None:
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    matched = nt_xent(z, z + 0.01, temperature=0.1)
    shuffled = nt_xent(z, z[torch.randperm(16, generator=torch.Generator().manual_seed(1))], temperature=0.1)
    assert matched.item() < 0.1 < shuffled.item()


def test_symmetric_cross_entropy_bounds_the_penalty_of_a_wrong_label() -> None:
    logits = torch.tensor([[20.0, 0.0, 0.0], [0.0, 0.0, 20.0]])  # confident on class 0 and 2
    labels = torch.tensor([0, 0])
    loss = symmetric_cross_entropy(logits, labels, alpha=0.0, beta=1.0)
    assert loss[0].item() < 1e-6 and loss[1].item() == pytest.approx(-np.log(1e-4), rel=1e-4)


def test_simclr_views_are_seeded_valid_images_and_leave_the_input_alone(plain: Poisoned) -> None:
    x = torch.from_numpy(plain.data.images[:16]).float() / 255
    before = x.clone()
    config = SimCLRConfig()
    v1 = simclr_view(x, config, torch.Generator().manual_seed(0))
    again = simclr_view(x, config, torch.Generator().manual_seed(0))
    v2 = simclr_view(x, config, torch.Generator().manual_seed(1))
    assert torch.equal(x, before) and torch.equal(v1, again) and v1.shape == x.shape
    assert v1.min() >= 0 and v1.max() <= 1 and not torch.allclose(v1, v2)


def test_dbd_keeps_poisons_out_of_the_credible_set(plain: Poisoned) -> None:
    config = {"name": "dbd", "simclr": {"epochs": 5, "batch_size": 128, "lr": 0.1},
              "linear": {"epochs": 20, "lr": 0.01}, "semi": {"epochs": 4, "batch_size": 64, "lr": 0.005}}
    dbd = get_poisoned_training(config).set_builder(plain.spec.build).fit(plain.data, seed=0)
    assert dbd.credible_.sum() == 300
    # The self-supervised features keep poisons near their source class: label 0 fits them badly.
    assert dbd.sce_loss_[plain.is_poison].mean() > 3 * dbd.sce_loss_[~plain.is_poison].mean()
    assert plain.is_poison[dbd.credible_].mean() <= 0.01  # base rate 0.1
    ca, asr = plain.ca_asr(dbd.repair())
    assert ca > 0.6 and asr < 0.6


# -- reproducibility ------------------------------------------------------------------------------

TINY = {
    "abl": {"isolation": {"epochs": 1, "batch_size": 64}, "finetune": {"epochs": 1, "batch_size": 64},
            "unlearn": {"epochs": 1, "batch_size": 64}, "isolation_ratio": 0.05},
    "dbr": {"train": {"epochs": 1, "batch_size": 64}, "sd_train": {"epochs": 1, "batch_size": 64},
            "br": {"epochs": 1, "batch_size": 64, "lr": 0.01}},
    "dbd": {"simclr": {"epochs": 1, "batch_size": 128}, "linear": {"epochs": 2},
            "semi": {"epochs": 1, "batch_size": 64}},
    "cutmix": {"train": {"epochs": 1, "batch_size": 64}, "prob": 1.0},
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_same_seed_same_weights(plain: Poisoned, name: str) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        defense = get_poisoned_training({"name": name, **TINY[name]}).set_builder(plain.spec.build)
        return defense.fit(plain.data, seed=seed).repair().state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
