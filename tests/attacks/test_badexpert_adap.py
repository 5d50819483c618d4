"""BaDExpert-Adap (App. C.7.3, Eq. 12-13) on tiny generated data with a BadNet-backdoored compact CNN.

The shared attack contract (tests/attacks/test_attacks.py) covers the kernel; these tests check what
``prepare`` claims: reproducible, M still follows the trigger, the backdoor expert does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from bdray.attacks import attack_class, build_attack, poison_dataset, triggered_testset
from bdray.attacks.badexpert_adap import BaDExpertAdap, surrogate_expert
from bdray.attacks.common import NotFittedError
from bdray.config import ConfigError, validate_config
from bdray.data import get_dataset
from bdray.models import get_model
from bdray.train import TrainRecipe, fit, predict_proba

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 16
TARGET = 0
# Small enough for a loaded 2-core machine; the optimization still converges on this data.
FAST = {"steps": 60, "batch_size": 64, "attacker_samples": 300, "eta": 1e-3, "poison_rate": 0.1}


@pytest.fixture(scope="module")
def pair():
    return get_dataset("synthetic", channels=1, image_size=SIZE, train_size=1000, test_size=600, noise=30.0)


def make(**overrides) -> BaDExpertAdap:
    config = {"name": "badexpert_adap", "target": TARGET, **FAST, **overrides}
    return build_attack(config, image_shape=(1, SIZE, SIZE), num_classes=10)


@pytest.fixture(scope="module")
def backdoored(pair) -> torch.nn.Module:
    """M: the compact CNN trained on the attack's BadNet-poisoned training set (10%)."""
    poisoned = poison_dataset(pair.train, make(), seed=0)
    torch.manual_seed(0)
    model = get_model("compact_cnn", in_channels=1, num_classes=10, image_size=SIZE, width=8)
    return fit(model, poisoned.data, TrainRecipe(epochs=4, batch_size=64, lr=0.05), seed=0).eval()


def target_rate(model: torch.nn.Module, images: np.ndarray, targets: np.ndarray) -> float:
    return float((predict_proba(model, images).argmax(1) == targets).mean())


# -- what the attack is ----------------------------------------------------------------------------


def test_flags_and_the_training_trigger_is_badnet() -> None:
    cls = attack_class("badexpert_adap")
    assert cls.needs_model and not cls.post_training and not cls.needs_fit and not cls.clean_label
    attack = make()
    badnet = build_attack({"name": "badnet"}, image_shape=(1, SIZE, SIZE), num_classes=10)
    x = torch.rand(4, 1, SIZE, SIZE)
    assert torch.equal(attack.apply(x), badnet.apply(x))
    assert torch.equal(attack.apply(x, cover=True), badnet.apply(x))
    # the paper's lambda grid is on the config; lambda_1 weighs B''s confidence, lambda_2 the mask norm
    fields = cls.Config.model_fields
    assert fields["lambda_1"].default == 1.0 and fields["lambda_2"].default == 0.01


def test_test_time_trigger_refuses_before_prepare(pair) -> None:
    attack = make()
    with pytest.raises(NotFittedError, match=r"prepare\(model"):
        attack.apply(torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8), test=True)
    with pytest.raises(NotFittedError):
        triggered_testset(pair.test, attack)
    assert attack.state_dict() == {}


def test_load_state_dict_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"'mask' should have shape \(1, 16, 16\)"):
        make().load_state_dict({"mask": torch.zeros(1, 8, 8), "mark": torch.zeros(1, SIZE, SIZE)})


# -- (1) reproducible ------------------------------------------------------------------------------


def test_same_seed_same_trigger_and_poisoned_set(pair, backdoored, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in backdoored.state_dict().items()}
    backdoored.zero_grad(set_to_none=True)  # training left its last gradients behind
    a = make().prepare(backdoored, pair.train, seed=3)
    b = make().prepare(backdoored, pair.train, seed=3)
    c = make().prepare(backdoored, pair.train, seed=4)
    assert a.state_dict().keys() == {"mask", "mark"}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert a.report_ == b.report_
    assert not torch.equal(a.mask_, c.mask_)
    # M is only read: weights, buffers (BN statistics) and mode unchanged, no gradients left behind
    assert all(torch.equal(v, backdoored.state_dict()[k]) for k, v in before.items())
    assert not backdoored.training and all(p.grad is None for p in backdoored.parameters())
    # the optimized trigger travels through safetensors, as a stage artifact would store it
    save_file(a.state_dict(), str(tmp_path / "attack.safetensors"))
    loaded = make().load_state_dict(load_file(str(tmp_path / "attack.safetensors")))
    x = torch.from_numpy(pair.test.images[:20])
    assert torch.equal(a.apply(x, test=True), loaded.apply(x, test=True))
    assert np.array_equal(triggered_testset(pair.test, a)[0].images, triggered_testset(pair.test, loaded)[0].images)
    # the poisoned training set is BadNet's: the same bytes before and after prepare, and as BadNet's ...
    fresh, prepared = poison_dataset(pair.train, make(), seed=0), poison_dataset(pair.train, a, seed=0)
    assert fresh.data.images.tobytes() == prepared.data.images.tobytes()
    assert np.array_equal(fresh.poison_index, prepared.poison_index)
    badnet = build_attack({"name": "badnet", "target": TARGET, "poison_rate": FAST["poison_rate"]},
                          image_shape=(1, SIZE, SIZE), num_classes=10)
    assert poison_dataset(pair.train, badnet, seed=0).data.images.tobytes() == fresh.data.images.tobytes()
    # ... so the poison stage's key is BadNet's (one poisoned set, one M), whatever the lambdas
    assert make(lambda_1=7.0).config.poison_key() == badnet.config.poison_key()


# -- (2) Eq. 12 does what it claims ----------------------------------------------------------------


def test_model_follows_the_trigger_and_the_expert_does_not(pair, backdoored) -> None:
    # The defender's expert: Alg. 1 on clean data the attacker never saw (the first 200 test images);
    # the attacker's surrogate is built inside prepare from its own 300 training images.
    defender_clean, evaluation = pair.test.subset(np.arange(200)), pair.test.subset(np.arange(200, 600))
    expert = surrogate_expert(backdoored, defender_clean, make().config.expert_recipe(), seed=11)

    badnet = build_attack({"name": "badnet", "target": TARGET}, image_shape=(1, SIZE, SIZE), num_classes=10)
    planted, planted_idx = triggered_testset(evaluation, badnet)  # the planted patch at test time (symmetric)
    targets = planted.labels
    assert target_rate(backdoored, planted.images, targets) > 0.9  # M is backdoored
    assert target_rate(expert, planted.images, targets) > 0.8  # and B keeps the backdoor (Fig. 3)

    # Evading B' costs a large mask (nearly the whole image here) and more steps: with lambda_1 = 10 or
    # lambda_2 = 0.01 the optimizer gives up on M instead, since M and B' share the planted backdoor.
    evasive = make(lambda_1=3.0, lambda_2=0.001, steps=200).prepare(backdoored, pair.train, seed=0)
    plain = make(lambda_1=0.0, lambda_2=0.001, steps=200).prepare(backdoored, pair.train, seed=0)  # without B'
    rates = {}
    for name, attack in (("evasive", evasive), ("plain", plain)):
        triggered, idx = triggered_testset(evaluation, attack)
        assert np.array_equal(idx, planted_idx)
        rates[name] = (target_rate(backdoored, triggered.images, targets),
                       target_rate(expert, triggered.images, targets))
    # M still goes to the target far above chance (10%) ...
    assert rates["evasive"][0] > 0.7, rates
    # ... while the defender's expert agrees with the target far less than with the planted patch or
    # with the trigger optimized without the expert term
    assert rates["plain"][1] > 0.8, rates
    assert rates["evasive"][1] < 0.3, rates
    # prepare's own report (on the attacker's data) tells the same story
    r = evasive.report_
    assert r["adaptive_asr_model"] > 0.7 and r["adaptive_conf_expert"] < 0.5 * r["planted_conf_expert"]
    # the price (Table 13): a larger mask than without the expert term
    assert r["mask_l1"] > plain.report_["mask_l1"]


def test_lambda_2_shrinks_the_mask(pair, backdoored) -> None:
    small = make(lambda_1=0.0, lambda_2=0.1).prepare(backdoored, pair.train, seed=0)
    large = make(lambda_1=0.0, lambda_2=0.001).prepare(backdoored, pair.train, seed=0)
    assert float(small.mask_.sum()) < 0.8 * float(large.mask_.sum())
    assert 0 <= float(small.mask_.min()) and float(large.mask_.max()) <= 1
    assert 0 <= float(small.mark_.min()) and float(large.mark_.max()) <= 1


def test_all_to_all_and_random_init_run(pair, backdoored) -> None:
    attack = make(mode="all_to_all", init="random", steps=5).prepare(backdoored, pair.train, seed=0)
    triggered, index = triggered_testset(pair.test, attack)
    assert len(index) == len(pair.test) and triggered.images.dtype == np.uint8


# -- (3) validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lambda_1", -1.0, "attack.lambda_1: Input should be greater than or equal to 0 (got -1.0)"),
        ("lambda_2", -0.5, "attack.lambda_2: Input should be greater than or equal to 0 (got -0.5)"),
        ("lambda_2", float("inf"), "attack.lambda_2: Input should be a finite number"),
        ("lambda_1", "big", "attack.lambda_1: Input should be a valid number"),
    ],
)
def test_invalid_lambda_names_the_field(field: str, value, message: str, smoke_config: dict) -> None:
    smoke_config["attack"] = {"name": "badexpert_adap", field: value}
    with pytest.raises(ConfigError) as info:
        validate_config(smoke_config, "exp.yaml")
    assert [loc for loc, _ in info.value.errors] == [f"attack.{field}"]
    assert message in str(info.value)
    # the attack's own config says the same without the experiment around it
    with pytest.raises(ValidationError, match=field):
        attack_class("badexpert_adap").Config(name="badexpert_adap", **{field: value})


def test_natural_backdoor_poisons_nothing_and_finds_a_pattern_in_the_clean_model(pair) -> None:
    attack = build_attack({"name": "natural", "target": TARGET, "steps": 200, "batch_size": 64,
                           "attacker_samples": 300}, image_shape=(1, SIZE, SIZE), num_classes=10)
    poisoned = poison_dataset(pair.train, attack, seed=0)
    assert len(poisoned.poison_index) == 0 and np.array_equal(poisoned.data.images, pair.train.images)
    torch.manual_seed(0)
    clean = fit(get_model("compact_cnn", in_channels=1, num_classes=10, image_size=SIZE, width=8), poisoned.data,
                TrainRecipe(epochs=4, batch_size=64, lr=0.05), seed=0).eval()
    attack.prepare(clean, pair.train, seed=0)
    triggered, _ = triggered_testset(pair.test, attack)
    # the benign model's own class-wise pattern sends most inputs to the target, with a partial mask
    assert target_rate(clean, triggered.images, triggered.labels) > 0.8
    assert 0 < attack.report_["mask_l1"] < 0.5 * SIZE * SIZE
    with pytest.raises(ValidationError, match="poison_rate"):
        attack_class("natural").Config(name="natural", poison_rate=0.01)
