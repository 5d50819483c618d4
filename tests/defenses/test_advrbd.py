"""AdvrBD: the scoring kernel (batched = one at a time, Ray Data = in-process), the enhancement's
batches and decisions, identification against hand-worked cases, and every stage end to end on
local Ray on tiny generated data whose poisoned samples are known."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bdray.attacks import build_attack, poison_dataset
from bdray.config import ConfigError
from bdray.data import DATASETS, DatasetPair, get_dataset, register_dataset
from bdray.defenses.advrbd import (
    AdvrBD,
    AdvrBDConfig,
    AdvrBDPlus,
    AdvrBDPlusConfig,
    CrossCheckConfig,
    EnhanceConfig,
    ExpertConfig,
    ExpertVerdict,
    IdentifyConfig,
    PartitionConfig,
    RelabelConfig,
    RoundRecord,
    SuspectCheckConfig,
    choose_seed_set,
    cross_check,
    cross_fit_experts,
    draw_masks_and_starts,
    expert_class_thresholds,
    expert_flags,
    expert_folds,
    expert_train_rows,
    get_poisoned_training,
    given_label_prob,
    grow_clean_set,
    held_out_given_prob,
    identification_metrics,
    identify_poison,
    list_poisoned_training,
    partition_scores,
    partition_scores_loop,
    premise_check,
    reclaimed,
    relabel,
    relearn_rows,
    round_batches,
    sample_folds,
    suspect_label,
    suspect_scores,
    thin_classes,
    top_fraction,
    unlearn_loss,
)
from bdray.models import ModelSpec
from bdray.train import TrainRecipe, fit, predict_proba

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 10


@register_dataset("advrbd_low_contrast") if "advrbd_low_contrast" not in DATASETS else (lambda f: f)
def low_contrast_synthetic(root: str | None = None, *, train_size: int = 1500, test_size: int = 300) -> DatasetPair:
    """The synthetic set at a fifth of its contrast plus pixel noise: clean samples sit near class
    boundaries (sensitive) while a white corner patch is a loud feature (robust), the regime the paper
    assumes. At full contrast the poisoned samples are the sensitive ones (see configs/advrbd_smoke.yaml)."""
    pair = get_dataset("synthetic", num_classes=NUM_CLASSES, image_size=16, train_size=train_size,
                       test_size=test_size, noise=20.0)

    def soften(images: np.ndarray, seed: int) -> np.ndarray:
        noise = np.random.default_rng(seed).normal(0, 30, images.shape)
        return np.clip(128 + (images.astype(np.float32) - 128) * 0.2 + noise, 0, 255).astype(np.uint8)

    return DatasetPair(pair.train.replace(images=soften(pair.train.images, 1)),
                       pair.test.replace(images=soften(pair.test.images, 2)))


def spec(width: int = 8) -> ModelSpec:
    return ModelSpec(name="compact_cnn", in_channels=1, num_classes=NUM_CLASSES, image_size=16, mean=[0.5],
                     std=[0.5], kwargs={"width": width})


@pytest.fixture(scope="module")
def poisoned():
    pair = get_dataset("advrbd_low_contrast")
    attack = build_attack({"name": "badnet", "poison_rate": 0.05, "target": 0, "patch_size": 3, "pattern": "white"},
                          image_shape=pair.train.image_shape, num_classes=NUM_CLASSES)
    return poison_dataset(pair.train, attack, seed=0)


@pytest.fixture(scope="module")
def partition_model(poisoned):
    torch.manual_seed(0)
    return fit(spec().build(), poisoned.data, TrainRecipe(epochs=5, batch_size=64), seed=0)


# -- configuration --------------------------------------------------------------------------------


def test_registry_and_faithful_defaults() -> None:
    assert {"advrbd", "advrbd+"} <= set(list_poisoned_training())
    faithful = get_poisoned_training({"name": "advrbd"}).config
    plus = get_poisoned_training({"name": "advrbd+"}).config
    assert isinstance(plus, AdvrBDPlusConfig) and type(faithful) is AdvrBDConfig
    assert faithful.identify.last_rounds == 1 and faithful.enhance.grow_by == "partition"
    assert faithful.enhance.clean_fraction == 0.5 and not faithful.premise.check
    assert plus.identify.last_rounds > 1 and plus.premise.check
    assert faithful.relabel.rule == "argmax" and faithful.relabel.rounds == 1
    assert plus.relabel.rule == "plausible" and plus.relabel.rounds == 2
    assert not faithful.expert.enabled and not faithful.relabel.drop_kept
    assert plus.expert.enabled and plus.relabel.drop_kept and plus.expert.recipe.label_shift == 1
    assert faithful.expert.folds == 1 and plus.expert.folds == 3
    assert faithful.expert.rounds == 1 and plus.expert.rounds == 4
    assert faithful.relabel.reclaim is None and faithful.relabel.relearn_from == "model"
    assert plus.relabel.reclaim == 0.7 and plus.relabel.relearn_from == "scratch"
    assert not faithful.crosscheck.enabled and plus.crosscheck.enabled
    assert faithful.crosscheck.min_class_share is None and plus.crosscheck.min_class_share == 0.33


def test_advrbd_plus_keeps_its_changes_when_a_section_is_given_partly() -> None:
    # A config that sets the enhancement budget (rounds, lr) must still run advrbd+'s batch mix.
    plus = AdvrBDPlusConfig.model_validate({"enhance": {"rounds": 4, "lr": 0.02}, "identify": {}, "premise": {}})
    assert plus.enhance.rounds == 4 and plus.enhance.lr == 0.02
    assert plus.enhance.clean_fraction == 0.7 and plus.enhance.grow_by == "loss"
    assert plus.identify.last_rounds == 3 and plus.premise.check
    # What a config states explicitly wins.
    assert AdvrBDPlusConfig.model_validate({"enhance": {"clean_fraction": 0.6}}).enhance.clean_fraction == 0.6
    # The cross-check's class guard stays on when a config sets only its rounds; unset, it is gone.
    rounds = AdvrBDPlusConfig.model_validate({"crosscheck": {"rounds": 2}}).crosscheck
    assert rounds.enabled and rounds.rounds == 2 and rounds.min_class_share == 0.33
    unguarded = AdvrBDPlusConfig.model_validate({"crosscheck": {"min_class_share": None}})
    assert "min_class_share" not in unguarded.model_dump(mode="json")["crosscheck"]
    # Turned off, it leaves the dump: the advrbd+ measured before it keeps its stage and results keys.
    assert "crosscheck" not in AdvrBDPlusConfig.model_validate({"crosscheck": {"enabled": False}}).model_dump()


def test_config_rejects_a_schedule_that_leaves_nothing_to_learn() -> None:
    with pytest.raises(ValueError, match="leaves nothing to learn"):
        AdvrBDConfig.model_validate({"partition": {"rate": 0.5}, "enhance": {"rounds": 6, "growth": 0.1}})
    with pytest.raises(ValueError, match="exceeds enhance.rounds"):
        AdvrBDConfig.model_validate({"enhance": {"rounds": 2}, "identify": {"last_rounds": 3}})


@pytest.mark.parametrize("name", ["advrbd.yaml", "advrbd_smoke.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    from bdray.advrbd_run import load_advrbd_config

    config = load_advrbd_config(ROOT / "configs" / name)
    plus = load_advrbd_config(ROOT / "configs" / name, ["defense.name=advrbd+"])
    assert config.defense.name == "advrbd" and isinstance(plus.defense, AdvrBDPlusConfig)
    # The shipped config leaves advrbd+'s changes to it: --set defense.name=advrbd+ runs advrbd+.
    assert plus.defense.enhance.clean_fraction == AdvrBDPlusConfig().enhance.clean_fraction
    assert plus.defense.identify.last_rounds == AdvrBDPlusConfig().identify.last_rounds


def test_bad_fields_are_reported_with_their_path() -> None:
    from bdray.advrbd_run import load_advrbd_config

    with pytest.raises(ConfigError) as info:
        load_advrbd_config(ROOT / "configs" / "advrbd_smoke.yaml",
                           ["defense.enhance.unlearn=forget", "attack.patch_sizee=3", "defense.partition.eps=2"])
    text = str(info.value)
    assert "defense.enhance.unlearn" in text and "attack.patch_sizee: unknown key" in text
    assert "defense.partition.eps" in text


def test_the_runner_takes_every_poisoned_training_defense(ray_session, tmp_path: Path) -> None:
    from bdray.advrbd_run import load_advrbd_config, run_advrbd
    from bdray.stages import StageStore

    smoke = ROOT / "configs" / "advrbd_smoke.yaml"
    with pytest.raises(ConfigError, match="defense.name: unknown poisoned-training defense 'abll'"):
        load_advrbd_config(smoke, ["defense={name: abll}"])
    with pytest.raises(ConfigError, match="defense.beta"):
        load_advrbd_config(smoke, ["defense={name: cutmix, beta: 0}"])
    config = load_advrbd_config(smoke, ["defense={name: cutmix, train: {epochs: 2, batch_size: 64}}",
                                        f"storage={tmp_path}", "tracking.enabled=false"])
    summary = run_advrbd(config, progress=lambda _: None)
    assert summary["defense"] == "cutmix" and 0.5 < summary["final_acc"] <= 1 and 0 <= summary["final_asr"] <= 1
    again = run_advrbd(config, progress=lambda _: None)
    assert again["final_acc"] == summary["final_acc"]  # the stage's model, reused
    assert [e["stage"] for e in StageStore(tmp_path / "stages").executions()] == ["poisoned_training_cutmix"]


# -- Algorithm 1 ----------------------------------------------------------------------------------


def test_masks_are_patches_of_the_radius_and_do_not_depend_on_the_batch() -> None:
    masks, starts = draw_masks_and_starts(np.arange(6), (1, 16, 16), radius=2, seed=3)
    again, again_starts = draw_masks_and_starts(np.array([4]), (1, 16, 16), radius=2, seed=3)
    assert torch.equal(masks[4], again[0]) and torch.equal(starts[4], again_starts[0])
    sizes = masks.sum((1, 2, 3))
    assert (sizes <= 25).all() and (sizes >= 9).all()  # 5x5, clipped to at least 3x3 in a corner
    assert starts.abs().max() <= 1


def test_batched_scores_equal_the_per_sample_loop(poisoned, partition_model) -> None:
    images = poisoned.data.images[:24]
    config = PartitionConfig(radius=2, steps=3)
    batched = partition_scores(partition_model, images, config, seed=1, batch_size=10)
    loop = partition_scores_loop(partition_model, images, config, seed=1)
    np.testing.assert_allclose(batched, loop, rtol=1e-4, atol=1e-6)
    assert (batched > 0).all()
    # PGD only adds to the random start's KL (the best iterate is kept).
    start_only = partition_scores(partition_model, images, PartitionConfig(radius=2, steps=0), seed=1)
    assert (batched >= start_only - 1e-6).all() and batched.mean() > start_only.mean()


def test_poisoned_samples_are_robust_here_and_the_seed_set_is_clean(poisoned, partition_model) -> None:
    scores = partition_scores(partition_model, poisoned.data.images, PartitionConfig(radius=2, steps=2), seed=0)
    seed_mask = top_fraction(scores, 0.1)
    assert seed_mask.sum() == 150
    assert poisoned.is_poison[seed_mask].mean() < 0.01  # 5% of the data is poisoned


def test_premise_check_flags_a_seed_set_dominated_by_one_class() -> None:
    labels = np.repeat(np.arange(4), 25)
    even = np.zeros(100, bool)
    even[::10] = True  # 3 / 3 / 2 / 2 of the classes
    skewed = np.zeros(100, bool)
    skewed[:10] = True  # all from class 0
    assert premise_check(labels, even, 4)["premise_class_ratio"] == pytest.approx(1.2)
    out = premise_check(labels, skewed, 4)
    assert out["premise_class"] == 0 and out["premise_class_ratio"] == pytest.approx(4.0)
    config = AdvrBDConfig.model_validate({"premise": {"check": True, "on_violation": "balance"}})
    scores = np.where(labels == 0, 10.0, 1.0) + np.arange(100) * 1e-3
    seed_mask, premise = choose_seed_set(scores, labels, 4, config)
    assert premise["premise_violated"] == 1.0
    assert np.bincount(labels[seed_mask], minlength=4).tolist() == [2, 2, 2, 2]  # rebalanced, 10% per class


# -- Algorithm 2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ascent", "shifted_label", "complement"])
def test_unlearn_losses_push_the_given_label_down(kind: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5, requires_grad=True)
    labels = torch.arange(8) % 5
    loss = unlearn_loss(logits, labels, EnhanceConfig(unlearn=kind)).mean()
    (grad,) = torch.autograd.grad(loss, logits)
    after = logits.detach() - 1.0 * grad
    before_p = logits.detach().softmax(1)[torch.arange(8), labels]
    after_p = after.softmax(1)[torch.arange(8), labels]
    assert after_p.mean() < before_p.mean()
    if kind != "shifted_label":  # CE on y+1 may let p_y rise for a sample whose other logits fall faster
        assert (after_p < before_p).all()


def test_round_batches_mix_the_sets_and_split_evenly_across_workers() -> None:
    clean = np.zeros(100, bool)
    clean[:20] = True
    one = round_batches(clean, 10, 0.7, 12, seed=0, round_=1)
    assert all(len(c) == 7 and len(r) == 3 for c, r in one)
    assert all(clean[c.numpy()].all() and not clean[r.numpy()].any() for c, r in one)
    assert len({int(i) for c, _ in one for i in c}) == 20  # the small set is cycled through
    two = [round_batches(clean, 10, 0.7, 12, seed=0, round_=1, rank=k, world_size=2) for k in range(2)]
    for (c, r), (c0, r0), (c1, r1) in zip(one, *two, strict=True):
        assert sorted(torch.cat([c0, c1]).tolist()) == sorted(c.tolist())
        assert sorted(torch.cat([r0, r1]).tolist()) == sorted(r.tolist())


def test_growth_adds_from_the_rest_only() -> None:
    clean = np.zeros(10, bool)
    clean[[0, 1]] = True
    labels = np.zeros(10, np.int64)
    probs = np.full((10, 2), 0.5)
    probs[:, 0] = np.linspace(0.9, 0.1, 10)  # the later a sample, the less the model fits it
    partition = np.arange(10, dtype=np.float32)
    by_kl = grow_clean_set(clean, EnhanceConfig(grow_by="partition"), n_add=3, partition=partition, probs=probs,
                           labels=labels)
    assert np.flatnonzero(by_kl).tolist() == [0, 1, 7, 8, 9]
    by_loss = grow_clean_set(clean, EnhanceConfig(grow_by="loss"), n_add=2, partition=-partition, probs=probs,
                             labels=labels)
    assert np.flatnonzero(by_loss).tolist() == [0, 1, 8, 9]


def test_identification_rule_and_metrics() -> None:
    fits = [np.array([1, 1, 0, 0, 1, 0], bool), np.array([1, 0, 0, 1, 1, 0], bool)]
    records = [RoundRecord(r, np.zeros(6, bool), f) for r, f in enumerate(fits)]
    assert identify_poison(records, IdentifyConfig(last_rounds=1)).tolist() == fits[1].tolist()
    assert identify_poison(records, IdentifyConfig(last_rounds=2)).tolist() == [1, 1, 0, 1, 1, 0]
    truth = np.array([1, 1, 0, 0, 0, 0], bool)
    m = identification_metrics(np.array([1, 0, 0, 1, 1, 0], bool), truth)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["fpr"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.4) and m["leaked"] == 1


def test_plausible_relabel_changes_only_flagged_labels_the_model_rejects() -> None:
    from bdray.data.base import ImageSet

    data = ImageSet(np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 0, 1, 2]), num_classes=3)
    flagged = np.array([True, True, False, True])
    probs = np.array([[0.30, 0.60, 0.10],   # flagged, given label plausible: kept by 'plausible'
                      [0.01, 0.04, 0.95],   # flagged, given label implausible: relabeled to 2
                      [0.90, 0.05, 0.05],   # not flagged: never touched
                      [0.50, 0.48, 0.02]])  # flagged, p(given) = 0.02 < 0.05: relabeled to 0
    assert relabel(data, flagged, probs).labels.tolist() == [1, 2, 1, 0]  # the paper: argmax of every flagged
    plausible = relabel(data, flagged, probs, RelabelConfig(rule="plausible", min_prob=0.05))
    assert plausible.labels.tolist() == [0, 2, 1, 0]
    assert relabel(data, flagged, probs, RelabelConfig(rule="plausible", min_prob=0.5)).labels.tolist() == [1, 2, 1, 0]
    assert data.labels.tolist() == [0, 0, 1, 2]  # the input is not modified
    # A label rejected in an earlier round stays rejected, and the given label is never the new one,
    # even when the latest model finds it most likely (it may have learned the trigger meanwhile).
    rejected = np.array([True, False, False, False])
    later = relabel(data, flagged, probs[[2, 1, 2, 3]], RelabelConfig(rule="plausible"), rejected)
    assert later.labels.tolist() == [1, 2, 1, 0]


def test_expert_keeps_the_flags_it_confirms_and_relearn_drops_kept_labels() -> None:
    from bdray.data.base import ImageSet

    flagged = np.array([True, True, True, False, False])
    given = np.array([0.95, 0.40, 0.91, 0.99, 0.10])  # the expert's p(given label)
    assert expert_flags(given, flagged, ExpertConfig(enabled=True)).tolist() == [True, False, True, False, False]
    assert expert_flags(given, flagged, ExpertConfig(enabled=True, threshold=0.3)).tolist() == [True] * 3 + [False] * 2
    assert expert_flags(given, flagged, ExpertConfig()).tolist() == flagged.tolist()  # disabled: identification's
    with pytest.raises(ValueError, match="label_shift"):
        ExpertConfig(enabled=True, recipe=TrainRecipe(label_shift=0))
    # Cross-fitted: the threshold decides for every sample, so an identified clean one can be flagged.
    crossed = ExpertConfig(enabled=True, folds=2)
    assert expert_flags(given, flagged, crossed).tolist() == [True, False, True, True, False]

    # Class 1's identified clean samples mostly keep their label under the held-out experts (median
    # 0.96 > 0.9): the experts never learned its shift, so an identified sample of class 1 is flagged
    # only above the class's 0.7 quantile. Class 0's median is low (a target class): threshold 0.9.
    # A flagged sample of class 1 still goes by 0.9.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    flags = np.array([False, False, False, True, False, False, False, False, True])
    p = np.array([0.1, 0.2, 0.95, 0.97, 0.93, 0.96, 0.97, 0.99, 0.92])
    thresholds = expert_class_thresholds(p, flags, labels, crossed)
    assert thresholds[0] == 0.9 and thresholds[1] == pytest.approx(np.quantile([0.93, 0.96, 0.97, 0.99], 0.7))
    assert expert_flags(p, flags, crossed, labels).tolist() == [False, False, True, True, False, False,
                                                                  False, True, True]
    assert expert_flags(p, flags, crossed).tolist() == (p > 0.9).tolist()  # no labels: the plain threshold
    no_classes = ExpertConfig(enabled=True, folds=2, class_quantile=None)
    assert expert_flags(p, flags, no_classes, labels).tolist() == (p > 0.9).tolist()
    # A reference set (the seed set's members) narrows whose p sets a class's threshold: class 1's
    # leaked poisons (p 0.97, 0.99) no longer raise it when only its seed members (0.93, 0.96) count.
    seed_members = np.array([True, True, False, False, True, True, False, False, False])
    assert expert_class_thresholds(p, flags, labels, crossed, seed_members).tolist() == [0.9, pytest.approx(
        np.quantile([0.93, 0.96], 0.7))]
    members_low = np.array([True, True, False, False, True, False, False, False, False])  # class 1: 0.93 only
    assert expert_class_thresholds(p, flags, labels, crossed, members_low)[1] == pytest.approx(0.93)
    assert expert_flags(p, flags, crossed, labels, seed_members).tolist() == [False, False, True, True, False,
                                                                                True, True, True, True]

    identified = np.array([True, False, False, False, False, False, True])
    fold = expert_folds(identified, ExpertConfig(enabled=True, folds=2), seed=0)
    assert (fold[identified] == -1).all() and set(fold[~identified]) <= {0, 1}
    assert fold.tolist() == expert_folds(identified, ExpertConfig(enabled=True, folds=2), seed=0).tolist()
    rows = [expert_train_rows(fold, j, 2) for j in range(2)]
    assert sorted(np.concatenate(rows).tolist()) == np.flatnonzero(~identified).tolist()  # each row in one
    assert expert_train_rows(np.where(identified, -1, 0), 0, 1).tolist() == np.flatnonzero(~identified).tolist()
    probs = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    held_out = held_out_given_prob(probs, fold)
    for i in range(7):  # a flagged sample: both experts' mean; an identified clean one: the expert without its fold
        want = probs[:, i].mean() if identified[i] else probs[fold[i], i]
        assert identified[i] or i not in rows[fold[i]]
        assert held_out[i] == pytest.approx(want)

    data = ImageSet(np.zeros((5, 1, 2, 2), np.uint8), np.array([0, 0, 1, 2, 2]), num_classes=3)
    relabeled = data.replace(labels=np.array([0, 1, 1, 2, 0]))
    # Sample 0 is flagged and kept its given label: dropped; 1 was relabeled; 2 kept its label but is
    # not flagged (the expert cleared it); 4 changed without a flag (an earlier round's rejection).
    assert relearn_rows(relabeled, data, np.array([True, True, False, False, False]),
                        RelabelConfig(drop_kept=True)).tolist() == [1, 2, 3, 4]
    assert relearn_rows(relabeled, data, flagged, RelabelConfig()).tolist() == [0, 1, 2, 3, 4]


def test_reclaim_gives_back_the_kept_labels_the_model_predicts_itself() -> None:
    from bdray.data.base import ImageSet

    data = ImageSet(np.zeros((6, 1, 2, 2), np.uint8), np.array([0, 0, 1, 2, 2, 1]), num_classes=3)
    relabeled = data.replace(labels=np.array([0, 0, 1, 2, 0, 1]))  # sample 4 was relabeled 2 -> 0
    flagged = np.array([True, True, True, False, True, False])
    probs = np.array([[0.80, 0.10, 0.10],   # flagged, kept, predicted 0 at 0.8: reclaimed at 0.5, not at 0.9
                      [0.45, 0.50, 0.05],   # flagged, kept, its label is not the argmax: dropped
                      [0.30, 0.60, 0.10],   # flagged, kept, argmax 1 at 0.6
                      [0.10, 0.10, 0.80],   # not flagged
                      [0.96, 0.02, 0.02],   # flagged, relabeled
                      [0.10, 0.80, 0.10]])  # not flagged
    assert reclaimed(data.labels, probs, 0.5).tolist() == [True, False, True, True, False, True]
    drop = RelabelConfig(drop_kept=True)
    assert relearn_rows(relabeled, data, flagged, drop, probs).tolist() == [3, 4, 5]
    assert relearn_rows(relabeled, data, flagged, drop.model_copy(update={"reclaim": 0.5}),
                        probs).tolist() == [0, 2, 3, 4, 5]
    assert relearn_rows(relabeled, data, flagged, drop.model_copy(update={"reclaim": 0.9}),
                        probs).tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="probs"):
        relearn_rows(relabeled, data, flagged, drop.model_copy(update={"reclaim": 0.5}))
    assert relearn_rows(relabeled, data, flagged, RelabelConfig(reclaim=0.5), probs).tolist() == list(range(6))
    # Left out of the dump at their defaults: configs that do not use them keep their stage keys.
    assert set(RelabelConfig().model_dump()) == {"rule", "min_prob", "rounds", "drop_kept"}
    assert RelabelConfig(drop_kept=True, reclaim=0.5, relearn_from="scratch").model_dump()["reclaim"] == 0.5


def test_relearn_from_scratch_trains_a_new_model_on_the_reclaimed_set(poisoned, partition_model) -> None:
    # six epochs: a fresh model that knows the classes well enough to give any label back
    base = {"partition": {"radius": 2, "steps": 2}, "enhance": {"rounds": 3, "growth": 0.1, "batch_size": 64},
            "identify": {"last_rounds": 2}, "clean_train": {"epochs": 6, "batch_size": 64},
            "relearn": {"epochs": 1, "batch_size": 64, "lr": 0.01}, "expert": {"folds": 1}}
    config = AdvrBDPlusConfig.model_validate({**base, "relabel": {"reclaim": 0.5, "relearn_from": "scratch"}})
    assert config.relabel.rule == "plausible" and config.relabel.drop_kept  # advrbd+'s, kept
    defense = AdvrBDPlus(config, spec().build).fit(poisoned.data, seed=0, poisoned_model=partition_model)
    finetuned = AdvrBDPlus(AdvrBDPlusConfig.model_validate(base), spec().build).fit(
        poisoned.data, seed=0, poisoned_model=partition_model)
    assert np.array_equal(defense.flagged_, finetuned.flagged_)  # the same stages up to the relearn
    # From scratch: no weight shared with the fresh model it relabeled with.
    fresh, new = defense.clean_model_.state_dict(), defense.relearned_model_.state_dict()
    assert not any(torch.equal(fresh[k], new[k]) for k in fresh if k.endswith("weight"))
    probs = predict_proba(defense.clean_model_, poisoned.data.images)
    back = reclaimed(poisoned.data.labels, probs, 0.5) & defense.flagged_
    back &= defense.relabeled_.labels == poisoned.data.labels
    # The fresh model gives back flagged clean samples and no poison (it never learned the trigger).
    assert back.sum() > 0 and not (back & poisoned.is_poison).any()
    clean = ~poisoned.is_poison
    acc = predict_proba(defense.relearned_model_, poisoned.data.images).argmax(1)[clean]
    assert (acc == poisoned.data.labels[clean]).mean() > 0.6


def test_in_process_cross_check_trains_label_models_and_only_adds_flags(poisoned, partition_model) -> None:
    config = AdvrBDPlusConfig.model_validate({
        "partition": {"radius": 2, "steps": 2}, "enhance": {"rounds": 3, "growth": 0.1, "batch_size": 64},
        "identify": {"last_rounds": 2}, "clean_train": {"epochs": 2, "batch_size": 64},
        "expert": {"folds": 1},
        "crosscheck": {"enabled": True, "folds": 2, "rounds": 2, "suspect": {"folds": 2, "min_class_share": 0}},
    })
    defense = AdvrBDPlus(config, spec().build).fit(poisoned.data, seed=0, poisoned_model=partition_model)
    assert np.array_equal(defense.pre_crosscheck_, defense.expert_.flagged)
    assert (defense.flagged_ >= defense.pre_crosscheck_).all() and defense.flagged_ is defense.crosscheck_.flagged
    assert len(defense.label_models_) == 2 * len(defense.crosscheck_.history) >= 2
    # the suspect-label check names the target, or no label where none of the flagged samples' labels is
    # implausible (this tiny set, where most of it is flagged by then); its models are kept apart
    verdict = defense.crosscheck_
    assert verdict.suspect in (None, 0) and len(defense.suspect_models_) <= (0 if verdict.suspect is None else 2)
    assert (verdict.flagged >= verdict.history[-1]).all()


def test_in_process_expert_unflags_clean_samples_and_keeps_the_poisons(poisoned, partition_model) -> None:
    config = AdvrBDPlusConfig.model_validate({
        "partition": {"radius": 2, "steps": 2},
        "enhance": {"rounds": 3, "growth": 0.1, "batch_size": 64},
        "identify": {"last_rounds": 2},
        "clean_train": {"epochs": 1, "batch_size": 64}, "relearn": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "expert": {"folds": 1}, "crosscheck": {"enabled": False},  # the expert's flags alone
    })
    defense = AdvrBDPlus(config, spec().build).fit(poisoned.data, seed=0, poisoned_model=partition_model)
    before = identification_metrics(defense.identified_, poisoned.is_poison)
    after = identification_metrics(defense.flagged_, poisoned.is_poison)
    assert len(defense.expert_models_) == 1
    assert not (defense.flagged_ & ~defense.identified_).any()  # one expert only un-flags
    # Most false positives go back; on this tiny, weakly implanted model the expert keeps most poisons
    # (Fashion-MNIST BadNet: 3 of 491 un-flagged, docs/advrbd.md).
    assert before["recall"] > 0.95 and after["recall"] > 0.8
    assert after["fpr"] < 0.5 * before["fpr"] and after["precision"] > 1.5 * before["precision"]


def test_cross_check_flags_what_a_held_out_model_disowns_round_after_round() -> None:
    # Hand-made label models: model j "trains" on rows and gives p(given) 0.05 to sample 3 unless sample
    # 4 is among its rows (4 is a poison that teaches the trigger to whoever trains on it), 0.1 to
    # sample 4 always, 0.9 to everything else.
    flagged = np.array([True, False, False, False, False, False, False, False])
    calls: list[tuple[int, list[int], list[bool]]] = []

    def train_model(j: int, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        calls.append((j, rows.tolist(), excluded.tolist()))
        p = np.full(len(flagged), 0.9)
        p[4] = 0.1
        p[3] = 0.95 if 4 in rows else 0.05
        return p

    config = CrossCheckConfig(enabled=True, folds=2, threshold=0.2, rounds=3)
    labels = np.zeros(len(flagged), np.int64)
    verdict = cross_check(flagged, labels, config, seed=0, train_model=train_model)
    first = calls[:2]
    assert [j for j, _, _ in first] == [0, 1]
    for _, rows, excluded in first:  # no model trains on a flagged sample, each unflagged one in one model's rows
        assert 0 not in rows and excluded == flagged.tolist()
    assert sorted(first[0][1] + first[1][1]) == list(range(1, 8))
    # Round 0 flags 4 (disowned by whoever did not see it); 3 only when the model judging it also missed 4.
    assert verdict.history[0][4] and verdict.history[0][0] and not verdict.history[0][[1, 2, 5, 6, 7]].any()
    # Round 1's models train without 4, so they disown 3; round 2 adds nothing and ends it.
    assert verdict.flagged.tolist() == [True, False, False, True, True, False, False, False]
    assert len(verdict.history) == 3 and (verdict.history[1] == verdict.history[2]).all()
    assert all(4 not in rows for _, rows, _ in calls[2:])
    # One round stops after the first decision; flags are only ever added.
    once = cross_check(flagged, labels, config.model_copy(update={"rounds": 1}), seed=0, train_model=train_model)
    assert len(once.history) == 1 and (once.flagged >= flagged).all()
    # A class left with few samples called clean is left alone (min_class_share): 3 and 4 are class 1's
    # only two, against five of class 0 (median 3.5).
    two = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    assert thin_classes(flagged, two, CrossCheckConfig(min_class_share=0.9)).tolist() == [False, True]
    assert not thin_classes(flagged, two, CrossCheckConfig(min_class_share=0.5)).any()
    assert not thin_classes(flagged, two, CrossCheckConfig()).any()  # unset: every class
    guarded = cross_check(flagged, two, config.model_copy(update={"min_class_share": 0.9}), seed=0,
                          train_model=train_model)
    assert np.array_equal(guarded.flagged, flagged) and len(guarded.history) == 1
    assert "min_class_share" not in CrossCheckConfig(enabled=True).model_dump(mode="json")
    # Left out of the config dump while disabled: configs without it keep their stage keys.
    assert "crosscheck" not in AdvrBDConfig().model_dump(mode="json")
    assert AdvrBDConfig(crosscheck={"enabled": True}).model_dump(mode="json")["crosscheck"]["threshold"] == 0.1


def test_suspect_check_judges_the_suspect_label_with_models_that_saw_one_fold_of_it() -> None:
    # Twenty samples labeled 0, twelve labeled 1. Flagged: 0-3 (label 0, the cross-check's models find
    # the label implausible: the suspect) and 20 (label 1, plausible). Leaked: 4 and 5, labeled 0.
    # Hand-made suspect models give a leaked poison p(0) 0.01 and any other label-0 sample 0.5 (raw: the
    # model saw a fold of the label); the label-1 samples 0.9.
    labels = np.array([0] * 20 + [1] * 12)
    flagged = np.zeros(32, bool)
    flagged[[0, 1, 2, 3, 20]] = True
    leaked = np.zeros(32, bool)
    leaked[[4, 5]] = True
    cross = np.full(32, 0.9)
    cross[:4] = 0.01

    def train_model(_j: int, _rows: np.ndarray, _excluded: np.ndarray) -> np.ndarray:
        return cross

    calls: list[tuple[int, np.ndarray, np.ndarray]] = []

    def train_suspect(j: int, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        calls.append((j, rows, excluded))
        return np.where(leaked, 0.01, np.where(labels == 0, 0.5, 0.9))

    config = CrossCheckConfig(enabled=True, folds=2, threshold=0.05, suspect=SuspectCheckConfig(folds=4))
    assert config.suspect.min_class_share == 0.5  # label 0's 16 against label 1's 11: not thin
    verdict = cross_check(flagged, labels, config, 0, train_model, train_suspect)
    assert verdict.suspect == 0 and np.array_equal(verdict.history[-1], flagged)  # the rounds flag nothing
    pool = ~flagged & (labels == 0)  # 6..19 and the two leaked
    assert [j for j, _, _ in calls] == [0, 1, 2, 3]
    seen, expected = np.zeros(32, int), np.zeros(32)
    for _, rows, excluded in calls:
        mask = np.zeros(32, bool)
        mask[rows] = True
        assert np.array_equal(excluded, ~mask) and not (mask & flagged).any()
        assert (mask[~flagged & (labels == 1)]).all()  # every other label's unflagged samples
        seen += mask & pool
        odds = pool.sum() / (mask & pool).sum()  # the inverse of the share of the label it saw
        expected[pool & ~mask] += odds * 0.5 / (odds * 0.5 + 0.5) / 3  # three models judge each sample
    assert (seen[pool] == 1).all()  # each pool sample in one model's fold
    # 0.5 raw under a model that saw a quarter of the label: about 0.8 prior-corrected; the leaked stay < 0.2
    score = verdict.suspect_score
    assert np.isnan(score[~pool]).all() and np.allclose(score[pool & ~leaked], expected[pool & ~leaked])
    assert (score[pool & ~leaked] > 0.6).all() and (score[leaked] < 0.2).all()
    assert verdict.flagged.tolist() == (flagged | leaked).tolist()
    # No flagged sample implausible: no suspect, the check trains nothing.
    calls.clear()
    assert suspect_label(flagged, labels, np.full(32, 0.9), SuspectCheckConfig()) is None
    quiet = cross_check(flagged, labels, config, 0, lambda *_: np.full(32, 0.9), train_suspect)
    assert quiet.suspect is None and not calls and np.array_equal(quiet.flagged, flagged)
    # A thin suspect class (its own min_class_share, whatever the rounds' guard) is left alone.
    fewer = flagged | ((labels == 0) & (np.arange(32) < 14))  # 6 label-0 samples left against 11
    thin = cross_check(fewer, labels, config.model_copy(update={"suspect": SuspectCheckConfig(min_class_share=0.9)}),
                       0, train_model, train_suspect)
    assert thin.suspect == 0 and thin.suspect_score is None and not calls and np.array_equal(thin.flagged, fewer)
    unguarded = config.model_copy(update={"suspect": SuspectCheckConfig(folds=4, min_class_share=0)})
    assert cross_check(fewer, labels, unguarded, 0, train_model, train_suspect).suspect_score is not None and calls
    calls.clear()
    # A pool smaller than the folds: the empty folds train nothing.
    few = suspect_scores(flagged | (labels == 0) & (np.arange(32) > 5), labels, 0, SuspectCheckConfig(folds=8), 0,
                         train_suspect)
    assert len(calls) <= 2 and np.isnan(few[6:]).all()
    # Left out of the dump while unset: the configs measured before it keep their keys.
    assert "suspect" not in CrossCheckConfig(enabled=True).model_dump(mode="json")
    assert CrossCheckConfig(suspect={}).model_dump(mode="json")["suspect"] == {
        "folds": 10, "threshold": 0.2, "implausible": 0.05, "min_class_share": 0.5}
    assert CrossCheckConfig(suspect={"rebalance": "oversample"}).model_dump(mode="json")["suspect"]["rebalance"] == (
        "oversample")


def test_suspect_check_oversamples_the_fold_instead_of_correcting_the_prior() -> None:
    # Label 0: 16 unflagged samples in 4 folds; label 1: 8. Each model's rows repeat its fold of label 0
    # round(16 / fold size) times, so it trains on the label at about its share, and its p is the score as
    # it is (no label-shift correction); the excluded samples are the prior mode's.
    labels = np.array([0] * 16 + [1] * 8)
    flagged = np.zeros(24, bool)
    raw = np.where(np.arange(24) < 2, 0.05, 0.5)  # 0 and 1: leaked poisons
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def train(_j: int, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        calls.append((rows, excluded))
        return raw

    over = suspect_scores(flagged, labels, 0, SuspectCheckConfig(folds=4, rebalance="oversample"), 0, train)
    fold = sample_folds(labels != 0, 4, 0, 6)
    prior_calls = list(calls)
    calls.clear()
    prior = suspect_scores(flagged, labels, 0, SuspectCheckConfig(folds=4), 0, train)
    assert len(calls) == len(prior_calls) == len(set(fold[fold >= 0]))
    for (rows, excluded), (plain, plain_excluded), j in zip(prior_calls, calls, sorted(set(fold[fold >= 0])),
                                                            strict=True):
        assert np.array_equal(excluded, plain_excluded) and np.array_equal(np.unique(rows), plain)
        counts = np.bincount(rows, minlength=24)
        repeats = max(1, round(16 / (fold == j).sum()))
        assert (counts[fold == j] == repeats).all() and (counts[labels == 1] == 1).all()
        assert (counts[(labels == 0) & (fold != j)] == 0).all() and (np.diff(rows) >= 0).all()
    judged = labels == 0
    assert np.allclose(over[judged], raw[judged]) and np.isnan(over[~judged]).all()
    assert (prior[judged] > over[judged]).all()  # the prior mode corrects upwards: each model saw a quarter


@pytest.mark.parametrize("rebalance", ["prior", "oversample"])
def test_suspect_scores_rank_leaked_poisons_below_clean_samples(poisoned, rebalance: str) -> None:
    # A quarter of the poisons (target 0) leaked; half of the rest of the data is flagged with the other
    # poisons. Label models from scratch, each on every other label's samples and a quarter of label 0's
    # (prior-corrected, or that quarter oversampled), give the leaked poisons a lower p(0) than the clean ones.
    is_poison, labels = poisoned.is_poison, poisoned.data.labels
    rng = np.random.default_rng(2)
    leaked = is_poison & (rng.random(len(is_poison)) < 0.25)
    flagged = is_poison & ~leaked
    recipe = TrainRecipe(epochs=5, batch_size=64)
    trained: list[int] = []

    def train_model(j: int, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        seen = np.unique(rows[labels[rows] == 0])  # oversampled: its fold's rows repeat
        assert not excluded[rows].any() and len(seen) < 0.5 * (labels[~flagged] == 0).sum()
        trained.append(j)
        torch.manual_seed(40 + j)
        return given_label_prob(fit(spec().build(), poisoned.data.subset(rows), recipe, seed=40 + j), poisoned.data)

    score = suspect_scores(flagged, labels, 0, SuspectCheckConfig(folds=4, rebalance=rebalance), 0, train_model)
    pool = ~flagged & (labels == 0)
    assert trained == [0, 1, 2, 3] and leaked.sum() >= 5
    assert not np.isnan(score[pool]).any() and np.isnan(score[~pool]).all()
    assert np.median(score[leaked]) < np.quantile(score[pool & ~leaked], 0.1)


def test_cross_check_catches_the_poisons_identification_and_experts_leaked(poisoned) -> None:
    # A fifth of the poisons leaked into a set that is otherwise clean: label models trained on two
    # thirds of it, from scratch, give most leaked poisons (a target label on another class's image) a
    # low p(given), and few clean samples.
    is_poison = poisoned.is_poison
    rng = np.random.default_rng(1)
    leaked = is_poison & (rng.random(len(is_poison)) < 0.2)
    flagged = is_poison & ~leaked
    recipe = TrainRecipe(epochs=5, batch_size=64)

    def train_model(j: int, rows: np.ndarray, _excluded: np.ndarray) -> np.ndarray:
        torch.manual_seed(20 + j)
        return given_label_prob(fit(spec().build(), poisoned.data.subset(rows), recipe, seed=20 + j), poisoned.data)

    verdict = cross_check(flagged, poisoned.data.labels, CrossCheckConfig(enabled=True, folds=3, threshold=0.2), 0,
                          train_model)
    added = verdict.flagged & ~flagged
    assert leaked.sum() >= 5 and (added & leaked).sum() >= 0.6 * leaked.sum()
    assert (added & ~is_poison).sum() < 0.15 * (~is_poison).sum()


def test_cross_fitted_experts_flag_the_poisons_identification_leaked(poisoned, partition_model) -> None:
    # Identification as advrbd+'s on Fashion-MNIST leaves it: most poisons and a third of the clean
    # samples flagged, a fifth of the poisons leaked into the identified clean set.
    is_poison = poisoned.is_poison
    rng = np.random.default_rng(0)
    leaked = is_poison & (rng.random(len(is_poison)) < 0.2)
    identified = (is_poison & ~leaked) | (~is_poison & (rng.random(len(is_poison)) < 0.33))

    trained: list[np.ndarray] = []

    def expert_decision(folds: int, class_quantile: float | None = None) -> ExpertVerdict:
        config = ExpertConfig(enabled=True, folds=folds, class_quantile=class_quantile)

        def train_expert(j: int, rows: np.ndarray, _excluded: np.ndarray) -> np.ndarray:
            trained.append(rows)
            torch.manual_seed(j)
            return given_label_prob(fit(copy.deepcopy(partition_model), poisoned.data.subset(rows), config.recipe,
                                        seed=j), poisoned.data)

        return cross_fit_experts(identified, poisoned.data.labels, ~identified, config, 0, train_expert)

    single = expert_decision(1)
    assert len(trained) == 1 and set(trained[0]) == set(np.flatnonzero(~identified))
    assert (single.thresholds == 0.9).all()  # one expert: the plain threshold for every class
    crossed = expert_decision(3)
    # each identified clean sample is outside exactly one of the three experts' training sets
    assert len(trained) == 4 and (sum(np.isin(np.arange(len(identified)), r) for r in trained[1:])
                                  == np.where(identified, 0, 2)).all()
    single, crossed = single.flagged, crossed.flagged
    assert leaked.sum() >= 10 and not (single & leaked).any()  # one expert trained on them: blind to them
    # Experts that never saw them still give most leaked poisons their target label (tiny data: 10 of
    # 15), and few identified clean samples theirs.
    assert (crossed & leaked).sum() >= 0.5 * leaked.sum()
    assert crossed[is_poison].mean() > single[is_poison].mean()
    assert (crossed & ~identified & ~is_poison).sum() < 0.2 * (~identified & ~is_poison).sum()
    # advrbd+'s class thresholds only ever flag fewer identified clean samples. Here the tiny experts
    # keep p(target) > 0.9 on most identified clean target-class images, so that class's threshold rises
    # and about half the leaked poisons pass (on Fashion-MNIST no target class did: docs/advrbd.md).
    verdict = expert_decision(3, class_quantile=0.7)
    target = poisoned.data.labels[is_poison][0]
    assert verdict.thresholds[target] > 0.9 and verdict.flagged.tolist() == expert_flags(
        verdict.given_prob, identified, ExpertConfig(enabled=True, folds=3, class_quantile=0.7),
        poisoned.data.labels).tolist()
    per_class = verdict.flagged
    assert not (per_class & ~crossed).any() and (per_class & identified).tolist() == (crossed & identified).tolist()
    assert (per_class & leaked).sum() < (crossed & leaked).sum()


def test_expert_rounds_train_on_what_the_last_round_left_unflagged() -> None:
    # A stand-in for the experts with the dynamics measured on TaCT (docs/advrbd.md): an expert that
    # trained on k leaked poisons learned to shift their trigger in proportion, so poison i keeps
    # p(target) = 1 - k * w[i] (w: how weakly the poison implants); clean samples get p = 0.1.
    n, poisons = 600, 60
    is_poison = np.arange(n) < poisons
    labels = np.where(is_poison, 0, np.arange(n) % 9 + 1)
    weakness = np.zeros(n)
    weakness[:poisons] = np.random.default_rng(0).permutation(np.linspace(0.0005, 0.004, poisons))
    identified = is_poison & (np.arange(n) >= 45)  # identification found 15, leaked 45
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def train_expert(j: int, rows: np.ndarray, flagged: np.ndarray) -> np.ndarray:
        calls.append((rows, flagged))
        return np.where(is_poison, 1 - is_poison[rows].sum() * weakness, 0.1)

    config = ExpertConfig(enabled=True, folds=3, rounds=20)
    verdict = cross_fit_experts(identified, labels, ~identified, config, 0, train_expert)
    recall = [decided[is_poison].mean() for decided in verdict.history]
    assert 2 < len(verdict.history) < config.rounds  # stopped when a round added nothing
    assert verdict.history[-1] is verdict.flagged and np.array_equal(verdict.history[-1], verdict.history[-2])
    assert recall[0] < 0.5 and recall[-1] > 0.95 and recall == sorted(recall)
    assert not verdict.flagged[~is_poison].any()
    excluded = identified
    for r, decided in enumerate(verdict.history):
        assert r == 0 or not (excluded & ~decided).any()  # after the first round only flags are added
        fold = expert_folds(excluded, config, 0)
        for j in range(3):
            rows, given = calls[3 * r + j]
            assert np.array_equal(given, excluded)  # what the job keys the expert by
            # never a flagged sample; never its own fold, which is the same in every round
            assert not excluded[rows].any() and not (fold[rows] == j).any()
            assert (expert_folds(np.zeros(n, bool), config, 0)[rows] != j).all()
        excluded = decided
    assert len(calls) == 3 * len(verdict.history)  # one entry per round of experts trained
    # one round is the experts of before; one expert only un-flags, so it never trains a second round
    assert np.array_equal(cross_fit_experts(identified, labels, ~identified, ExpertConfig(enabled=True, folds=3),
                                            0, train_expert).flagged, verdict.history[0])
    calls.clear()
    single = cross_fit_experts(identified, labels, ~identified, ExpertConfig(enabled=True, folds=1, rounds=5), 0,
                               train_expert)
    assert len(calls) == 1 and len(single.history) == 1


def test_in_process_defense_finds_the_poisons(poisoned, partition_model) -> None:
    config = AdvrBDConfig.model_validate({
        "partition": {"radius": 2, "steps": 2},
        "enhance": {"rounds": 3, "growth": 0.1, "batch_size": 64, "clean_fraction": 0.7},
        "clean_train": {"epochs": 3, "batch_size": 64}, "relearn": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    })
    defense = AdvrBD(config, spec().build).fit(poisoned.data, seed=0, poisoned_model=partition_model)
    m = identification_metrics(defense.flagged_, poisoned.is_poison)
    assert m["recall"] >= 0.95 and m["fpr"] < 0.4
    assert len(defense.records_) == 3 and defense.repair() is defense.relearned_model_


# -- on Ray ---------------------------------------------------------------------------------------


def test_ray_data_scores_equal_in_process_scores(ray_session, poisoned, partition_model) -> None:
    from bdray.defenses.advrbd_ray import score_with_ray_data

    images = poisoned.data.images[:300]
    config = PartitionConfig(radius=2, steps=1, batch_size=64)
    local = partition_scores(partition_model, images, config, seed=4)
    remote = score_with_ray_data(partition_model, spec(), images, config, seed=4, num_actors=1, block_rows=100)
    np.testing.assert_allclose(remote, local, rtol=1e-4, atol=1e-6)


def _run_config(tmp_path: Path, **defense) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "advrbd_smoke.yaml").read_text())
    raw["storage"] = str(tmp_path / "store")
    raw["data"] = {"name": "advrbd_low_contrast"}
    raw["defense"]["train"]["epochs"] = 5
    raw["defense"]["enhance"]["clean_fraction"] = 0.7
    raw["defense"].update(defense)
    return raw


def test_all_stages_on_local_ray_identify_the_poisons(ray_session, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from bdray.advrbd_run import run_advrbd, validate_advrbd

    config = validate_advrbd(_run_config(tmp_path))
    summary = run_advrbd(config, out=tmp_path / "out", progress=lambda _: None)

    # Identification against the known poisons: every poison found, most clean samples kept.
    assert summary["seed_poison_rate"] < 0.01
    assert summary["id_recall"] >= 0.95 and summary["id_fpr"] < 0.4
    assert summary["no_defense_asr"] > 0.9
    assert summary["final_asr"] < 0.1 and summary["relearn_asr"] < 0.1
    assert summary["relearn_acc"] > 0.6
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["id_recall"] == summary["id_recall"]
    suspected = np.load(tmp_path / "out" / "suspected_poison.npy")
    assert len(suspected) == summary["id_flagged"] and len(np.load(tmp_path / "out" / "relabeled_labels.npy"))

    client = MlflowClient(config.tracking_uri())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("id_precision", "id_recall", "id_f1", "id_fpr", "enhanced_asr", "final_asr", "relearn_asr",
                "clean_model_asr"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "round_id_recall")
    assert sorted(m.step for m in history) == [0, 1, 2]

    # advrbd+ reuses the partition model, the clean reference and the scores.
    plus = validate_advrbd(_run_config(tmp_path, name="advrbd+", enhance={**config.defense.enhance.model_dump(),
                                                                          "grow_by": "loss"},
                                       identify={"last_rounds": 2}, relabel={"rounds": 3}, expert={"rounds": 2},
                                       crosscheck={"enabled": True, "rounds": 2,
                                                   "suspect": {"folds": 2, "min_class_share": 0}}))
    again = run_advrbd(plus, progress=lambda _: None)
    stages = [e["stage"] for e in __import__("bdray.stages", fromlist=["StageStore"])
              .StageStore(tmp_path / "store" / "stages").executions()]
    assert stages.count("advrbd_poisoned") == 1 and stages.count("advrbd_scores") == 1
    # one stage per expert and round; each round an MLflow step
    assert stages.count("advrbd_expert") == plus.defense.expert.folds * again["expert_rounds"] == 3 * 2
    steps = sorted(client.get_metric_history(again["mlflow_run_id"], "expert_round_recall"), key=lambda m: m.step)
    assert [m.step for m in steps] == [0, 1] and steps[1].value >= steps[0].value - 1e-9  # later rounds only add
    # A union over rounds only adds flags; then the experts take back flags, few of them on poisons,
    # and may flag identified clean samples.
    assert again["pre_expert_id_recall"] >= summary["id_recall"] - 1e-9
    # The cross-check only adds flags: one label-model stage per fold and round, each round an MLflow step.
    assert again["id_flagged"] == (again["pre_expert_id_flagged"] - again["expert_unflagged"]
                                   + again["expert_reflagged"] + again["crosscheck_flagged"]
                                   + again["suspect_flagged"]) > 0
    assert stages.count("advrbd_crosscheck") == 3 * again["crosscheck_rounds"] and again["crosscheck_rounds"] >= 1
    # The suspect-label check names the target label (its poisons' labels are the implausible ones); one
    # stage per label model it trained (on this tiny set every label-0 sample is flagged by then, so it
    # has none to judge: test_suspect_scores_rank_leaked_poisons_below_clean_samples trains them).
    assert again["suspect_label"] == 0 and stages.count("advrbd_suspect") == again["suspect_models"] <= 2
    assert 0 <= again["suspect_flagged_poison"] <= again["suspect_flagged"] <= again["suspect_pool"]
    steps = client.get_metric_history(again["mlflow_run_id"], "crosscheck_round_recall")
    assert sorted(m.step for m in steps) == list(range(again["crosscheck_rounds"]))
    assert again["crosscheck_flagged_poison"] <= again["crosscheck_flagged"]
    assert again["expert_unflagged"] > 0 and again["pre_crosscheck_id_fpr"] < again["pre_expert_id_fpr"]
    assert again["id_recall"] >= again["pre_crosscheck_id_recall"] and again["id_fpr"] >= again["pre_crosscheck_id_fpr"]
    assert again["id_recall"] > 0.8
    assert again["expert_asr"] > 0.5 and 0 <= again["expert_acc"] <= 1  # the expert kept the backdoor
    relearned = [r["relearned_on"] for r in again["relearn_rounds"]]
    assert all(n < again["num_train"] for n in relearned)  # drop_kept: flagged samples that kept their label
    # ... less those the fresh model predicts itself (reclaim), each round a new model on them
    assert plus.defense.relabel.reclaim and plus.defense.relabel.relearn_from == "scratch"
    assert all(0 < r["reclaimed"] and r["reclaimed_poison"] <= 0.25 * r["reclaimed"] for r in again["relearn_rounds"])
    # advrbd+'s relabel rounds: each a stage and an MLflow step; the plausible rule relabels at most
    # what the paper's rule does, and the poisons still lose their target label.
    rounds = plus.defense.relabel.rounds
    assert [r["round"] for r in again["relearn_rounds"]] == list(range(rounds)) and rounds > 1
    assert stages.count("advrbd_relearn") == 1 + rounds
    assert again["relabeled"] <= again["id_flagged"]
    # Most poisons lose their target label; the flagged ones that keep it are dropped by drop_kept, so
    # the relearned model does not learn the backdoor back.
    assert again["relearn_asr"] < 0.1 and again["relabel_kept_rate_poison"] < 0.5
    steps = client.get_metric_history(again["mlflow_run_id"], "relearn_round_acc")
    assert sorted(m.step for m in steps) == list(range(rounds))


@pytest.mark.slow
def test_two_workers_share_each_rounds_set(ray_session, poisoned, partition_model, tmp_path: Path) -> None:
    from bdray.defenses.advrbd_ray import enhance_with_ray_train
    from bdray.models import save_weights
    from bdray.train.distributed import Scaling

    config = AdvrBDConfig.model_validate({"enhance": {"rounds": 2, "growth": 0.1, "batch_size": 64,
                                                      "clean_fraction": 0.7}})
    scores = np.random.default_rng(0).random(len(poisoned.data)).astype(np.float32)
    seed_mask = top_fraction(scores, 0.1)
    save_weights(partition_model, tmp_path / "init.safetensors")
    result = enhance_with_ray_train(
        spec(), poisoned.data, config, init_weights=tmp_path / "init.safetensors", scores=scores,
        seed_mask=seed_mask, seed=0, scaling=Scaling(num_workers=2, cpus_per_worker=0.5),
        storage_path=tmp_path / "ray", name="ddp", out=tmp_path / "out", trace_dir=tmp_path / "trace",
    )
    assert [r.round for r in result.records] == [0, 1]
    # Round 1's set is round 0's plus the 10% with the next-highest scores, decided by rank 0 ...
    expected = top_fraction(scores, 0.2)
    assert np.array_equal(result.records[1].clean_mask, expected)
    # ... and both workers unlearned exactly that set.
    traces = [json.loads((tmp_path / "trace" / f"rank{k}.json").read_text()) for k in range(2)]
    assert traces[0] == traces[1] and len(traces[0]) == 2
