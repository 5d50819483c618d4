"""Models as blocks: every registered model that unrolls computes its own forward, block counts and
splits are what the docs say, and a bad k names the field."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdray.models import get_model, list_models
from bdray.models.blocks import (
    freeze_prefix,
    model_blocks,
    num_blocks,
    prefix_eval,
    prefix_length,
    register_stages,
    shared_pass_cost,
    split_model,
)

NO_BLOCKS = {"vit_b_16"}  # class token and position embedding sit between its modules


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return get_model(name, in_channels=3, num_classes=5, image_size=32, **kwargs).eval()


@pytest.mark.parametrize("name", sorted(set(list_models()) - NO_BLOCKS))
def test_blocks_compose_into_the_model_and_every_split_does_too(name: str) -> None:
    model = build(name)
    x = torch.rand(2, 3, 32, 32)
    blocks = model_blocks(model)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(nn.Sequential(*blocks)(x), want)
        for k in (1, len(blocks) // 2 or 1, len(blocks)):
            prefix, suffix = split_model(model, k)
            assert len(suffix) == k and len(prefix) == len(blocks) - k
            torch.testing.assert_close(suffix(prefix(x)), want)
    # Blocks are views over the model's own modules: no parameter is copied or left out.
    ids = [id(p) for b in blocks for p in b.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), [("compact_cnn", 4), ("resnet18_cifar", 10), ("mlp", 2)])
def test_block_counts(name: str, expected: int) -> None:
    kwargs = {"width": 4} if name in ("compact_cnn", "resnet18_cifar") else {}
    assert num_blocks(build(name, **kwargs)) == expected


def test_a_model_without_an_adapter_says_so() -> None:
    with pytest.raises(ValueError, match="VisionTransformer cannot be split into blocks"):
        model_blocks(get_model("vit_b_16", in_channels=3, num_classes=5, image_size=32))


@pytest.mark.parametrize("k", [0, 5])
def test_k_outside_the_blocks_names_the_field_and_the_range(k: int) -> None:
    model = build("compact_cnn", width=4)
    with pytest.raises(ValueError, match=rf"defense\.trainable_blocks: {k} is not in 1\.\.4, the blocks of"):
        prefix_length(model, k, field="defense.trainable_blocks")


def test_a_second_adapter_for_one_class_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_stages(nn.Sequential)(lambda m: list(m.children()))


def test_freeze_prefix_leaves_the_suffix_trainable_and_prefix_eval_only_the_prefix() -> None:
    model = build("compact_cnn", width=4)
    trainable = freeze_prefix(model, 2)
    prefix, suffix = split_model(model, 2)
    assert {id(p) for p in trainable} == {id(p) for p in suffix.parameters()}
    assert not any(p.requires_grad for p in prefix.parameters())
    model.train()
    prefix_eval(model, 2)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]  # one per conv block
    assert [bn.training for bn in bns] == [False, False, True]
    assert len(freeze_prefix(build("compact_cnn", width=4), None)) == len(list(model.parameters()))


def test_shared_pass_cost_runs_from_one_to_three_forward_passes() -> None:
    model = build("compact_cnn", width=4)
    costs = [shared_pass_cost(model, k, (3, 32, 32)) for k in (1, 2, 3, 4)]
    assert shared_pass_cost(model, None, (3, 32, 32)) == 3.0 and costs[-1] == pytest.approx(3.0)
    assert 1.0 < costs[0] < 1.01  # only the linear heads differ
    assert costs == sorted(costs)
