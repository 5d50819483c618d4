"""Experiment configs: YAML validated into typed, frozen objects before any work starts.

Components (dataset, attack, model, defense) are named by registry key or import path; each
section is validated against the config class of the component it names, so an unknown key or a
value out of range is reported with its full dotted path, all errors at once.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from bdray.attacks import AttackConfig, attack_class
from bdray.data import DATASETS
from bdray.defenses import DefenseConfig, defense_class
from bdray.models import MODELS
from bdray.train import TrainRecipe
from bdray.train.distributed import Scaling


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """Invalid configuration; ``errors`` holds (dotted field, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "config") -> None:
        self.errors = errors
        self.source = source
        super().__init__("\n".join(f"{source}: {loc}: {msg}" for loc, msg in errors))


class DataConfig(Strict):
    name: str = "fashion_mnist"
    root: str | None = Field(None, description="local folder holding the dataset (default: its usual place)")
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific keywords")
    reserved_size: int = Field(2000, ge=1, description="clean test images reserved for the defense (D_c)")
    calibration_size: int = Field(1000, ge=1, description="further held-out clean images for the threshold")
    train_subset: int | None = Field(None, ge=1, description="train on a seeded random subset of this size")


class ModelConfig(Strict):
    name: str = "compact_cnn"
    options: dict[str, Any] = Field(default_factory=dict, description="architecture keywords (e.g. width)")
    checkpoint: str | None = Field(None, description="a suspect model to vet instead of training one")


class TrackingConfig(Strict):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite under storage)")
    experiment: str = "bdray"
    run_name: str | None = None


class RayConfig(Strict):
    address: str | None = Field(None, description="existing cluster ('auto' or ray://...); None starts one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray (default: all)")
    train: Scaling = Field(Scaling(), description="Ray Train workers for training the model M")
    finetune: Scaling = Field(Scaling(), description="Ray Train workers for each finetuning stage (B, M')")
    task_cpus: float = Field(1.0, gt=0, description="CPUs of the light stage tasks (poison, evaluate)")
    dashboard: bool = Field(True, description="start the dashboard of a local Ray, bound to 127.0.0.1 (Ray "
                            "Train's state queries need it)")
    log_to_driver: bool = Field(False, description="stream every worker's log lines to this terminal")


class EvalConfig(Strict):
    noise_sigma: float = Field(0.05, ge=0, description="Gaussian noise of the noisy augmented set")
    batch_size: int = Field(1000, ge=1)


class ExperimentConfig(Strict):
    seed: int = 0
    storage: str = Field(".bdray", description="where stage artifacts and the local MLflow store live")
    data: DataConfig = DataConfig()
    attack: SerializeAsAny[AttackConfig]
    model: ModelConfig = ModelConfig()
    train: TrainRecipe = TrainRecipe()
    defense: SerializeAsAny[DefenseConfig]
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.storage).resolve() / 'mlflow.db'}"


# -- loading --------------------------------------------------------------------------------------

_COMPONENTS: dict[str, tuple[Any, type[BaseModel]]] = {
    "attack": (attack_class, AttackConfig),
    "defense": (defense_class, DefenseConfig),
}


def _loc(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts)


def _pydantic_errors(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        elif isinstance(err.get("input"), (int, float, str, bool)) and "input" in err:
            msg = f"{msg} (got {err['input']!r})"
        out.append((_loc(prefix + tuple(err["loc"])), msg))
    return out


def _check_keywords(fn: Any, options: Mapping[str, Any], loc: str, reserved: set[str]) -> list[tuple[str, str]]:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    allowed = sorted(set(params) - reserved)
    return [
        (f"{loc}.{key}", f"unknown option; allowed: {', '.join(allowed) or '(none)'}")
        for key in options
        if key not in params or key in reserved
    ]


def validate_config(raw: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig`, raising :class:`ConfigError`."""
    if not isinstance(raw, Mapping):
        raise ConfigError([("(top level)", "expected a mapping of sections")], source)
    raw = dict(raw)
    errors: list[tuple[str, str]] = []
    for section, (resolve, _base) in _COMPONENTS.items():
        value = raw.get(section)
        if value is None:
            errors.append((section, "missing section (needs at least 'name')"))
            continue
        if not isinstance(value, Mapping) or "name" not in value:
            errors.append((f"{section}.name", "missing; every component section names its kind"))
            continue
        try:
            cls = resolve(str(value["name"]))
        except KeyError as exc:
            errors.append((f"{section}.name", str(exc.args[0])))
            continue
        try:
            raw[section] = cls.Config.model_validate(value)
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, (section,)))
    for section, registry, reserved in (
        ("data", DATASETS, {"root"}),
        ("model", MODELS, {"in_channels", "num_classes", "image_size"}),
    ):
        value = raw.get(section) or {}
        if not isinstance(value, Mapping):
            continue
        name = value.get("name", ExperimentConfig.model_fields[section].default.name)
        try:
            fn = registry.get(str(name))
        except KeyError as exc:
            errors.append((f"{section}.name", str(exc.args[0])))
            continue
        errors.extend(_check_keywords(fn, value.get("options") or {}, f"{section}.options", reserved))
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        errors.extend(e for e in _pydantic_errors(exc) if e[0] not in {loc for loc, _ in errors}
                      and not e[0].startswith(("attack", "defense")))
        raise ConfigError(errors, source) from None
    if errors:
        raise ConfigError(errors, source)
    _check_cross_fields(config, source)
    return config


def _check_cross_fields(config: ExperimentConfig, source: str) -> None:
    errors = []
    num_classes = dataset_num_classes(config.data)
    if num_classes is not None and config.attack.target >= num_classes:
        errors.append(("attack.target", f"{config.attack.target} is not a class of {config.data.name} "
                                        f"(allowed: 0..{num_classes - 1})"))
    errors.extend(_block_errors(config))
    if errors:
        raise ConfigError(errors, source)


def _block_errors(config: ExperimentConfig) -> list[tuple[str, str]]:
    """Every ``trainable_blocks`` set must be 1..(the model's blocks), and the model must have blocks."""
    settings = [("train.trainable_blocks", config.train.trainable_blocks)]
    defense = config.defense
    settings.append(("defense.trainable_blocks", getattr(defense, "trainable_blocks", None)))
    for name in ("expert", "auxiliary"):
        recipe = getattr(defense, name, None)
        if isinstance(recipe, TrainRecipe):
            settings.append((f"defense.{name}.trainable_blocks", recipe.trainable_blocks))
    settings = [(loc, k) for loc, k in settings if k is not None]
    if not settings:
        return []
    import torch

    from bdray.models import get_model
    from bdray.models.blocks import describe_blocks, num_blocks

    try:
        # On the meta device: the architecture without allocating (or initializing) any weights.
        with torch.device("meta"):
            model = get_model(config.model.name, in_channels=3, num_classes=dataset_num_classes(config.data) or 10,
                              image_size=32, **config.model.options)
    except Exception:  # a model that needs other sizes: checked when it is trained
        return []
    try:
        n = num_blocks(model)
    except ValueError as exc:
        return [(settings[0][0], f"model {config.model.name} cannot freeze a prefix of blocks: {exc}")]
    return [(loc, f"{k} exceeds the {n} blocks of model {config.model.name} ({describe_blocks(model)}); "
                  f"allowed 1..{n}") for loc, k in settings if k > n]


_FIXED_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "gtsrb": 43}


def dataset_num_classes(data: DataConfig) -> int | None:
    """The class count known before loading, where the dataset's name or options fix it."""
    if data.name in _FIXED_CLASSES:
        return _FIXED_CLASSES[data.name]
    if data.name == "synthetic":
        return int(data.options.get("num_classes", inspect.signature(DATASETS.get("synthetic"))
                                    .parameters["num_classes"].default))
    if data.name == "imagefolder" and data.root and (Path(data.root) / "train").is_dir():
        return sum(1 for p in (Path(data.root) / "train").iterdir() if p.is_dir())
    return None


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([(item, "override must look like 'section.field=value'")], "override")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([(key, f"'{part}' is not a section")], "override")
        node[leaf] = yaml.safe_load(value)
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict; a missing file, bad YAML or a non-mapping is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("(file)", f"{path} does not exist")], str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([("(file)", f"not valid YAML: {str(exc).splitlines()[0]}")], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([("(top level)", "expected a mapping of sections")], str(path))
    return raw


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config, apply dotted overrides, validate everything."""
    return validate_config(apply_overrides(read_yaml(path), overrides), str(path))


def config_hash(obj: Any) -> str:
    """Stable short hash of any JSON-serializable config fragment."""
    import hashlib

    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


