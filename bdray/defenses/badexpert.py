"""BaDExpert (Xie et al., ICLR 2024): detect backdoor inputs with an extracted backdoor expert.

The expert B is the suspect model M finetuned on clean data with shifted labels (Algorithm 1): it
forgets the normal task but keeps the backdoor. M' is M finetuned on the same data with correct
labels, which weakens the backdoor. An input whose predicted class B agrees with and M' doubts is
rejected (Eq. 3).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator
from torch import nn

from bdray.atomic import atomic_directory, atomic_write, sha256_file
from bdray.data.base import ImageSet
from bdray.defenses.base import DefenseConfig, Detector, register_defense
from bdray.models import ModelSpec, load_weights, save_weights
from bdray.train import TrainRecipe, fit, predict_proba

EXPERT_RECIPE = TrainRecipe(
    epochs=1, batch_size=128, optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="constant", label_shift=1
)
AUXILIARY_RECIPE = TrainRecipe(
    epochs=10, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
    schedule="multistep", milestones=(2, 4, 6, 8), lr_decay=0.1,
)
# 2 added content_hash (over every JSON field, the weight files' sha256 among them); 1 is still read.
ARTIFACT_VERSION = 2
ARTIFACT_FORMAT = "bdray.badexpert"
DETECTOR_JSON = "detector.json"
_FILES = ("model", "expert", "auxiliary")


class BaDExpertConfig(DefenseConfig):
    gamma: float = Field(0.5, gt=0, le=1, description="Eq. 3's gamma (0.5 for ResNet-18 in the paper)")
    eta: float = Field(1e-4, gt=0, description="the expert's (un)learning rate; overrides expert.lr")
    expert: TrainRecipe = EXPERT_RECIPE
    auxiliary: TrainRecipe = AUXILIARY_RECIPE
    trainable_blocks: int | None = Field(
        None, ge=1, description="train only the last k blocks of B and M' (bdray.models.blocks); the earlier "
        "blocks stay M's, frozen, so one pass through them feeds M, B and M' at inference. None: every layer "
        "trains, as in the paper")

    @model_validator(mode="after")
    def _one_setting_for_blocks(self) -> BaDExpertConfig:
        if self.trainable_blocks is not None:
            for name in ("expert", "auxiliary"):
                own = getattr(self, name).trainable_blocks
                if own is not None and own != self.trainable_blocks:
                    raise ValueError(f"{name}.trainable_blocks ({own}) differs from trainable_blocks "
                                     f"({self.trainable_blocks}); set only trainable_blocks for both models")
        return self

    def expert_recipe(self) -> TrainRecipe:
        return self.expert.model_copy(update={"lr": self.eta, "label_shift": self.expert.label_shift or 1,
                                              **self._blocks(self.expert)})

    def auxiliary_recipe(self) -> TrainRecipe:
        return self.auxiliary.model_copy(update=self._blocks(self.auxiliary))

    def _blocks(self, recipe: TrainRecipe) -> dict[str, int]:
        k = self.trainable_blocks if self.trainable_blocks is not None else recipe.trainable_blocks
        return {} if k is None else {"trainable_blocks": k}


def eq3_score(conf_expert: np.ndarray, conf_aux: np.ndarray, gamma: float) -> np.ndarray:
    """Eq. (3): min(Conf_M' / (gamma Conf_B), (1 - Conf_B) / (gamma - Conf_M')^+). Low = backdoor."""
    conf_expert = np.asarray(conf_expert, dtype=np.float64)
    conf_aux = np.asarray(conf_aux, dtype=np.float64)
    first = conf_aux / np.maximum(gamma * conf_expert, 1e-8)
    second = (1.0 - conf_expert) / np.maximum(gamma - conf_aux, 1e-8)
    return np.minimum(first, second)


@register_defense("badexpert")
class BaDExpert(Detector):
    Config = BaDExpertConfig
    config: BaDExpertConfig

    def __init__(self, config: BaDExpertConfig) -> None:
        super().__init__(config)
        self.model_: nn.Module | None = None
        self.expert_: nn.Module | None = None
        self.auxiliary_: nn.Module | None = None
        self.metadata_: dict[str, Any] | None = None  # detector.json, once saved or loaded

    # -- fitting --------------------------------------------------------------------------------
    def fit_expert(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> nn.Module:
        return fit(copy.deepcopy(model), clean, self.config.expert_recipe(), seed=seed)

    def fit_auxiliary(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> nn.Module:
        return fit(copy.deepcopy(model), clean, self.config.auxiliary_recipe(), seed=seed + 1)

    def fit(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> BaDExpert:
        expert = self.fit_expert(model, clean, seed=seed)
        return self.set_models(model, expert, self.fit_auxiliary(model, clean, seed=seed))

    def set_models(self, model: nn.Module, expert: nn.Module, auxiliary: nn.Module) -> BaDExpert:
        """Adopt already-trained M, B and M' (e.g. from cached stages)."""
        self.model_, self.expert_, self.auxiliary_ = model.eval(), expert.eval(), auxiliary.eval()
        return self

    # -- scoring --------------------------------------------------------------------------------
    def confidences(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """M's prediction and the confidences of M, B and M' in that predicted class."""
        if self.model_ is None:
            raise RuntimeError("BaDExpert.score needs fit() or set_models() first")
        p_model = predict_proba(self.model_, images)
        p_expert = predict_proba(self.expert_, images)
        p_aux = predict_proba(self.auxiliary_, images)
        pred = p_model.argmax(1)
        rows = np.arange(len(pred))
        return {
            "pred": pred,
            "conf_model": p_model[rows, pred],
            "conf_expert": p_expert[rows, pred],
            "conf_aux": p_aux[rows, pred],
            # B's and M''s own predictions come free with the same forward passes (CA/ASR of each).
            "pred_expert": p_expert.argmax(1),
            "pred_aux": p_aux.argmax(1),
        }

    def score(self, images: np.ndarray) -> np.ndarray:
        c = self.confidences(images)
        return -eq3_score(c["conf_expert"], c["conf_aux"], self.config.gamma)

    # -- the artifact ---------------------------------------------------------------------------
    def save(self, directory: str | Path, spec: ModelSpec, extra: dict[str, Any] | None = None) -> Path:
        """Write M, B, M' as safetensors plus detector.json (hashes, gamma, threshold, config).

        The directory is filled beside its target and renamed into place, so a reader never sees new
        weights beside an old detector.json.
        """
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            hashes = {}
            for name, model in zip(_FILES, (self.model_, self.expert_, self.auxiliary_), strict=True):
                path = tmp / f"{name}.safetensors"
                save_weights(model, path)
                hashes[name] = sha256_file(path)
            meta = {
                "format": ARTIFACT_FORMAT,
                "version": ARTIFACT_VERSION,
                "model_spec": dict(spec),
                "gamma": self.config.gamma,
                "threshold": self.threshold_,
                "config": self.config.model_dump(mode="json"),
                "sha256": hashes,
                **(extra or {}),
            }
            meta["content_hash"] = artifact_content_hash(meta)
            atomic_write(tmp / DETECTOR_JSON, lambda t: Path(t).write_text(json.dumps(meta, indent=2)))
        self.metadata_ = meta
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BaDExpert:
        """Load a saved detector; refuses a detector.json or weight file that differs from what was saved.

        The metadata read (content_hash included) is kept as ``metadata_``.
        """
        directory = Path(directory)
        meta = read_artifact_metadata(directory)
        detector = cls(BaDExpertConfig.model_validate(meta["config"]))
        spec = ModelSpec(meta["model_spec"])
        models = []
        for name in _FILES:
            path = directory / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (detector.json lists it)")
            if sha256_file(path) != meta["sha256"][name]:
                raise ValueError(f"{path}: sha256 does not match detector.json (corrupted or replaced)")
            models.append(load_weights(spec.build(), path))
        detector.set_models(*models)
        detector.threshold_ = meta["threshold"]
        detector.metadata_ = meta
        return detector


def artifact_content_hash(meta: dict[str, Any]) -> str:
    """sha256 of detector.json's fields except ``content_hash``, in canonical JSON.

    The fields hold each weight file's sha256, so this one digest covers the weights, the threshold,
    gamma and the config together.
    """
    body = {k: v for k, v in meta.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_artifact_metadata(directory: str | Path) -> dict[str, Any]:
    """detector.json of a saved detector, checked against its own content_hash (weights not read)."""
    meta_path = Path(directory) / DETECTOR_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a bdray detector directory")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path}: format is {found!r}, expected {ARTIFACT_FORMAT!r}")
    version = meta.get("version")
    if version not in (1, ARTIFACT_VERSION):
        raise ValueError(f"{meta_path}: artifact version {version!r}; this bdray reads 1 and {ARTIFACT_VERSION}")
    if "content_hash" in meta:
        if artifact_content_hash(meta) != meta["content_hash"]:
            raise ValueError(f"{meta_path}: content_hash does not match its fields (threshold, config or weight "
                             "hashes edited after saving)")
    elif version == 1:
        # Version 1 predates content_hash: its weight files are still checked, its JSON fields are not.
        warnings.warn(f"{meta_path}: a version-1 detector without content_hash; its threshold and config are not "
                      "integrity-checked. Save it again (BaDExpert.load(...).save(...)) to add one.", stacklevel=3)
    else:
        raise ValueError(f"{meta_path}: version {version} needs a content_hash, and it has none")
    missing = [k for k in ("model_spec", "config", "threshold", "sha256") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing fields {missing}")
    return meta
