"""Contract tests every registered attack must pass, plus BadNet/Blend specifics.

The contract tests are parametrized over ``list_attacks()``, so a newly registered attack is
checked automatically with its default config. Attacks with a trained part (``needs_fit``) are
fitted once per config on a tiny generated set first, and attacks whose test-time trigger comes from
the trained model (``needs_model``) are prepared once per config against a tiny untrained CNN;
per-sample randomness is checked through explicit dataset indices.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image

from bdray.attacks import (
    Attack,
    attack_class,
    build_attack,
    list_attacks,
    poison_dataset,
    triggered_testset,
)
from bdray.attacks.common import torch_seed
from bdray.attacks.patch import BadNet, Blend
from bdray.data import get_dataset
from bdray.models import get_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NUM_CLASSES = 10
SHAPES = [(1, 28, 28), (3, 32, 32)]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
SOURCE_SPECIFIC = {"tact"}  # the ASR set is the source classes only


_FITTED: dict[tuple, dict[str, torch.Tensor]] = {}


def make(name: str, shape: tuple[int, int, int], **overrides) -> Attack:
    """The attack with its default config plus ``overrides``; fitted or prepared (once per config) when it needs it."""
    attack = build_attack({"name": name, **overrides}, image_shape=shape, num_classes=NUM_CLASSES)
    if attack.needs_fit or attack.needs_model:
        key = (name, shape, repr(sorted(overrides.items())))
        if key not in _FITTED:
            c, h, _ = shape
            tiny = get_dataset("synthetic", channels=c, image_size=h, train_size=64, test_size=10).train
            if attack.needs_fit:
                attack.fit(tiny, seed=0)
            if attack.needs_model:  # the contract only needs *a* model to derive the trigger from
                with torch_seed(0):
                    model = get_model("compact_cnn", in_channels=c, num_classes=NUM_CLASSES, image_size=h, width=4)
                attack.prepare(model, tiny, seed=0)
            _FITTED[key] = attack.state_dict()
        else:
            attack.load_state_dict(_FITTED[key])
    return attack


def supports_all_to_all(name: str) -> bool:
    return "all_to_all" in get_args(attack_class(name).Config.model_fields["mode"].annotation)


def images_u8(shape: tuple[int, int, int], n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8))


def images_f32(shape: tuple[int, int, int], n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32))


@pytest.fixture(scope="module")
def synthetic_sets() -> dict[tuple[int, int, int], object]:
    """A small synthetic train split for each tested image shape."""
    out = {}
    for c, h, _ in SHAPES:
        out[(c, h, h)] = get_dataset("synthetic", channels=c, image_size=h, train_size=200, test_size=100).train
    return out


# -- the generic contract ---------------------------------------------------------------------------

all_attacks = pytest.mark.parametrize("name", list_attacks())
# Those that poison the training set at a configurable rate (not a natural backdoor's clean set).
poisoning_attacks = pytest.mark.parametrize("name", [n for n in list_attacks() if attack_class(n).poisons])
all_shapes = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))


def test_registry_is_not_empty() -> None:
    assert {"badnet", "blend"} <= set(list_attacks())


@all_attacks
def test_resolves_to_attack_subclass(name: str) -> None:
    cls = attack_class(name)
    assert issubclass(cls, Attack)
    assert cls.name == name


@all_attacks
@all_shapes
@pytest.mark.parametrize("make_images", [images_u8, images_f32], ids=["uint8", "float32"])
@pytest.mark.parametrize("device", DEVICES)
def test_apply_contract(name: str, shape, make_images, device: str) -> None:
    attack = make(name, shape)
    x = make_images(shape).to(device)
    y = torch.arange(len(x), device=device) % NUM_CLASSES
    x_before, y_before = x.clone(), y.clone()

    out, out_y = attack(x, y)

    # input untouched
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    # dtype, device and shape kept
    assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
    assert out_y.dtype == y.dtype and out_y.device == y.device and out_y.shape == y.shape
    # the output is not the input tensor itself, and the trigger changes something
    assert out.data_ptr() != x.data_ptr()
    assert not torch.equal(out, x)
    # range
    if x.dtype == torch.uint8:
        assert int(out.min()) >= 0 and int(out.max()) <= 255
    else:
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert int(out_y.min()) >= 0 and int(out_y.max()) < NUM_CLASSES


@all_attacks
@all_shapes
def test_test_time_apply_contract(name: str, shape) -> None:
    attack = make(name, shape)
    x = images_u8(shape)
    before = x.clone()
    out = attack.apply(x, test=True)
    assert torch.equal(x, before)
    assert out.dtype == torch.uint8 and out.shape == x.shape


@all_attacks
@all_shapes
def test_pickle_round_trip(name: str, shape) -> None:
    attack = make(name, shape)
    clone = pickle.loads(pickle.dumps(attack))
    assert type(clone) is type(attack) and clone.config == attack.config
    for x in (images_u8(shape), images_f32(shape)):
        y = torch.arange(len(x)) % NUM_CLASSES
        a, ay = attack(x, y)
        b, by = clone(x, y)
        assert torch.equal(a, b) and torch.equal(ay, by)
        assert torch.equal(attack.apply(x, test=True), clone.apply(x, test=True))


@all_attacks
@all_shapes
def test_batched_equals_one_by_one(name: str, shape) -> None:
    attack = make(name, shape)
    index = torch.tensor([7, 3, 11, 0, 42])
    for x in (images_u8(shape, n=5), images_f32(shape, n=5)):
        for kwargs in ({}, {"test": True}, {"cover": True}):
            batched = attack.apply(x, index=index, **kwargs)
            single = torch.cat([attack.apply(x[i : i + 1], index=index[i : i + 1], **kwargs) for i in range(len(x))])
            assert torch.equal(batched, single), kwargs
        # without an index, per-sample draws are shared, so batching still changes nothing
        assert torch.equal(attack.apply(x), torch.cat([attack.apply(x[i : i + 1]) for i in range(len(x))]))


@all_attacks
@all_shapes
def test_same_config_same_trigger(name: str, shape) -> None:
    x = images_u8(shape)
    assert torch.equal(make(name, shape).apply(x), make(name, shape).apply(x))


@poisoning_attacks
@all_shapes
def test_poison_dataset_reproducible(name: str, shape, synthetic_sets) -> None:
    data = synthetic_sets[shape]
    # 10 of 200: clean-label and source-specific attacks draw from one class of 20 samples
    attack = make(name, shape, poison_rate=0.05)
    images_before, labels_before = data.images.copy(), data.labels.copy()

    a = poison_dataset(data, attack, seed=3)
    b = poison_dataset(data, attack, seed=3)
    c = poison_dataset(data, attack, seed=4)

    # the source set is not modified
    assert np.array_equal(data.images, images_before) and np.array_equal(data.labels, labels_before)
    # same seed -> byte-identical output
    assert a.data.images.tobytes() == b.data.images.tobytes()
    assert a.data.labels.tobytes() == b.data.labels.tobytes()
    assert a.poison_index.tobytes() == b.poison_index.tobytes()
    # different seed -> a different choice
    assert not np.array_equal(a.poison_index, c.poison_index)

    n = len(data)
    assert len(a.poison_index) == round(0.05 * n) == 10
    assert np.all(np.diff(a.poison_index) > 0)  # sorted, unique
    assert np.all(np.diff(a.cover_index) > 0)
    assert a.is_poison.sum() == len(a.poison_index)
    assert not (a.is_poison & a.is_cover).any()
    assert a.cover_index.tobytes() == b.cover_index.tobytes()
    assert np.array_equal(a.true_labels, data.labels)
    assert np.all(attack.eligible(data.labels)[a.poison_index])
    target = attack.config.target
    if attack.clean_label:
        # clean label: poisons come from the target class and keep their label
        assert np.all(data.labels[a.poison_index] == target)
        assert np.array_equal(a.data.labels, data.labels)
    else:
        # all_to_one: never poison the target class, and every poisoned label becomes the target
        assert np.all(data.labels[a.poison_index] != target)
        assert np.all(a.data.labels[a.poison_index] == target)
    # cover samples keep their labels; untouched samples stay byte-identical
    assert np.array_equal(a.data.labels[a.cover_index], data.labels[a.cover_index])
    clean = ~a.is_poison & ~a.is_cover
    assert np.array_equal(a.data.images[clean], data.images[clean])
    assert np.array_equal(a.data.labels[clean], data.labels[clean])
    # poisoned and cover samples equal the attack applied to them at their dataset positions
    for index, cover in ((a.poison_index, False), (a.cover_index, True)):
        expected = attack.apply(torch.from_numpy(data.images[index]), index=torch.from_numpy(index), cover=cover)
        assert np.array_equal(a.data.images[index], expected.numpy())


@poisoning_attacks
@pytest.mark.parametrize("rate", [0.013, 0.05, 0.25])
def test_poison_count_is_rounded_rate(name: str, rate: float, synthetic_sets) -> None:
    data = synthetic_sets[(1, 28, 28)]
    attack = make(name, (1, 28, 28), poison_rate=rate, target=2)
    eligible = attack.eligible(data.labels)
    if round(rate * len(data)) > eligible.sum():  # e.g. a clean-label attack asking for more than one class
        with pytest.raises(ValueError, match="eligible"):
            poison_dataset(data, attack, seed=0)
        return
    poisoned = poison_dataset(data, attack, seed=0)
    assert len(poisoned.poison_index) == round(rate * len(data))
    assert np.all(eligible[poisoned.poison_index])
    assert np.all((data.labels[poisoned.poison_index] == 2) == attack.clean_label)


@all_attacks
def test_all_to_all_label_map(name: str, synthetic_sets) -> None:
    if not supports_all_to_all(name):
        # clean-label and source-specific attacks are all-to-one by construction: say so up front
        with pytest.raises(ValueError, match="all_to_one"):
            make(name, (1, 28, 28), mode="all_to_all")
        return
    attack = make(name, (1, 28, 28), mode="all_to_all")
    labels = torch.arange(NUM_CLASSES)
    # BaDExpert's all-to-all: i -> (i - 1) mod C, so 0 -> 9, 1 -> 0, ..., 9 -> 8
    assert attack.target_labels(labels).tolist() == [9, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    data = synthetic_sets[(1, 28, 28)]
    poisoned = poison_dataset(data, attack, seed=0, batch_size=7)
    idx = poisoned.poison_index
    assert np.array_equal(poisoned.data.labels[idx], (data.labels[idx] - 1) % NUM_CLASSES)


@all_attacks
def test_target_out_of_range_raises(name: str) -> None:
    with pytest.raises(ValueError, match="target"):
        make(name, (1, 28, 28), target=NUM_CLASSES)
    make(name, (1, 28, 28), target=NUM_CLASSES - 1)  # the last class is fine


@pytest.mark.parametrize(
    ("name", "mode"),
    # all-to-one-only attacks (CL, SIG, TaCT) refuse all_to_all: test_all_to_all_label_map checks that
    [(n, m) for n in list_attacks() for m in ("all_to_one", "all_to_all")
     if m == "all_to_one" or supports_all_to_all(n)],
)
def test_triggered_testset(name: str, mode: str, synthetic_sets) -> None:
    data = synthetic_sets[(1, 28, 28)]
    attack = make(name, (1, 28, 28), mode=mode, target=3)
    triggered, index = triggered_testset(data, attack, batch_size=17)
    expected_targets = attack.target_labels(torch.from_numpy(data.labels)).numpy()
    # only the samples whose label the attack changes
    assert np.array_equal(index, np.flatnonzero(expected_targets != data.labels))
    if mode == "all_to_one":
        if name in SOURCE_SPECIFIC:  # only the source classes' triggered images count
            assert set(index) < set(np.flatnonzero(data.labels != 3))
        else:
            assert np.array_equal(index, np.flatnonzero(data.labels != 3))
        assert np.all(triggered.labels == 3)
    else:
        assert len(index) == len(data)  # (i - 1) mod C always differs from i
    assert len(triggered) == len(index)
    assert np.all(triggered.labels != data.labels[index])
    assert np.array_equal(triggered.labels, expected_targets[index])
    test_images = attack.apply(torch.from_numpy(data.images[index]), test=True, index=torch.from_numpy(index)).numpy()
    assert np.array_equal(triggered.images, test_images)


# -- BadNet -----------------------------------------------------------------------------------------


@all_shapes
def test_badnet_checkerboard_bottom_right(shape) -> None:
    c, h, w = shape
    attack = make("badnet", shape)  # defaults: 3x3 checkerboard, bottom_right, margin 1
    assert isinstance(attack, BadNet)
    s, m = attack.config.patch_size, attack.config.margin
    assert (s, m) == (3, 1)
    x = images_f32(shape, n=2)
    out = attack.apply(x)
    top, left = h - s - m, w - s - m
    # the patch: 1 where (i + j) is even, 0 elsewhere, in every channel
    checker = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    window = out[:, :, top : top + s, left : left + s]
    assert torch.equal(window, checker.expand_as(window))
    # one-pixel margin to the bottom and right borders, and everything else untouched
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[top : top + s, left : left + s] = True
    assert torch.equal(out[..., ~inside], x[..., ~inside])
    assert torch.equal(out[..., -1, :], x[..., -1, :]) and torch.equal(out[..., :, -1], x[..., :, -1])
    # uint8 images get 0/255 in the patch
    xu = images_u8(shape, n=2)
    outu = attack.apply(xu)
    assert torch.equal(outu[:, :, top : top + s, left : left + s], (checker * 255).to(torch.uint8).expand(2, c, s, s))
    assert torch.equal(outu[..., ~inside], xu[..., ~inside])


def test_badnet_positions() -> None:
    x = torch.zeros(1, 1, 10, 10)
    cases = {"top_left": (1, 1), "top_right": (1, 6), "bottom_left": (6, 1), "bottom_right": (6, 6), "center": (3, 3)}
    for position, (top, left) in cases.items():
        out = make("badnet", (1, 10, 10), position=position, pattern="white").apply(x)
        expected = torch.zeros(10, 10)
        expected[top : top + 3, left : left + 3] = 1
        assert torch.equal(out[0, 0], expected), position
    out = make("badnet", (1, 10, 10), position=(0, 7), pattern="white", patch_size=2).apply(x)
    assert out[0, 0, 0:2, 7:9].eq(1).all() and out.sum() == 4


@pytest.mark.parametrize(
    "overrides",
    [
        {"patch_size": 28},  # 28 + margin 1 > 28
        {"patch_size": 27, "margin": 2},
        {"position": (26, 0)},  # a 3x3 patch from row 26 overruns a 28-row image
        {"position": (-1, 0)},
    ],
)
def test_badnet_patch_that_does_not_fit_raises(overrides: dict) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        make("badnet", (1, 28, 28), **overrides)


def test_badnet_patch_filling_the_image_fits() -> None:
    out = make("badnet", (1, 5, 5), patch_size=5, margin=0, pattern="white").apply(torch.zeros(1, 1, 5, 5))
    assert out.eq(1).all()


def test_badnet_random_pattern_is_seeded() -> None:
    a = make("badnet", (3, 32, 32), pattern="random", seed=1)
    b = make("badnet", (3, 32, 32), pattern="random", seed=1)
    c = make("badnet", (3, 32, 32), pattern="random", seed=2)
    assert torch.equal(a.patch, b.patch) and not torch.equal(a.patch, c.patch)
    assert set(a.patch.unique().tolist()) <= {0.0, 1.0}


# -- Blend ------------------------------------------------------------------------------------------


@all_shapes
def test_blend_formula(shape) -> None:
    attack = make("blend", shape, alpha=0.3, test_alpha=0.6)
    assert isinstance(attack, Blend)
    pattern = attack.pattern
    assert pattern.shape == shape and float(pattern.min()) >= 0 and float(pattern.max()) <= 1
    x = images_f32(shape)
    torch.testing.assert_close(attack.apply(x), 0.7 * x + 0.3 * pattern, rtol=0, atol=1e-6)
    torch.testing.assert_close(attack.apply(x, test=True), 0.4 * x + 0.6 * pattern, rtol=0, atol=1e-6)
    # uint8 goes through [0, 1] and is rounded back
    xu = images_u8(shape)
    expected = ((0.7 * xu.float() / 255 + 0.3 * pattern) * 255).round().to(torch.uint8)
    assert (attack.apply(xu).int() - expected.int()).abs().max() <= 1


def test_blend_test_alpha_defaults_to_alpha() -> None:
    attack = make("blend", (1, 28, 28), alpha=0.25)
    x = images_f32((1, 28, 28))
    assert torch.equal(attack.apply(x, test=True), attack.apply(x))


def test_blend_noise_pattern_is_seeded() -> None:
    a, b, c = (make("blend", (1, 28, 28), seed=s).pattern for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_blend_from_png(shape, tmp_path: Path) -> None:
    c, h, _ = shape
    # an 8x8 RGB image: left half red, right half blue; resized to the data's shape
    array = np.zeros((8, 8, 3), np.uint8)
    array[:, :4, 0] = 255
    array[:, 4:, 2] = 255
    path = tmp_path / "trigger.png"
    Image.fromarray(array).save(path)

    attack = make("blend", shape, pattern=str(path), alpha=0.5)
    pattern = attack.pattern
    assert pattern.shape == shape and pattern.dtype == torch.float32
    assert float(pattern.min()) >= 0 and float(pattern.max()) <= 1
    if c == 3:
        assert pattern[0, :, 0].eq(1).all() and pattern[2, :, 0].eq(0).all()  # left column red
        assert pattern[2, :, -1].eq(1).all() and pattern[0, :, -1].eq(0).all()  # right column blue
    else:
        # grayscale via PIL's ITU-R 601 luma: L = 0.299 R + 0.587 G + 0.114 B
        torch.testing.assert_close(pattern[0, :, 0], torch.full((h,), 0.299), rtol=0, atol=2 / 255)
        torch.testing.assert_close(pattern[0, :, -1], torch.full((h,), 0.114), rtol=0, atol=2 / 255)
    x = images_f32(shape)
    torch.testing.assert_close(attack.apply(x), 0.5 * x + 0.5 * pattern, rtol=0, atol=1e-6)
    assert torch.equal(pickle.loads(pickle.dumps(attack)).apply(x), attack.apply(x))


def test_blend_from_non_image_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "not_an_image.png"
    path.write_text("hello, I am text")
    with pytest.raises(ValueError, match="not_an_image.png"):
        make("blend", (1, 28, 28), pattern=str(path))


def test_blend_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="missing.png"):
        make("blend", (1, 28, 28), pattern=str(missing))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        make("blend", (1, 28, 28), alpha=0)
    with pytest.raises(ValueError):
        make("badnet", (1, 28, 28), poison_rate=1.5)
    with pytest.raises(ValueError):
        make("badnet", (1, 28, 28), no_such_field=1)


def test_too_many_poisons_raises(synthetic_sets) -> None:
    # 200 samples, 20 of class 0 -> 180 eligible; rate 0.95 asks for 190
    data = synthetic_sets[(1, 28, 28)]
    with pytest.raises(ValueError, match="eligible"):
        poison_dataset(data, make("badnet", (1, 28, 28), poison_rate=0.95), seed=0)
