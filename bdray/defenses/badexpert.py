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
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from torch import nn

from bdray.data.base import ImageSet
from bdray.defenses.base import DefenseConfig, Detector, register_defense
from bdray.models import ModelSpec, load_weights, save_weights
from bdray.models.io import atomic_write
from bdray.train import TrainRecipe, fit, predict_proba

EXPERT_RECIPE = TrainRecipe(
    epochs=1, batch_size=128, optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="constant", label_shift=1
)
AUXILIARY_RECIPE = TrainRecipe(
    epochs=10, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
    schedule="multistep", milestones=(2, 4, 6, 8), lr_decay=0.1,
)
ARTIFACT_VERSION = 1
_FILES = ("model", "expert", "auxiliary")


class BaDExpertConfig(DefenseConfig):
    gamma: float = Field(0.5, gt=0, le=1, description="Eq. 3's gamma (0.5 for ResNet-18 in the paper)")
    eta: float = Field(1e-4, gt=0, description="the expert's (un)learning rate; overrides expert.lr")
    expert: TrainRecipe = EXPERT_RECIPE
    auxiliary: TrainRecipe = AUXILIARY_RECIPE

    def expert_recipe(self) -> TrainRecipe:
        return self.expert.model_copy(update={"lr": self.eta, "label_shift": self.expert.label_shift or 1})


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

    # -- fitting --------------------------------------------------------------------------------
    def fit_expert(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> nn.Module:
        return fit(copy.deepcopy(model), clean, self.config.expert_recipe(), seed=seed)

    def fit_auxiliary(self, model: nn.Module, clean: ImageSet, *, seed: int = 0) -> nn.Module:
        return fit(copy.deepcopy(model), clean, self.config.auxiliary, seed=seed + 1)

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
        """Write M, B, M' as safetensors plus detector.json (hashes, gamma, threshold, config)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hashes = {}
        for name, model in zip(_FILES, (self.model_, self.expert_, self.auxiliary_), strict=True):
            path = directory / f"{name}.safetensors"
            save_weights(model, path)
            hashes[name] = _sha256(path)
        meta = {
            "format": "bdray.badexpert",
            "version": ARTIFACT_VERSION,
            "model_spec": dict(spec),
            "gamma": self.config.gamma,
            "threshold": self.threshold_,
            "config": self.config.model_dump(mode="json"),
            "sha256": hashes,
            **(extra or {}),
        }
        atomic_write(directory / "detector.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BaDExpert:
        """Load a saved detector; refuses files whose hash differs from the one recorded."""
        directory = Path(directory)
        meta_path = directory / "detector.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a bdray detector directory")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "bdray.badexpert":
            raise ValueError(f"{meta_path}: format is {meta.get('format')!r}, expected 'bdray.badexpert'")
        detector = cls(BaDExpertConfig.model_validate(meta["config"]))
        spec = ModelSpec(meta["model_spec"])
        models = []
        for name in _FILES:
            path = directory / f"{name}.safetensors"
            if _sha256(path) != meta["sha256"][name]:
                raise ValueError(f"{path}: sha256 does not match detector.json (corrupted or replaced)")
            models.append(load_weights(spec.build(), path))
        detector.set_models(*models)
        detector.threshold_ = meta["threshold"]
        return detector


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

