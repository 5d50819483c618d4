"""Probe (not a shipped stage): can a BaDExpert-style expert un-flag the clean samples advrbd+ flags?

Runs the shipped advrbd+ (stages reused from the store), then finetunes its partition model on the
identified clean set with shifted labels (y + 1, BaDExpert's expert recipe, lr 1e-4, one epoch):
that expert forgets the normal task but keeps the backdoor, so a flagged sample it still assigns its
given label with p > t is a poison, and the rest are un-flagged. Then clean-train on what is left
un-flagged, relabel (``plausible``) and relearn, either on everything (``plausible``) or dropping the
flagged samples that kept their given label (``drop_kept``). Prints one JSON line per attack.

    python bench/advrbd_expert_probe.py badnet
    python bench/advrbd_expert_probe.py blend "attack={name: blend, poison_rate: 0.05, alpha: 0.2}"
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bdray.advrbd_run import load_advrbd_config, load_pair, model_spec, partition_stage_config, run_advrbd
from bdray.attacks import build_attack
from bdray.attacks.base import poison_dataset, triggered_testset
from bdray.defenses.advrbd import GroundTruth, evaluate_model, relabel
from bdray.defenses.badexpert import EXPERT_RECIPE
from bdray.models import load_weights
from bdray.stages import StageStore
from bdray.train import fit, predict_proba


def pct(metrics: dict[str, float]) -> tuple[float, float]:
    return round(100 * metrics["acc"], 1), round(100 * metrics["asr"], 1)


def main() -> None:
    torch.set_num_threads(2)
    name, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_advrbd_config("configs/advrbd.yaml", ["defense.name=advrbd+", *overrides])
    out = Path(f"/tmp/advrbd_probe/{name}")
    if not (out / "suspected_poison.npy").exists():
        run_advrbd(cfg, out=out, progress=lambda _: None)
    pair = load_pair(cfg)
    spec, defense = model_spec(cfg, pair), cfg.defense
    attack = build_attack(cfg.attack, image_shape=pair.train.image_shape, num_classes=pair.train.num_classes)
    poisoned = poison_dataset(pair.train, attack, cfg.seed)
    triggered, _ = triggered_testset(pair.test, attack)
    truth = GroundTruth(poisoned.is_poison, pair.test.images, pair.test.labels, triggered.images, triggered.labels)
    data, is_poison = poisoned.data, poisoned.is_poison
    flagged = np.zeros(len(data), bool)
    flagged[np.load(out / "suspected_poison.npy")] = True
    summary = json.loads((out / "summary.json").read_text())
    store = StageStore(Path(cfg.storage) / "stages")
    partition = store.path("advrbd_poisoned", store.key("advrbd_poisoned", partition_stage_config(cfg)))
    partition = partition / "model.safetensors"
    res: dict = {"attack": name, "advrbd+": pct({"acc": summary["relearn_acc"], "asr": summary["relearn_asr"]}),
                 "flagged": int(flagged.sum()), "flagged_poison": int((flagged & is_poison).sum())}
    expert = fit(load_weights(spec.build(), partition), data.subset(np.flatnonzero(~flagged)),
                 EXPERT_RECIPE.model_copy(update={"lr": 1e-4}), seed=0)
    given = predict_proba(expert, data.images)[np.arange(len(data)), data.labels]
    if is_poison[flagged].any():
        res["auroc_flagged"] = round(float(roc_auc_score(is_poison[flagged], given[flagged])), 3)
    for t in (0.5, 0.9):
        still = flagged & (given > t)
        unflagged = flagged & ~still
        row = {"unflagged": int(unflagged.sum()), "unflagged_poison": int((unflagged & is_poison).sum()),
               "recall": round(float(still[is_poison].mean()), 3) if is_poison.any() else None}
        clean_model = fit(spec.build(), data.subset(np.flatnonzero(~still)), defense.clean_train, seed=cfg.seed + 2)
        row["clean"] = pct(evaluate_model(clean_model, truth))
        relabeled = relabel(data, still, predict_proba(clean_model, data.images), defense.relabel)
        kept_given = still & (relabeled.labels == data.labels)
        for variant, rows in (("plausible", np.arange(len(data))), ("drop_kept", np.flatnonzero(~kept_given))):
            relearned = fit(copy.deepcopy(clean_model), relabeled.subset(rows), defense.relearn, seed=cfg.seed + 3)
            row[variant] = pct(evaluate_model(relearned, truth))
        res[f"t{t}"] = row
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
