"""Behaviour of the attack zoo beyond the shared contract (tests/attacks/test_attacks.py).

Everything runs on tiny generated data; the fitted attacks train for a couple of steps only.
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bdray.attacks import (
    attack_class,
    build_attack,
    list_attacks,
    poison_dataset,
    triggered_testset,
)
from bdray.attacks.bpp import floyd_steinberg
from bdray.attacks.common import NotFittedError
from bdray.attacks.posttrain import implant
from bdray.data import get_dataset
from bdray.models import get_model
from bdray.train import TrainRecipe, fit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def pair():
    return get_dataset("synthetic", channels=1, image_size=28, train_size=200, test_size=100)


def make(name: str, shape: tuple[int, int, int] = SHAPE, **overrides):
    return build_attack({"name": name, **overrides}, image_shape=shape, num_classes=10)


def test_every_family_is_registered() -> None:
    expected = {"trojan", "sig", "cl", "wanet", "bpp", "dynamic", "issba", "physical", "tact", "adaptive_blend",
                "adaptive_patch", "low_opacity", "trojannn", "ft", "badnet", "blend"}
    assert expected <= set(list_attacks())


def test_flags() -> None:
    clean_label = {n for n in list_attacks() if attack_class(n).clean_label}
    fitted = {n for n in list_attacks() if attack_class(n).needs_fit}
    post = {n for n in list_attacks() if attack_class(n).post_training}
    assert clean_label == {"sig", "cl"}
    assert fitted == {"cl", "dynamic", "issba"}
    assert post == {"ft", "trojannn"}


@pytest.mark.parametrize(
    ("name", "rate"),
    [("trojan", 0.003), ("cl", 0.003), ("sig", 0.02), ("dynamic", 0.003), ("issba", 0.02), ("wanet", 0.05),
     ("bpp", 0.2), ("ft", 0.2), ("trojannn", 0.1), ("physical", 0.05), ("tact", 0.05), ("adaptive_blend", 0.05),
     ("adaptive_patch", 0.05), ("low_opacity", 0.003)],
)
def test_paper_poison_rates(name: str, rate: float) -> None:
    assert attack_class(name).Config(name=name).poison_rate == rate


# -- clean-label attacks ------------------------------------------------------------------------------


def test_sig_keeps_labels_and_poisons_only_the_target_class(pair) -> None:
    data = pair.train
    attack = make("sig", poison_rate=0.05, target=4)
    poisoned = poison_dataset(data, attack, seed=0)
    assert np.all(data.labels[poisoned.poison_index] == 4)
    assert np.array_equal(poisoned.data.labels, data.labels)
    # the ASR set is still every non-target test image, labelled with the target
    triggered, index = triggered_testset(pair.test, attack)
    assert np.array_equal(index, np.flatnonzero(pair.test.labels != 4))
    assert np.all(triggered.labels == 4)


def test_sig_signal_formula() -> None:
    attack = make("sig", delta=0.1, frequency=2, test_delta=0.2)
    x = torch.full((1, 1, 28, 28), 0.5)
    j = torch.arange(28, dtype=torch.float64)
    signal = torch.sin(2 * math.pi * j * 2 / 28).float()
    torch.testing.assert_close(attack.apply(x)[0, 0, 5], 0.5 + 0.1 * signal)
    torch.testing.assert_close(attack.apply(x, test=True)[0, 0, 5], 0.5 + 0.2 * signal)
    assert torch.equal(attack.apply(x)[0, 0, 0], attack.apply(x)[0, 0, 27])  # the same for every row


def test_clean_label_rejects_all_to_all() -> None:
    for name in ("sig", "cl"):
        with pytest.raises(ValueError, match="all_to_one"):
            make(name, mode="all_to_all")


def test_cl_needs_fit_then_perturbs_within_the_l2_bound(pair) -> None:
    attack = make("cl", surrogate_epochs=1, eps=0.5, pgd_steps=3)
    x = torch.from_numpy(pair.train.images[:4]).float() / 255
    with pytest.raises(NotFittedError, match="fit"):
        attack.apply(x)
    assert not torch.equal(attack.apply(x, test=True), x)  # test time: patches only, no model needed
    attack.fit(pair.train, seed=0)
    out = attack.apply(x)
    patches_only = attack.apply(x, test=True)
    corners = torch.zeros(28, 28, dtype=torch.bool)
    for top, left in attack.corners:
        corners[top : top + 3, left : left + 3] = True
    assert torch.equal(out[..., corners], patches_only[..., corners])
    delta = (out - x)[..., ~corners].flatten(1).norm(dim=1)
    assert torch.all(delta <= 0.5 + 1e-4) and torch.all(delta > 0.05)


# -- cover samples ------------------------------------------------------------------------------------


def test_wanet_cover_samples_keep_labels_and_get_a_noisy_warp(pair) -> None:
    data = pair.train
    attack = make("wanet", poison_rate=0.1, cover_rate=0.2)
    poisoned = poison_dataset(data, attack, seed=1)
    assert len(poisoned.poison_index) == 20 and len(poisoned.cover_index) == 40
    assert np.array_equal(poisoned.data.labels[poisoned.cover_index], data.labels[poisoned.cover_index])
    assert np.all(poisoned.data.labels[poisoned.poison_index] == 0)
    cover = torch.from_numpy(data.images[poisoned.cover_index])
    plain = attack.apply(cover)
    assert not torch.equal(torch.from_numpy(poisoned.data.images[poisoned.cover_index]), plain)
    # each cover sample's noise comes from its own index
    idx = torch.from_numpy(poisoned.cover_index)
    a = attack.apply(cover[:1], index=idx[:1], cover=True)
    b = attack.apply(cover[:1], index=idx[1:2], cover=True)
    assert not torch.equal(a, b)


def test_wanet_warp_is_small_and_seeded() -> None:
    x = torch.rand(2, 1, 28, 28)
    a, b, c = make("wanet", seed=0), make("wanet", seed=0), make("wanet", seed=1)
    assert torch.equal(a.grid, b.grid) and not torch.equal(a.grid, c.grid)
    identity = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="xy"), -1)
    # s = 0.5 moves pixels by well under a pixel on average (1 pixel = 2 / 27 in grid units)
    assert float((a.grid[0] - identity).abs().mean()) < 2 / 27
    assert float((a.apply(x) - x).abs().mean()) > 0


def test_tact_touches_only_source_and_cover_classes(pair) -> None:
    data = pair.train
    attack = make("tact", source_classes=(2, 5), target=7, cover_classes=(3,), poison_rate=0.1, cover_rate=0.05)
    poisoned = poison_dataset(data, attack, seed=0)
    assert set(data.labels[poisoned.poison_index]) <= {2, 5}
    assert np.all(poisoned.data.labels[poisoned.poison_index] == 7)
    assert set(data.labels[poisoned.cover_index]) == {3}
    assert np.array_equal(poisoned.data.labels[poisoned.cover_index], data.labels[poisoned.cover_index])
    untouched = ~poisoned.is_poison & ~poisoned.is_cover
    assert np.array_equal(poisoned.data.images[untouched], data.images[untouched])
    # the ASR set: triggered source-class test images only
    triggered, index = triggered_testset(pair.test, attack)
    assert set(pair.test.labels[index]) == {2, 5} and np.all(triggered.labels == 7)


def test_tact_rejects_target_among_sources() -> None:
    with pytest.raises(ValueError, match="source"):
        make("tact", source_classes=(0, 1), target=1)


def test_adaptive_blend_partial_pieces_then_full_trigger() -> None:
    attack = make("adaptive_blend", alpha=0.15, test_alpha=0.2, pieces=16, mask_rate=0.5)
    x = torch.zeros(1, 1, 28, 28)
    index = torch.tensor([5])
    train = attack.apply(x, index=index)
    changed = (train != 0)[0, 0]
    # exactly 8 of the 16 pieces carry the pattern (noise may be 0 at a pixel; count by piece)
    pieces_hit = {int(attack.piece_of[i, j]) for i, j in changed.nonzero().tolist()}
    assert len(pieces_hit) == 8
    full = attack.apply(x, test=True)
    torch.testing.assert_close(full, 0.2 * attack.pattern[None], rtol=0, atol=1e-6)
    # another sample gets another set of pieces
    other = attack.apply(x, index=torch.tensor([6]))
    assert not torch.equal(train, other)


def test_adaptive_patch_subset_of_patches_then_all(pair) -> None:
    attack = make("adaptive_patch", num_patches=4, train_patches=2)
    x = torch.zeros(1, 1, 28, 28)
    s = attack.config.patch_size

    def stamped(out: torch.Tensor) -> list[bool]:
        return [not torch.equal(out[..., t : t + s, left : left + s], x[..., t : t + s, left : left + s])
                for t, left in attack.origins]

    assert sum(stamped(attack.apply(x, index=torch.tensor([3])))) <= 2
    assert all(stamped(attack.apply(x, test=True)))
    poisoned = poison_dataset(pair.train, make("adaptive_patch", poison_rate=0.05, cover_rate=0.05), seed=0)
    assert len(poisoned.cover_index) == 10
    assert np.array_equal(poisoned.data.labels[poisoned.cover_index], pair.train.labels[poisoned.cover_index])


def test_low_opacity_uses_the_lower_alpha_at_test_time() -> None:
    attack = make("low_opacity")
    assert (attack.config.alpha, attack.config.test_alpha) == (0.2, 0.15)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(attack.apply(x), 0.8 * x + 0.2 * attack.pattern, rtol=0, atol=1e-6)
    torch.testing.assert_close(attack.apply(x, test=True), 0.85 * x + 0.15 * attack.pattern, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="below"):
        make("low_opacity", alpha=0.2, test_alpha=0.3)


# -- per-sample transforms ----------------------------------------------------------------------------


def test_physical_transforms_are_per_index_and_only_at_train_time() -> None:
    attack = make("physical")
    x = torch.rand(1, 1, 28, 28).expand(3, -1, -1, -1)
    out = attack.apply(x, index=torch.tensor([0, 1, 0]))
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    test = attack.apply(x, test=True)
    s, top, left = attack.config.patch_size, attack.top, attack.left
    assert torch.equal(test[0, :, top : top + s, left : left + s], attack.patch)
    assert torch.equal(test[0, :, :top], x[0, :, :top])


def _floyd_steinberg_reference(image: np.ndarray, levels: int) -> np.ndarray:
    """The textbook raster-scan algorithm on one (H, W) image."""
    x = image.astype(np.float64).copy()
    h, w = x.shape
    q = levels - 1
    for i in range(h):
        for j in range(w):
            old = x[i, j]
            new = min(max(round(old * q), 0), q) / q
            x[i, j] = new
            err = old - new
            if j + 1 < w:
                x[i, j + 1] += err * 7 / 16
            if i + 1 < h:
                if j > 0:
                    x[i + 1, j - 1] += err * 3 / 16
                x[i + 1, j] += err * 5 / 16
                if j + 1 < w:
                    x[i + 1, j + 1] += err * 1 / 16
    return x


def test_bpp_dithering_matches_the_raster_scan_algorithm() -> None:
    image = np.random.default_rng(0).uniform(0, 1, (9, 7))
    ours = floyd_steinberg(torch.from_numpy(image)[None, None], 8)[0, 0].numpy()
    np.testing.assert_allclose(ours, _floyd_steinberg_reference(image, 8), atol=1e-9)
    assert len(np.unique(np.round(ours * 7, 6))) <= 8
    # dithering keeps the local mean: a flat 0.3 grey stays 0.3 on average, plain rounding would give 2/7
    flat = floyd_steinberg(torch.full((1, 1, 28, 28), 0.3, dtype=torch.float64), 8)
    assert abs(float(flat.mean()) - 0.3) < 0.01


def test_bpp_negatives_are_cover_samples(pair) -> None:
    poisoned = poison_dataset(pair.train, make("bpp", poison_rate=0.2, negative_rate=0.2), seed=0)
    assert len(poisoned.poison_index) == 40 and len(poisoned.cover_index) == 40
    assert np.array_equal(poisoned.data.labels[poisoned.cover_index], pair.train.labels[poisoned.cover_index])


# -- fitted attacks: state round trip ----------------------------------------------------------------

FITTED = {
    "cl": {"surrogate_epochs": 1, "fit_samples": 100},
    "dynamic": {"fit_epochs": 1, "fit_samples": 100},
    "issba": {"fit_epochs": 1, "fit_samples": 100},
}


@pytest.mark.parametrize("name", sorted(FITTED))
def test_fit_is_reproducible_and_state_round_trips(name: str, pair, tmp_path: Path) -> None:
    options = FITTED[name]
    a = make(name, **options).fit(pair.train, seed=3)
    b = make(name, **options).fit(pair.train, seed=3)
    state = a.state_dict()
    assert state and state.keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())
    # through safetensors, as the poison stage stores it
    save_file(state, str(tmp_path / "attack.safetensors"))
    loaded = make(name, **options).load_state_dict(load_file(str(tmp_path / "attack.safetensors")))
    x = torch.from_numpy(pair.train.images[:5])
    index = torch.arange(5)
    assert torch.equal(a.apply(x, index=index), loaded.apply(x, index=index))
    assert torch.equal(a.apply(x, test=True), loaded.apply(x, test=True))
    with pytest.raises(NotFittedError):
        make(name, **options).apply(x)


def test_dynamic_triggers_differ_between_inputs(pair) -> None:
    attack = make("dynamic", fit_epochs=1, fit_samples=100).fit(pair.train, seed=0)
    x = torch.from_numpy(pair.train.images[:2]).float() / 255
    residual = attack.apply(x) - x
    assert not torch.allclose(residual[0], residual[1])


def test_issba_residual_is_bounded_and_sample_specific(pair) -> None:
    attack = make("issba", fit_epochs=1, fit_samples=100, strength=0.05).fit(pair.train, seed=0)
    x = torch.from_numpy(pair.train.images[:3]).float() / 255
    residual = attack.apply(x) - x
    assert float(residual.abs().max()) <= 0.05 + 1e-6
    assert float(residual.abs().max()) > 0
    assert not torch.allclose(residual[0], residual[1])


# -- post-training attacks ---------------------------------------------------------------------------


def _clean_model(pair) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_model("compact_cnn", in_channels=1, num_classes=10, image_size=28, width=8)
    return fit(model, pair.train, TrainRecipe(epochs=1, batch_size=64), seed=0)


def test_implant_trojannn_optimizes_the_trigger_and_leaves_the_model_alone(pair) -> None:
    model = _clean_model(pair)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = make("trojannn", steps=5, probe_samples=32)
    initial = attack.pattern.clone()
    backdoored = implant(model, pair.train, attack, TrainRecipe(epochs=1, batch_size=64, lr=0.01), seed=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, backdoored.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(attack.pattern, initial) and 0 <= float(attack.pattern.min()) <= 1
    assert 0 <= attack.neuron_ < 32
    # the optimized pattern travels with state_dict
    clone = make("trojannn").load_state_dict(attack.state_dict())
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(clone.apply(x), attack.apply(x))


def test_implant_ft_and_refusal(pair) -> None:
    model = _clean_model(pair)
    backdoored = implant(model, pair.train, make("ft"), TrainRecipe(epochs=1, batch_size=64, lr=0.01), seed=0)
    assert backdoored is not model
    with pytest.raises(ValueError, match="not a post-training attack"):
        implant(model, pair.train, make("badnet"), TrainRecipe(epochs=1), seed=0)


# -- user attacks and trigger files ------------------------------------------------------------------

USER_MODULE = '''
import torch
from bdray.attacks import Attack, AttackConfig


class InvertConfig(AttackConfig):
    strength: float = 1.0


class Invert(Attack):
    """A user's attack living outside bdray: inverts the image."""

    Config = InvertConfig

    def trigger(self, images, *, test=False, index=None):
        return (1 - images) * self.config.strength + images * (1 - self.config.strength)
'''


def test_user_attack_by_import_path(tmp_path: Path, monkeypatch, pair) -> None:
    (tmp_path / "my_zoo_attacks.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        attack = make("my_zoo_attacks:Invert", strength=1.0, poison_rate=0.1)
        poisoned = poison_dataset(pair.train, attack, seed=0)
        idx = poisoned.poison_index
        assert np.array_equal(poisoned.data.images[idx], 255 - pair.train.images[idx])
        assert np.all(poisoned.data.labels[idx] == 0)
        with pytest.raises(ValueError):
            make("my_zoo_attacks:Invert", no_such_field=1)
    finally:
        sys.modules.pop("my_zoo_attacks", None)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("no_such_package_xyz.attacks:Mine", "cannot import module 'no_such_package_xyz.attacks'"),
        ("bdray.attacks.patch:NoSuchAttack", "has no attribute 'NoSuchAttack'"),
        ("bdray.attacks.patch:load_patch_file", "subclass of bdray.attacks.Attack"),
        ("no_such_attack", "unknown attack 'no_such_attack'; expected one of: "),
    ],
)
def test_unresolvable_attack_names_say_why(name: str, match: str) -> None:
    with pytest.raises(KeyError, match=match):
        make(name)


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> str:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


def test_badnet_from_png_with_mask_position_and_alpha(tmp_path: Path) -> None:
    pattern = _png(tmp_path / "p.png", np.full((4, 5), 200, np.uint8))
    mask = np.zeros((4, 5), np.uint8)
    mask[:, :2] = 255
    mask_path = _png(tmp_path / "m.png", mask)
    attack = make("badnet", pattern_file=pattern, mask_file=mask_path, position=(2, 3), alpha=0.5)
    x = torch.zeros(1, 1, 28, 28)
    out = attack.apply(x)
    expected = torch.zeros(28, 28)
    expected[2:6, 3:5] = 0.5 * 200 / 255
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-6)
    # RGBA on colour data: the alpha channel is the mask
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[1, 1, 3] = 255
    attack = make("badnet", (3, 32, 32), pattern_file=_png(tmp_path / "c.png", rgba), position="top_left", margin=0)
    out = attack.apply(torch.zeros(1, 3, 32, 32))
    assert out.sum() == 1 and out[0, 0, 1, 1] == 1


def test_badnet_png_errors_name_the_file(tmp_path: Path) -> None:
    big = _png(tmp_path / "too_big.png", np.zeros((30, 30), np.uint8))
    with pytest.raises(ValueError, match="too_big.png"):
        make("badnet", pattern_file=big)
    rgb = _png(tmp_path / "colour.png", np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="colour.png.*mode RGB"):
        make("badnet", pattern_file=rgb)  # 1-channel data
    gray = _png(tmp_path / "gray.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="gray.png.*mode L"):
        make("badnet", (3, 32, 32), pattern_file=gray)
    wrong_mask = _png(tmp_path / "mask_4x4.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="mask_4x4.png"):
        make("badnet", pattern_file=gray, mask_file=wrong_mask)
    with pytest.raises(ValueError, match="missing.png"):
        make("badnet", pattern_file=str(tmp_path / "missing.png"))
    text = tmp_path / "text.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        make("badnet", pattern_file=str(text))
    with pytest.raises(ValueError, match="either patch_size or pattern_file"):
        make("badnet", pattern_file=gray, patch_size=3)
