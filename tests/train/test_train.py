"""The shared training loop: bit-reproducible on CPU, label shift, augmentation, recipes."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from bdray.data import get_dataset
from bdray.models import get_model
from bdray.train import Augment, TrainRecipe, finetune_copy, fit, predict_proba
from bdray.train.loop import augment_batch, to_float
from bdray.train.recipe import freeze_batchnorm_stats


@pytest.fixture(scope="module")
def tiny_data():
    return get_dataset("synthetic", image_size=16, train_size=96, test_size=40, num_classes=4).train


def tiny_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return get_model("compact_cnn", in_channels=1, num_classes=4, image_size=16, width=4)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


RECIPE = TrainRecipe(epochs=2, batch_size=16, lr=0.05, augment=Augment(crop_padding=2, hflip=True))


# -- reproducibility --------------------------------------------------------------------------------


def test_same_seed_is_bit_identical(tiny_data, one_thread) -> None:
    init = weights(tiny_cnn())
    runs = []
    for _ in range(2):
        model = tiny_cnn(seed=99)  # a different init, overwritten by the shared one
        model.load_state_dict(init)
        runs.append(weights(fit(model, tiny_data, RECIPE, seed=7)))
    a, b = runs
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # training did move the weights
    assert any(not torch.equal(a[k], init[k]) for k in a if a[k].is_floating_point())


def test_different_seed_differs(tiny_data, one_thread) -> None:
    init = weights(tiny_cnn())
    outs = []
    for seed in (7, 8):
        model = tiny_cnn()
        model.load_state_dict(init)
        outs.append(weights(fit(model, tiny_data, RECIPE, seed=seed)))
    assert any(not torch.equal(outs[0][k], outs[1][k]) for k in outs[0] if outs[0][k].is_floating_point())


def test_on_epoch_callback_and_in_place(tiny_data) -> None:
    seen = []
    model = tiny_cnn()
    returned = fit(model, tiny_data, RECIPE, seed=0, on_epoch=lambda e, m: seen.append((e, m)))
    assert returned is model
    assert [e for e, _ in seen] == [0, 1]
    for _, metrics in seen:
        assert set(metrics) == {"loss", "train_acc"}
        assert np.isfinite(metrics["loss"]) and 0 <= metrics["train_acc"] <= 1


def test_finetune_copy_leaves_original(tiny_data) -> None:
    model = tiny_cnn()
    before = weights(model)
    tuned = finetune_copy(model, tiny_data, TrainRecipe(epochs=1, batch_size=32), seed=0)
    assert tuned is not model
    for k, v in weights(model).items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in weights(tuned).items() if v.is_floating_point())


# -- label shift ------------------------------------------------------------------------------------


def test_label_shift_trains_towards_next_class() -> None:
    pair = get_dataset("synthetic", image_size=16, train_size=300, test_size=100, num_classes=5, noise=20.0)
    torch.manual_seed(0)
    model = get_model("mlp", in_channels=1, num_classes=5, image_size=16, hidden=32)
    recipe = TrainRecipe(epochs=6, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=0, label_shift=1)
    fit(model, pair.train, recipe, seed=0)
    pred = predict_proba(model, pair.test.images).argmax(1)
    shifted = (pair.test.labels + 1) % 5
    # the model learned y -> (y + 1) mod C, not the true labels
    assert (pred == shifted).mean() > 0.9
    assert (pred == pair.test.labels).mean() < 0.1


# -- augmentation -----------------------------------------------------------------------------------


def distinct_batch(b: int = 16, c: int = 2, h: int = 6, w: int = 5) -> torch.Tensor:
    """Every pixel of every sample unique and nonzero, so zero padding and offsets are recognizable."""
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).view(b, c, h, w)


def test_augment_off_is_identity() -> None:
    x = distinct_batch()
    assert torch.equal(augment_batch(x, Augment(), torch.Generator().manual_seed(0)), x)


def test_crop_is_a_shifted_window_of_the_padded_image() -> None:
    p = 2
    x = distinct_batch()
    b, _, h, w = x.shape
    out = augment_batch(x, Augment(crop_padding=p), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype

    padded = torch.nn.functional.pad(x, (p, p, p, p))
    found = []
    for i in range(b):
        offsets = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(offsets) == 1, f"sample {i} is not a window of its padded image"
        found.append(offsets[0])
    # the same channels move together (a window was taken per sample, not per channel) and offsets vary
    assert len(set(found)) > 3

    # with the generator replayed, the offsets are exactly its draws: dy for the batch, then dx
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
    assert found == list(zip(dy.tolist(), dx.tolist(), strict=True))


def test_crop_manual_shift_example() -> None:
    # a 1x3x3 image, padding 1; offset (dy, dx) = (0, 2) means shift content down 1 and left 1
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    manual = padded[:, :, 0:3, 2:5]
    assert manual[0, 0].tolist() == [[0, 0, 0], [2, 3, 0], [5, 6, 0]]
    for seed in range(200):  # find a generator draw with that offset and check the output
        g = torch.Generator().manual_seed(seed)
        dy, dx = torch.randint(0, 3, (1,), generator=g), torch.randint(0, 3, (1,), generator=g)
        if (int(dy), int(dx)) == (0, 2):
            out = augment_batch(x, Augment(crop_padding=1), torch.Generator().manual_seed(seed))
            assert torch.equal(out, manual)
            break
    else:  # pragma: no cover - 200 draws from 9 outcomes
        pytest.fail("no seed produced offset (0, 2)")


def test_hflip_flips_about_half() -> None:
    x = distinct_batch(b=64)
    out = augment_batch(x, Augment(hflip=True), torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(out[i], x[i]) for i in range(len(x))])
    assert bool((flipped ^ kept).all())  # each sample is either flipped whole or untouched
    assert 10 < int(flipped.sum()) < 54
    g = torch.Generator().manual_seed(1)
    assert torch.equal(flipped, torch.rand(64, generator=g) < 0.5)


def test_crop_and_flip_together_keep_shape_and_content() -> None:
    x = distinct_batch(b=32)
    out = augment_batch(x, Augment(crop_padding=1, hflip=True), torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    for i in range(len(x)):
        # values come only from the sample itself or the zero padding
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}


def test_augment_does_not_modify_input() -> None:
    x = distinct_batch()
    before = x.clone()
    augment_batch(x, Augment(crop_padding=2, hflip=True), torch.Generator().manual_seed(0))
    assert torch.equal(x, before)


# -- helpers and recipes ----------------------------------------------------------------------------


def test_to_float() -> None:
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(u8), torch.tensor([0.0, 0.2, 1.0]))
    f = torch.tensor([0.25, 0.5])
    assert torch.equal(to_float(f), f)


def test_recipe_multistep_needs_milestones() -> None:
    with pytest.raises(ValueError, match="milestones"):
        TrainRecipe(schedule="multistep")
    TrainRecipe(schedule="multistep", milestones=(2, 3))


def test_recipe_nesterov_needs_sgd_with_momentum() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        TrainRecipe(optimizer="adam", nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        TrainRecipe(nesterov=True, momentum=0)
    TrainRecipe(nesterov=True, momentum=0.9)


def test_recipe_rejects_unknown_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        TrainRecipe(epochs=0)
    with pytest.raises(ValueError):
        TrainRecipe(lr=0)
    with pytest.raises(ValueError):
        TrainRecipe(learning_rate=0.1)
    with pytest.raises(ValueError):
        Augment(crop_padding=-1)


def test_recipe_schedules() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    steps = 10

    def lrs(recipe: TrainRecipe) -> list[float]:
        opt = recipe.make_optimizer([param])
        sched = recipe.make_scheduler(opt, steps)
        out = []
        for _ in range(recipe.epochs * steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    const = lrs(TrainRecipe(epochs=2, lr=0.1, schedule="constant"))
    assert const == [0.1] * 20
    multi = lrs(TrainRecipe(epochs=3, lr=0.1, schedule="multistep", milestones=(1, 2), lr_decay=0.5))
    assert multi[:10] == [0.1] * 10
    assert multi[10:20] == pytest.approx([0.05] * 10) and multi[20:] == pytest.approx([0.025] * 10)
    cos = lrs(TrainRecipe(epochs=2, lr=0.1, schedule="cosine"))
    assert cos[0] == 0.1 and all(a >= b for a, b in pairwise(cos)) and cos[-1] < 0.01
    assert isinstance(TrainRecipe(optimizer="adam").make_optimizer([param]), torch.optim.Adam)


def test_freeze_batchnorm_stats() -> None:
    model = tiny_cnn().train()
    freeze_batchnorm_stats(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)


def test_predict_proba_rows_sum_to_one(tiny_data) -> None:
    model = tiny_cnn().train()
    probs = predict_proba(model, tiny_data.images[:25], batch_size=10)
    assert probs.shape == (25, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-5)
    assert (probs >= 0).all()
    assert not model.training  # eval mode: batch-size independent
    np.testing.assert_allclose(predict_proba(model, tiny_data.images[:25], batch_size=25), probs, atol=1e-6)
    # uint8 and the same images as float in [0, 1] agree
    as_float = torch.from_numpy(tiny_data.images[:25]).float() / 255
    np.testing.assert_allclose(predict_proba(model, as_float), probs, atol=1e-6)
