"""Shared-prefix experts (defense.trainable_blocks): B and M' keep M's first blocks bit for bit, BN
statistics included; the setting is part of their stage keys; a bad k is a config error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from bdray.config import ConfigError, validate_config
from bdray.data import get_dataset
from bdray.defenses import BaDExpert, BaDExpertConfig
from bdray.models import ModelSpec, save_weights
from bdray.models.blocks import split_model
from bdray.stages import StageStore
from bdray.train import TrainRecipe, fit

SPEC = ModelSpec(
    name="compact_cnn", in_channels=1, num_classes=4, image_size=12, mean=[0.5], std=[0.5], kwargs={"width": 4}
)
# Large enough steps that every trained tensor moves; the BN of trained blocks updates its statistics.
CONFIG = {
    "name": "badexpert",
    "eta": 1e-2,
    "expert": {"batch_size": 16},
    "auxiliary": {"epochs": 1, "lr": 0.05, "batch_size": 16, "milestones": [1]},
}


@pytest.fixture(scope="module")
def pair():
    return get_dataset("synthetic", num_classes=4, image_size=12, train_size=64, test_size=48, seed=3)


@pytest.fixture(scope="module")
def model(pair) -> torch.nn.Module:
    torch.manual_seed(0)
    return fit(SPEC.build(), pair.train, TrainRecipe(epochs=1, batch_size=32), seed=0).eval()


def fitted(model, pair, k: int | None) -> BaDExpert:
    config = BaDExpertConfig.model_validate({**CONFIG, "trainable_blocks": k})
    return BaDExpert(config).fit(model, pair.test, seed=0)


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_frozen_prefix_and_its_bn_statistics_stay_bit_identical_to_m(model, pair, k: int) -> None:
    before = states(model)
    detector = fitted(model, pair, k)
    m_prefix = split_model(model, k)[0].state_dict()
    assert any("running_mean" in name for name in m_prefix)  # BN statistics are among what is compared
    for trained in (detector.expert_, detector.auxiliary_):
        prefix, suffix = split_model(trained, k)
        got = prefix.state_dict()
        assert got.keys() == m_prefix.keys()
        for name, value in m_prefix.items():
            assert torch.equal(got[name], value), name
        # ... while every tensor of the trained blocks moved (weights and, where there is BN, statistics).
        m_suffix = split_model(model, k)[1].state_dict()
        for name, value in suffix.state_dict().items():
            assert not torch.equal(value, m_suffix[name]), name
        assert all(p.requires_grad for p in trained.parameters())  # fit hands the model back trainable
    for name, value in states(model).items():  # M itself is untouched
        assert torch.equal(value, before[name]), name


def test_without_trainable_blocks_every_layer_trains(model, pair) -> None:
    detector = fitted(model, pair, None)
    first = split_model(model, 3)[0].state_dict()
    got = split_model(detector.expert_, 3)[0].state_dict()
    assert not all(torch.equal(got[name], value) for name, value in first.items())


def test_ray_train_keeps_the_prefix_too(ray_session, model, pair, tmp_path: Path) -> None:
    """The pipeline's path: Ray Train's local mode, starting from M's weights, as the expert stage does."""
    from bdray.train.distributed import Scaling, train_model

    init = tmp_path / "m.safetensors"
    save_weights(model, init)
    recipe = BaDExpertConfig.model_validate({**CONFIG, "trainable_blocks": 2}).expert_recipe()
    result = train_model(
        SPEC,
        pair.test,
        recipe,
        seed=0,
        scaling=Scaling(num_workers=0),
        storage_path=tmp_path / "ray",
        name="expert",
        out=tmp_path / "out",
        init_weights=init,
    )
    got = load_file(str(result.model_path))
    # The compact CNN's first two blocks are backbone.0 (conv, BN) and backbone.2: 12 tensors with BN's.
    frozen = {
        name: value for name, value in model.state_dict().items() if name.startswith(("backbone.0.", "backbone.2."))
    }
    assert len(frozen) == len(split_model(model, 2)[0].state_dict()) == 12
    for name, value in frozen.items():
        assert torch.equal(got[name], value), name
    for name in ("backbone.4.0.weight", "backbone.4.1.running_mean", "backbone.7.weight"):  # block 3 and head
        assert not torch.equal(got[name], model.state_dict()[name]), name


# -- stage keys -------------------------------------------------------------------------------------


def test_the_setting_is_part_of_the_expert_and_auxiliary_recipes_and_unset_changes_no_key() -> None:
    paper = BaDExpertConfig.model_validate(CONFIG)
    # Unset, the recipes dump exactly as before the field existed: stage keys (and caches) stay valid.
    for recipe in (paper.expert_recipe(), paper.auxiliary_recipe(), TrainRecipe()):
        assert "trainable_blocks" not in recipe.model_dump(mode="json")
    store = StageStore("unused")
    keys = {}
    for k in (None, 1, 2):
        config = BaDExpertConfig.model_validate({**CONFIG, "trainable_blocks": k})
        for stage, recipe in (("expert", config.expert_recipe()), ("auxiliary", config.auxiliary_recipe())):
            assert recipe.trainable_blocks == k
            keys[stage, k] = store.key(stage, {"recipe": recipe.model_dump(mode="json")}, ["train-key"])
    assert len(set(keys.values())) == len(keys)


# -- invalid settings ---------------------------------------------------------------------------------


def test_k_below_one_is_refused() -> None:
    with pytest.raises(ValidationError, match="trainable_blocks"):
        BaDExpertConfig.model_validate({**CONFIG, "trainable_blocks": 0})


def test_a_second_conflicting_setting_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"expert\.trainable_blocks \(3\) differs from trainable_blocks \(2\)"):
        BaDExpertConfig.model_validate({**CONFIG, "trainable_blocks": 2, "expert": {"trainable_blocks": 3}})


def _errors(smoke_config: dict, **changes) -> list[tuple[str, str]]:
    raw = {**smoke_config, "defense": {**smoke_config["defense"], **changes.pop("defense", {})}, **changes}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.errors


def test_k_beyond_the_models_blocks_is_a_config_error_naming_the_field(smoke_config: dict) -> None:
    errors = _errors(smoke_config, defense={"trainable_blocks": 5})
    assert len(errors) == 1
    loc, message = errors[0]
    assert loc == "defense.trainable_blocks"
    assert message.startswith("5 exceeds the 4 blocks of model compact_cnn") and "allowed 1..4" in message
    validate_config({**smoke_config, "defense": {**smoke_config["defense"], "trainable_blocks": 4}})


def test_a_model_without_blocks_is_a_config_error(smoke_config: dict) -> None:
    errors = _errors(smoke_config, defense={"trainable_blocks": 2}, model={"name": "vit_b_16"})
    assert errors[0][0] == "defense.trainable_blocks" and "cannot be split into blocks" in errors[0][1]


def test_fitting_outside_a_config_still_names_the_field(model, pair) -> None:
    with pytest.raises(ValueError, match=r"trainable_blocks: 7 is not in 1\.\.4"):
        fitted(model, pair, 7)
