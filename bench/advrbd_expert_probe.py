"""Probe behind advrbd+'s backdoor expert (docs/advrbd.md): its threshold, relearn rule and guards.

Runs advrbd+ *without* the expert (stages reused from the store), then does by hand what the
``expert`` stage does (finetune the partition model on the identified clean set with shifted
labels; a flagged sample stays flagged while the expert gives its given label p > t), so that one
run compares the variants on the same identification: thresholds 0.5 and 0.9; relearning on
everything (``plausible``) or without the flagged samples that kept their given label
(``drop_kept``, shipped); and, at 0.9, a guard that un-flags only where the fresh model trained on
the identified set also gives the given label p > g (g = 1: nothing un-flagged). Prints one JSON line per attack.

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

from bdray.advrbd_run import (
    _mask_digest,
    load_advrbd_config,
    load_pair,
    model_spec,
    partition_stage_config,
    run_advrbd,
)
from bdray.attacks import build_attack
from bdray.attacks.base import poison_dataset, triggered_testset
from bdray.defenses.advrbd import (
    ExpertConfig,
    GroundTruth,
    RelabelConfig,
    evaluate_model,
    expert_flags,
    given_label_prob,
    relabel,
    relearn_rows,
)
from bdray.models import load_weights
from bdray.stages import StageStore
from bdray.train import fit, predict_proba

GUARDS = (0.05, 0.2, 0.5, 1.0)  # 1.0: un-flag nothing (the fresh model never gives p > 1)


def pct(metrics: dict[str, float]) -> tuple[float, float]:
    return round(100 * metrics["acc"], 1), round(100 * metrics["asr"], 1)


def main() -> None:
    torch.set_num_threads(2)
    name, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_advrbd_config("configs/advrbd.yaml", ["defense.name=advrbd+", "defense.expert.enabled=false",
                                                     "defense.crosscheck.enabled=false",  # identification alone
                                                     "defense.relabel.drop_kept=false", *overrides])
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
    stage_cfg = partition_stage_config(cfg)
    partition = store.path("advrbd_poisoned", store.key("advrbd_poisoned", stage_cfg)) / "model.safetensors"
    fresh_key = {**stage_cfg, "flagged_sha": _mask_digest(flagged),
                 "clean_train": cfg.to_dict()["defense"]["clean_train"]}
    fresh = load_weights(spec.build(), store.path("advrbd_clean_train", store.key("advrbd_clean_train", fresh_key))
                         / "model.safetensors")
    res: dict = {"attack": name, "without_expert": pct({"acc": summary["relearn_acc"], "asr": summary["relearn_asr"]}),
                 "flagged": int(flagged.sum()), "flagged_poison": int((flagged & is_poison).sum())}
    expert_cfg = ExpertConfig(enabled=True)
    expert = fit(load_weights(spec.build(), partition), data.subset(np.flatnonzero(~flagged)), expert_cfg.recipe,
                 seed=0)
    given = given_label_prob(expert, data)
    fresh_given = given_label_prob(fresh, data)
    if is_poison[flagged].any():
        res["auroc_flagged"] = round(float(roc_auc_score(is_poison[flagged], given[flagged])), 3)

    def variant(still: np.ndarray, relearn_on: tuple[str, ...]) -> dict:
        unflagged = flagged & ~still
        row = {"unflagged": int(unflagged.sum()), "unflagged_poison": int((unflagged & is_poison).sum()),
               "recall": round(float(still[is_poison].mean()), 3) if is_poison.any() else None}
        clean_model = fit(spec.build(), data.subset(np.flatnonzero(~still)), defense.clean_train, seed=cfg.seed + 2)
        row["clean"] = pct(evaluate_model(clean_model, truth))
        relabeled = relabel(data, still, predict_proba(clean_model, data.images), defense.relabel)
        for rule in relearn_on:
            rows = relearn_rows(relabeled, data, still, RelabelConfig(drop_kept=rule == "drop_kept"))
            relearned = fit(copy.deepcopy(clean_model), relabeled.subset(rows), defense.relearn, seed=cfg.seed + 3)
            row[rule] = pct(evaluate_model(relearned, truth))
        return row

    for t in (0.5, 0.9):
        still = expert_flags(given, flagged, expert_cfg.model_copy(update={"threshold": t}))
        res[f"t{t}"] = variant(still, ("plausible", "drop_kept"))
    still = expert_flags(given, flagged, expert_cfg)
    for g in GUARDS:
        res[f"t0.9_fresh>{g}"] = variant(still | (flagged & (fresh_given <= g)), ("drop_kept",))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
