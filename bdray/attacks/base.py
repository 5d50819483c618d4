"""The attack interface: a trigger kernel, a label map and a seeded choice of what to poison.

An attack is built once from its config and the data's shape; afterwards it is a pure batch
transform ``(images, labels) -> (images, labels)`` that clones its input, keeps dtype and device,
and pickles (Ray ships it to workers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from bdray.data.base import ImageSet
from bdray.registry import Registry


class AttackConfig(BaseModel):
    """Settings every attack shares; each attack subclasses it with its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    poison_rate: float = Field(
        0.01, ge=0, lt=1, description="fraction of the training set poisoned (0: a clean set, a table's 0% column)"
    )
    target: int = Field(0, ge=0, description="target class (all-to-one)")
    mode: Literal["all_to_one", "all_to_all"] = "all_to_one"
    seed: int = Field(0, description="seed of the trigger pattern itself (noise, masks)")

    #: Fields that shape only the test-time trigger: the poison stage's key leaves them out, so a sweep
    #: over them (a lower test opacity, BaDExpert-Adap's lambdas) reuses the poisoned set and its model.
    test_time_fields: ClassVar[frozenset[str]] = frozenset()
    #: The attack whose poisoned set this one's is, bit for bit (BaDExpert-Adap poisons as BadNet does):
    #: the poison stage's key names it, so both attacks share one poisoned set and one trained model.
    poisons_as: ClassVar[str | None] = None

    def poison_key(self) -> dict[str, Any]:
        """The config as the poisoned training set depends on it (stage keys)."""
        key = self.model_dump(mode="json", exclude=set(self.test_time_fields))
        return {**key, "name": self.poisons_as} if self.poisons_as else key


class CleanLabelConfig(AttackConfig):
    """Clean-label attacks poison target-class samples and keep their labels: all-to-one only."""

    mode: Literal["all_to_one"] = "all_to_one"


class Attack:
    name: ClassVar[str] = ""
    Config: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        if config.target >= num_classes:
            raise ValueError(f"attack.target {config.target} must be below the number of classes ({num_classes})")
        self.config = config
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes

    # -- the pieces ---------------------------------------------------------------------------
    #: True when the attack has a trained part (generator, encoder, surrogate) that ``fit`` builds.
    needs_fit: ClassVar[bool] = False
    #: True for clean-label attacks: poisons come from the target class and keep their label, while
    #: ``target_labels`` still maps every other class to the target (the test-time ASR set needs that).
    clean_label: ClassVar[bool] = False
    #: True for attacks that change a trained model (``bdray.attacks.posttrain.implant``) rather than
    #: only hand over poisoned data.
    post_training: ClassVar[bool] = False
    #: True for attacks whose test-time trigger is optimized against the trained (backdoored) model:
    #: ``prepare(model, clean, seed=)`` runs after training and before any ``apply(test=True)``.
    needs_model: ClassVar[bool] = False
    #: False for attacks that leave the training set clean (a natural backdoor): poison_rate is fixed at 0.
    poisons: ClassVar[bool] = True

    def fit(self, clean: ImageSet, *, seed: int) -> Attack:
        """Train the attack's own parts on data the attacker holds; a no-op for static triggers."""
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that ``fit`` produced (saved as safetensors beside the poisoned set)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Attack:
        return self

    def prepare(self, model: Any, clean: ImageSet, *, seed: int) -> Attack:
        """Post-training and ``needs_model`` attacks: derive the trigger from ``model`` (a no-op here)."""
        return self

    def trigger(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float kernel on (B, C, H, W) images in [0, 1]; must not modify its input.

        ``index`` holds the samples' positions in their dataset: a kernel with per-sample randomness
        derives it from (attack seed, index), so a batch gives the same pixels as one-by-one calls
        and the planned Parquet mode reproduces the materialized one.
        """
        raise NotImplementedError

    def cover_trigger(self, images: torch.Tensor, *, index: torch.Tensor | None = None) -> torch.Tensor:
        """The trigger stamped on cover samples (label kept); Adap-* attacks use weaker variants."""
        return self.trigger(images, index=index)

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.config.mode == "all_to_all":
            # BaDExpert's All-to-All: class i goes to (i - 1) mod C.
            return (labels - 1) % self.num_classes
        return torch.full_like(labels, self.config.target)

    def eligible(self, labels: np.ndarray) -> np.ndarray:
        """Which samples may be poisoned (dirty-label all-to-one skips the target class)."""
        if self.clean_label:
            return labels == self.config.target
        if self.config.mode == "all_to_one":
            return labels != self.config.target
        return np.ones_like(labels, dtype=bool)

    def plan(self, labels: np.ndarray, seed: int) -> PoisonPlan:
        """Which samples to poison, which to cover, and every training label afterwards."""
        poison = self.select(labels, seed)
        cover = self.select_cover(labels, seed, poison)
        new_labels = labels.copy()
        if not self.clean_label:
            new_labels[poison] = self.target_labels(torch.from_numpy(labels[poison])).numpy()
        return PoisonPlan(poison.astype(np.int64), cover.astype(np.int64), new_labels.astype(np.int64))

    def select_cover(self, labels: np.ndarray, seed: int, poison: np.ndarray) -> np.ndarray:
        """Cover samples (triggered, true label kept); none unless an attack asks for them."""
        return np.zeros(0, dtype=np.int64)

    def select(self, labels: np.ndarray, seed: int) -> np.ndarray:
        """Seeded, sorted indices of the samples to poison."""
        candidates = np.flatnonzero(self.eligible(labels))
        n = round(self.config.poison_rate * len(labels))
        if n > len(candidates):
            raise ValueError(
                f"attack.poison_rate {self.config.poison_rate} asks for {n} samples but only "
                f"{len(candidates)} are eligible"
            )
        return np.sort(np.random.default_rng(seed).choice(candidates, size=n, replace=False))

    # -- the batch transform ------------------------------------------------------------------
    def apply(
        self, images: torch.Tensor, *, test: bool = False, index: torch.Tensor | None = None, cover: bool = False
    ) -> torch.Tensor:
        """The trigger (or the cover trigger) on uint8 or float images, returning the input's dtype."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        out = self.cover_trigger(x, index=index) if cover else self.trigger(x, test=test, index=index)
        if images.dtype == torch.uint8:
            return (out.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return out.clamp(0, 1).to(images.dtype)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images), self.target_labels(labels)

    def metadata(self) -> dict[str, Any]:
        return {"class": f"{type(self).__module__}:{type(self).__qualname__}", **self.config.model_dump()}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items() if k != "name")
        return f"{type(self).__name__}({fields})"


AttackType = type[Attack]
ATTACKS: Registry[AttackType] = Registry("attack")


def register_attack(name: str) -> Callable[[AttackType], AttackType]:
    def decorator(cls: AttackType) -> AttackType:
        cls.name = name
        return ATTACKS.register(name)(cls)

    return decorator


def list_attacks() -> list[str]:
    return ATTACKS.names()


def attack_class(name: str) -> AttackType:
    cls = ATTACKS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise KeyError(f"attack '{name}' does not resolve to a subclass of bdray.attacks.Attack")
    return cls


def build_attack(config: AttackConfig | dict, *, image_shape: tuple[int, int, int], num_classes: int) -> Attack:
    if isinstance(config, dict):
        config = attack_class(config["name"]).Config.model_validate(config)
    return attack_class(config.name)(config, image_shape=image_shape, num_classes=num_classes)


@dataclass(frozen=True)
class PoisonPlan:
    """What an attack does to a dataset, without the pixels: enough to re-create it exactly."""

    poison_index: np.ndarray  # sorted; triggered, label set by the attack (kept for clean-label attacks)
    cover_index: np.ndarray  # sorted; triggered with the cover trigger, true label kept
    labels: np.ndarray  # (N,) training labels after poisoning

    def __post_init__(self) -> None:
        if np.intersect1d(self.poison_index, self.cover_index).size:
            raise ValueError("a sample cannot be both poisoned and a cover sample")


@dataclass(frozen=True)
class PoisonedSet:
    """A training set after poisoning, with the ground truth a defense never sees."""

    data: ImageSet  # images with triggers, labels as the attacker set them
    true_labels: np.ndarray
    poison_index: np.ndarray  # sorted indices of poisoned samples
    cover_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def is_cover(self) -> np.ndarray:
        mask = np.zeros(len(self.data), dtype=bool)
        mask[self.cover_index] = True
        return mask

    @property
    def is_poison(self) -> np.ndarray:
        mask = np.zeros(len(self.data), dtype=bool)
        mask[self.poison_index] = True
        return mask


def poison_dataset(data: ImageSet, attack: Attack, seed: int, *, batch_size: int = 4096) -> PoisonedSet:
    """Apply ``attack`` to the samples it plans with ``seed``; same inputs, same bytes out.

    An attack with ``needs_fit`` must have been fitted (or loaded) first.
    """
    return apply_plan(data, attack, attack.plan(data.labels, seed), batch_size=batch_size)


def apply_plan(data: ImageSet, attack: Attack, plan: PoisonPlan, *, batch_size: int = 4096) -> PoisonedSet:
    """Stamp the trigger on the plan's poison and cover samples and set the plan's labels."""
    if len(plan.labels) != len(data):
        raise ValueError(f"the poison plan covers {len(plan.labels)} samples but the dataset has {len(data)}")
    images = data.images.copy()
    for index, cover in ((plan.poison_index, False), (plan.cover_index, True)):
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            images[chunk] = attack.apply(
                torch.from_numpy(images[chunk]), index=torch.from_numpy(chunk), cover=cover
            ).numpy()
    return PoisonedSet(data.replace(images=images, labels=plan.labels.copy()), data.labels.copy(),
                       plan.poison_index, plan.cover_index)


def apply_poison(data: ImageSet, attack: Attack, index: np.ndarray, *, batch_size: int = 4096) -> PoisonedSet:
    """Poison exactly the samples at ``index`` (no cover samples)."""
    index = np.asarray(index, dtype=np.int64)
    labels = data.labels.copy()
    if not attack.clean_label:
        labels[index] = attack.target_labels(torch.from_numpy(labels[index])).numpy()
    plan = PoisonPlan(index, np.zeros(0, dtype=np.int64), labels)
    return apply_plan(data, attack, plan, batch_size=batch_size)


def triggered_testset(data: ImageSet, attack: Attack, *, batch_size: int = 4096) -> tuple[ImageSet, np.ndarray]:
    """Test-time triggered copies of the samples whose label the attack changes, and their sources.

    Returns the triggered set (labels = the attacker's target) and the indices into ``data``.
    """
    targets = attack.target_labels(torch.from_numpy(data.labels)).numpy()
    index = np.flatnonzero(targets != data.labels)
    images = np.empty((len(index), *data.image_shape), dtype=np.uint8)
    for start in range(0, len(index), batch_size):
        chunk = index[start : start + batch_size]
        images[start : start + len(chunk)] = attack.apply(
            torch.from_numpy(data.images[chunk]), test=True, index=torch.from_numpy(chunk)
        ).numpy()
    return data.subset(index).replace(images=images, labels=targets[index]), index
