"""AdvrBD end to end for one attack: poison -> partition model -> scores -> enhancement ->
identification -> clean training -> relabel and relearn, on Ray, recorded in one MLflow run.

    python -m bdray.advrbd_run configs/advrbd.yaml --set attack.name=blend --set attack.alpha=0.2
    python -m bdray.advrbd_run configs/advrbd.yaml --set defense.name=advrbd+

Training stages run on Ray Train (:func:`bdray.train.distributed.train_model`), the scoring pass on a
Ray Data actor pool and the enhancement as a Ray Train worker loop
(:mod:`bdray.defenses.advrbd_ray`). The partition model, the clean reference model and the
partition scores are content-addressed stage artifacts (:mod:`bdray.stages`): advrbd and advrbd+,
or a sweep over the enhancement settings, share them. Ground truth (which samples are poisoned,
the test sets) is read only to measure; no decision depends on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, SerializeAsAny, ValidationError

from bdray.atomic import atomic_write
from bdray.attacks import (
    AttackConfig,
    PoisonedSet,
    attack_class,
    build_attack,
    poison_dataset,
    triggered_testset,
)
from bdray.config import ConfigError, Strict, TrackingConfig, apply_overrides, read_yaml
from bdray.data import DatasetPair, get_dataset
from bdray.defenses.advrbd import (
    POISONED_TRAINING,
    AdvrBDConfig,
    ExpertTrainer,
    GroundTruth,
    PoisonedTrainingConfig,
    RelabelConfig,
    RoundRecord,
    choose_seed_set,
    cross_check,
    cross_fit_experts,
    evaluate_model,
    given_label_prob,
    identification_metrics,
    identify_poison,
    reclaimed_samples,
    relabel,
    relearn_rows,
)
from bdray.models import ModelSpec, load_weights
from bdray.pipeline import ensure_ray
from bdray.stages import StageStore
from bdray.train.distributed import Scaling

ProgressFn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class AdvrBDData(Strict):
    name: str = "fashion_mnist"
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific keywords")
    train_subset: int | None = Field(None, ge=1, description="a seeded random subset of the training split")
    test_subset: int | None = Field(None, ge=1, description="a seeded random subset of the test split")


class AdvrBDModel(Strict):
    name: str = "compact_cnn"
    options: dict[str, Any] = Field(default_factory=dict)


class AdvrBDRay(Strict):
    address: str | None = Field(None, description="existing cluster; None starts a local one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray (default: all)")
    train: Scaling = Field(Scaling(num_workers=0, cpus_per_worker=2), description="the plain training stages")
    enhance: Scaling = Field(Scaling(num_workers=0, cpus_per_worker=2), description="Algorithm 2's worker loop")
    score_actors: int = Field(2, ge=1, description="model replicas scoring in parallel (Ray Data actor pool)")
    score_cpus: float = Field(1.0, gt=0, description="CPUs (and torch threads) per scoring replica")
    score_gpu: bool = Field(False, description="one GPU per scoring replica")
    dashboard: bool = Field(False, description="start the dashboard of a local Ray, bound to 127.0.0.1")
    log_to_driver: bool = False


class AdvrBDExperiment(Strict):
    seed: int = 0
    storage: str = Field(".bdray", description="stage artifacts, Ray Train runs and the local MLflow store")
    data: AdvrBDData = AdvrBDData()
    attack: SerializeAsAny[AttackConfig]
    model: AdvrBDModel = AdvrBDModel()
    # advrbd, advrbd+ or a baseline of the same kind (abl, dbr, dbd, cutmix): any registered
    # poisoned-training defense, validated by validate_advrbd into its own config class.
    defense: SerializeAsAny[PoisonedTrainingConfig] = AdvrBDConfig()
    tracking: TrackingConfig = TrackingConfig(experiment="advrbd")
    ray: AdvrBDRay = AdvrBDRay()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.storage).resolve() / 'mlflow.db'}"


def validate_advrbd(raw: Mapping[str, Any], source: str = "config") -> AdvrBDExperiment:
    """Validate a plain dict (every error at once, as dotted paths) into an :class:`AdvrBDExperiment`."""
    from bdray.config import _pydantic_errors

    raw = dict(raw)
    errors: list[tuple[str, str]] = []
    attack = raw.get("attack")
    if not isinstance(attack, Mapping) or "name" not in attack:
        errors.append(("attack.name", "missing; the attack section names its kind"))
    else:
        try:
            raw["attack"] = attack_class(str(attack["name"])).Config.model_validate(attack)
        except KeyError as exc:
            errors.append(("attack.name", str(exc.args[0])))
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, ("attack",)))
    defense = raw.get("defense", {"name": "advrbd"})
    if not isinstance(defense, Mapping):
        errors.append(("defense", "expected a section naming a poisoned-training defense"))
    elif not isinstance(defense, PoisonedTrainingConfig):
        try:
            raw["defense"] = POISONED_TRAINING.get(str(defense.get("name", "advrbd"))).Config.model_validate(defense)
        except KeyError as exc:
            errors.append(("defense.name", str(exc.args[0])))
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, ("defense",)))
    try:
        config = AdvrBDExperiment.model_validate(raw)
    except ValidationError as exc:
        errors.extend(e for e in _pydantic_errors(exc) if not e[0].startswith(("attack", "defense")))
        raise ConfigError(errors, source) from None
    if errors:
        raise ConfigError(errors, source)
    return config


def load_advrbd_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AdvrBDExperiment:
    return validate_advrbd(apply_overrides(read_yaml(path), overrides), str(path))


# -- helpers --------------------------------------------------------------------------------------


def load_pair(config: AdvrBDExperiment) -> DatasetPair:
    pair = get_dataset(config.data.name, root=config.data.root, **config.data.options)
    rng = np.random.default_rng(config.seed)
    train, test = pair.train, pair.test
    if config.data.train_subset and config.data.train_subset < len(train):
        train = train.subset(np.sort(rng.choice(len(train), config.data.train_subset, replace=False)))
    if config.data.test_subset and config.data.test_subset < len(test):
        test = test.subset(np.sort(rng.choice(len(test), config.data.test_subset, replace=False)))
    return DatasetPair(train, test)


def model_spec(config: AdvrBDExperiment, pair: DatasetPair) -> ModelSpec:
    c, h, _ = pair.train.image_shape
    return ModelSpec(name=config.model.name, in_channels=c, num_classes=pair.train.num_classes, image_size=h,
                     mean=list(pair.train.mean), std=list(pair.train.std), kwargs=dict(config.model.options))


# -- the run --------------------------------------------------------------------------------------


def partition_stage_config(config: AdvrBDExperiment) -> dict[str, Any]:
    """The stage config of ``advrbd_poisoned``, the model trained on the untrusted set (Algorithm 1's model)."""
    cfg = config.to_dict()
    return {"data": cfg["data"], "seed": config.seed, "model": cfg["model"], "recipe": cfg["defense"]["train"],
            "attack": cfg["attack"]}


def run_advrbd(
    config: AdvrBDExperiment,
    *,
    out: str | Path | None = None,
    reuse: bool = True,
    progress: ProgressFn = _stderr,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Every AdvrBD stage for ``config.attack`` on Ray, logged to one MLflow run; returns the summary."""
    import ray

    started_here = ensure_ray(config)
    try:
        return _run(config, out=out, reuse=reuse, progress=progress, parent_run_id=parent_run_id)
    finally:
        if started_here:
            ray.shutdown()


def _run(config: AdvrBDExperiment, *, out: str | Path | None, reuse: bool, progress: ProgressFn,
         parent_run_id: str | None) -> dict[str, Any]:
    import torch

    from bdray.defenses.advrbd_ray import enhance_with_ray_train, score_with_ray_data
    from bdray.train import predict_proba
    from bdray.train.distributed import train_model

    if not isinstance(config.defense, AdvrBDConfig):
        return _run_baseline(config, out=out, reuse=reuse, progress=progress, parent_run_id=parent_run_id)
    t0 = time.perf_counter()
    storage = Path(config.storage).resolve()
    store = StageStore(storage / "stages", reuse=reuse)
    ray_storage = storage / "ray_train"
    defense = config.defense
    seed = config.seed
    cfg = config.to_dict()
    timings: dict[str, float] = {}

    progress(f"[1/8] data: {config.data.name}, poison with {config.attack.name} at {config.attack.poison_rate}")
    pair = load_pair(config)
    spec = model_spec(config, pair)
    attack = build_attack(config.attack, image_shape=pair.train.image_shape, num_classes=pair.train.num_classes)
    poisoned = poison_dataset(pair.train, attack, seed)
    triggered, _ = triggered_testset(pair.test, attack)
    truth = GroundTruth(poisoned.is_poison, pair.test.images, pair.test.labels, triggered.images, triggered.labels)
    data_key = {"data": cfg["data"], "seed": seed}
    model_key = {"model": cfg["model"], "recipe": cfg["defense"]["train"]}
    poisoned_cfg = partition_stage_config(config)

    def train_stage(stage: str, data, recipe, key: dict[str, Any], inputs: list[str], train_seed: int,
                    init: Path | None = None, run_id: str | None = None, prefix: str | None = None) -> Path:
        def compute(tmp: Path) -> None:
            result = train_model(spec, data, recipe, seed=train_seed, scaling=config.ray.train,
                                 storage_path=ray_storage, name=f"advrbd-{stage}-{tmp.name.split('.')[1]}",
                                 out=tmp, init_weights=init, mlflow_uri=config.tracking_uri() if run_id else None,
                                 mlflow_run_id=run_id, metric_prefix=prefix or f"{stage}_", resume=reuse)
            (tmp / "history.json").write_text(json.dumps(result.history))

        started = time.perf_counter()
        result = store.run(stage, key, inputs, compute)
        timings[f"time_{stage}"] = time.perf_counter() - started
        progress(f"      {stage}: {'reused' if result.cached else f'done in {result.seconds:.1f}s'}")
        return result.path / "model.safetensors"

    tracker = None
    if config.tracking.enabled:
        from bdray.tracking import Tracker, git_commit

        storage.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(config.tracking_uri(), config.tracking.experiment, artifact_root=storage / "mlartifacts")
    tags = {"attack": config.attack.name, "defense": defense.name, "dataset": config.data.name,
            "model": config.model.name, "seed": str(seed)}
    run_cm = (tracker.run(config.tracking.run_name or f"{defense.name}-{config.attack.name}", tags=tags,
                          parent_run_id=parent_run_id) if tracker else contextlib.nullcontext())
    with run_cm as run:
        run_id = run.run_id if run is not None else None
        if run is not None:
            run.log_params(cfg)
            run.set_tags({"git_commit": git_commit() or "unknown"})

        progress(f"[2/8] partition model and clean reference model: {defense.train.epochs} epochs each")
        poison_model_path = train_stage("advrbd_poisoned", poisoned.data, defense.train, poisoned_cfg, [], seed)
        clean_ref_path = train_stage("advrbd_clean_reference", pair.train, defense.train, {**data_key, **model_key},
                                     [], seed)
        poison_key = store.key("advrbd_poisoned", poisoned_cfg, [])

        progress(f"[3/8] partition scores: PGD ({defense.partition.steps} steps, eps {defense.partition.eps}, radius "
                 f"{defense.partition.radius}) on {config.ray.score_actors} Ray Data replica(s)")
        # The key holds only what changes the scores: one mask needs no aggregate (and keeps older keys).
        drop = {"rate", "class_balanced", "batch_size"} | ({"masks", "aggregate"} if defense.partition.masks == 1
                                                            else set())
        score_cfg = defense.partition.model_dump(mode="json", exclude=drop)
        poisoned_model = load_weights(spec.build(), poison_model_path)

        def compute_scores(tmp: Path) -> None:
            scores = score_with_ray_data(poisoned_model, spec, poisoned.data.images, defense.partition, seed=seed,
                                         num_actors=config.ray.score_actors, cpus_per_actor=config.ray.score_cpus,
                                         use_gpu=config.ray.score_gpu)
            np.save(tmp / "scores.npy", scores)

        started = time.perf_counter()
        scored = store.run("advrbd_scores", {"partition": score_cfg, "seed": seed}, [poison_key], compute_scores)
        timings["time_partition"] = time.perf_counter() - started
        scores = np.load(scored.path / "scores.npy")
        seed_mask, premise = choose_seed_set(scores, poisoned.data.labels, pair.train.num_classes, defense)
        summary: dict[str, Any] = {**premise, "seed_size": int(seed_mask.sum()),
                                   "seed_poison_rate": float(poisoned.is_poison[seed_mask].mean())}
        progress(f"      seed set {int(seed_mask.sum())} samples, {100 * summary['seed_poison_rate']:.2f}% poisoned; "
                 f"premise class ratio {premise['premise_class_ratio']:.2f}")

        progress(f"[4/8] enhancement: {defense.enhance.rounds} rounds on Ray Train "
                 f"({config.ray.enhance.num_workers} worker(s))")
        enh_dir = storage / "advrbd_runs" / f"{defense.name}-{config.attack.name}-{run_id or 'untracked'}"
        started = time.perf_counter()
        enhanced = enhance_with_ray_train(
            spec, poisoned.data, defense, init_weights=poison_model_path, scores=scores, seed_mask=seed_mask,
            seed=seed, scaling=config.ray.enhance, storage_path=ray_storage, name=f"advrbd-enhance-{enh_dir.name}",
            out=enh_dir / "enhanced", truth=truth, mlflow_uri=config.tracking_uri() if run_id else None,
            mlflow_run_id=run_id, metric_prefix="round_", resume=False,
        )
        timings["time_enhance"] = time.perf_counter() - started
        for record in enhanced.records:
            progress(f"      round {record.round}: " + _round_line(record))

        progress("[5/8] identification" + (" and the backdoor expert" if defense.expert.enabled else ""))
        flagged = identify_poison(enhanced.records, defense.identify)
        expert_path = None
        if defense.expert.enabled:
            identified = flagged
            summary.update(identification_metrics(identified, poisoned.is_poison, "pre_expert_id_"))
            folds = defense.expert.folds
            expert_recipe = cfg["defense"]["expert"]["recipe"]
            expert_paths: list[Path] = []

            def train_expert(j: int, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
                # keyed by the samples kept out of training: the first round's (identification's flags) are
                # the keys stored before rounds existed, and one fold keeps the single expert's keys
                key = {"flagged_sha": _mask_digest(excluded), "recipe": expert_recipe}
                key = key if folds == 1 else {**key, "folds": folds, "fold": j}
                expert_paths.append(train_stage("advrbd_expert", poisoned.data.subset(rows), defense.expert.recipe,
                                                key, [poison_key], seed + 4 + j, init=poison_model_path))
                return given_label_prob(load_weights(spec.build(), expert_paths[-1]), poisoned.data)

            verdict = cross_fit_experts(identified, poisoned.data.labels, seed_mask, defense.expert, seed,
                                        train_expert)
            flagged = verdict.flagged
            expert_path = expert_paths[-folds]  # the last round's first expert stands for them in the evaluation
            summary.update({f"expert_threshold_class{c}": float(t) for c, t in enumerate(verdict.thresholds)})
            summary["expert_rounds"] = len(verdict.history)
            raised = {c: round(float(t), 4) for c, t in enumerate(verdict.thresholds) if t > defense.expert.threshold}
            unflagged, reflagged = identified & ~flagged, flagged & ~identified
            summary["expert_unflagged"] = int(unflagged.sum())
            summary["expert_unflagged_poison"] = int((unflagged & poisoned.is_poison).sum())
            summary["expert_reflagged"] = int(reflagged.sum())
            summary["expert_reflagged_poison"] = int((reflagged & poisoned.is_poison).sum())
            for r, decided in enumerate(verdict.history):
                round_id = identification_metrics(decided, poisoned.is_poison)
                if run is not None:
                    run.log_metrics({f"expert_round_{k}": v for k, v in round_id.items()}, step=r)
                if len(verdict.history) > 1:
                    progress(f"      expert round {r}: flagged {int(decided.sum())}, recall {round_id['recall']:.3f}, "
                             f"FPR {round_id['fpr']:.3f}")
            progress(f"      identification flagged {int(identified.sum())} (recall "
                     f"{summary['pre_expert_id_recall']:.3f}); {folds} expert(s) un-flag {int(unflagged.sum())} "
                     f"({summary['expert_unflagged_poison']} of them poisoned) and flag "
                     f"{int(reflagged.sum())} more ({summary['expert_reflagged_poison']} poisoned); class thresholds "
                     f"raised above {defense.expert.threshold}: {raised or 'none'}")
        if defense.crosscheck.enabled:
            flagged = _cross_check_stage(flagged, config, spec, poisoned, poison_key, train_stage, summary, run,
                                         progress)
        summary.update(identification_metrics(flagged, poisoned.is_poison, "id_"))
        clean_set = poisoned.data.subset(np.flatnonzero(~flagged))
        progress(f"      flagged {int(flagged.sum())}: precision {summary['id_precision']:.3f} recall "
                 f"{summary['id_recall']:.3f} FPR {summary['id_fpr']:.3f}")

        progress(f"[6/8] clean training on {len(clean_set)} identified clean samples")
        ident_key = {**poisoned_cfg, "flagged_sha": _mask_digest(flagged),
                     "clean_train": cfg["defense"]["clean_train"]}
        clean_path = train_stage("advrbd_clean_train", clean_set, defense.clean_train, ident_key, [], seed + 2,
                                 run_id=run_id)

        rounds = defense.relabel.rounds
        progress(f"[7/8] relabel the suspected poisons ({defense.relabel.rule}) and relearn, {rounds} round(s)")
        torch.set_num_threads(max(1, int(config.ray.train.cpus_per_worker)))
        scratch = defense.relabel.relearn_from == "scratch"
        relearn_recipe = defense.relearn_recipe
        relearn_key = {**ident_key, "relearn": relearn_recipe.model_dump(mode="json")}
        if cfg["defense"]["relabel"] != RelabelConfig().model_dump(mode="json"):
            relearn_key["relabel"] = cfg["defense"]["relabel"]  # the paper's rule keeps its earlier keys
        relearn_path, relearn_rounds, rejected = clean_path, [], None
        model = load_weights(spec.build(), clean_path)
        for r in range(rounds):
            probs = predict_proba(model, poisoned.data.images)
            relabeled = relabel(poisoned.data, flagged, probs, defense.relabel, rejected)
            rejected = relabeled.labels != poisoned.data.labels
            key = relearn_key if r == 0 else {**relearn_key, "round": r, "labels_sha": _digest(relabeled.labels)}
            rows = relearn_rows(relabeled, poisoned.data, flagged, defense.relabel, probs)
            relearn_path = train_stage("advrbd_relearn", relabeled.subset(rows), relearn_recipe, key, [], seed + 3 + r,
                                       init=None if scratch else relearn_path, run_id=run_id,
                                       prefix="advrbd_relearn_" if r == 0 else f"advrbd_relearn{r}_")
            model = load_weights(spec.build(), relearn_path)  # evaluated here, relabels the next round
            back = reclaimed_samples(relabeled, poisoned.data, flagged, defense.relabel, probs)
            record = {"round": r, "relabeled": int(rejected.sum()), "relearned_on": len(rows),
                      "reclaimed": int(back.sum()), "reclaimed_poison": int((back & poisoned.is_poison).sum()),
                      **_relabel_rates(relabeled.labels, poisoned),
                      **evaluate_model(model, truth)}
            relearn_rounds.append(record)
            if run is not None:
                run.log_metrics({f"relearn_round_{k}": float(v) for k, v in record.items()
                                 if k != "round" and v == v}, step=r)
            poisons = (f"{100 * record['relabel_true_rate_poison']:.1f}% of poisons to their true class"
                       if len(poisoned.poison_index) else "no poisons")
            back_note = (f", {record['reclaimed']} reclaimed ({record['reclaimed_poison']} poisoned)"
                         if defense.relabel.reclaim is not None else "")
            progress(f"      relearn round {r}: {record['relabeled']} relabeled ({poisons}){back_note}, "
                     f"{'trained from scratch' if scratch else 'finetuned'} on {len(rows)}, ACC/ASR "
                     f"{100 * record['acc']:.2f}/{100 * record['asr']:.2f}")
        last = relearn_rounds[-1]
        summary.update({k: last[k] for k in ("relabel_true_rate_poison", "relabel_kept_rate_poison", "relabeled",
                                             "reclaimed", "reclaimed_poison")})
        summary["relearn_acc"], summary["relearn_asr"] = last["acc"], last["asr"]

        progress("[8/8] evaluate")
        models = {"no_defense": poison_model_path, "clean_model": clean_ref_path, "enhanced": enhanced.model_path,
                  "final": clean_path}  # the relearned model was evaluated in its round
        if expert_path is not None:
            models["expert"] = expert_path
        for who, path in models.items():
            metrics = evaluate_model(load_weights(spec.build(), path), truth)
            summary[f"{who}_acc"], summary[f"{who}_asr"] = metrics["acc"], metrics["asr"]
        summary.update(timings)
        summary["time_total"] = time.perf_counter() - t0
        summary["num_train"], summary["num_poison"] = len(poisoned.data), len(poisoned.poison_index)
        summary["rounds"] = [{"round": r.round, **r.stats} for r in enhanced.records]
        summary["relearn_rounds"] = relearn_rounds
        summary["mlflow_run_id"] = run_id
        if run is not None:
            run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float) and v == v})
            run.log_text(yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
            run.log_text(json.dumps(summary, indent=2, default=float), "summary.json")
            run.log_text(format_summary(summary, config), "summary.txt")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        # What a user acts on: the training-set indices identified as poisoned, and the labels relearned.
        for name, array in (("suspected_poison", np.flatnonzero(flagged)), ("relabeled_labels", relabeled.labels)):
            atomic_write(Path(out) / f"{name}.npy", lambda tmp, a=array: _save_npy(tmp, a))
    return summary


def _run_baseline(config: AdvrBDExperiment, *, out: str | Path | None, reuse: bool, progress: ProgressFn,
                  parent_run_id: str | None) -> dict[str, Any]:
    """A baseline poisoned-training defense (ABL, DBR, DBD, CutMix) on the same data, attack and metrics
    as AdvrBD, so their rows compare. Its model is a stage artifact keyed like AdvrBD's stages."""
    import torch

    from bdray.defenses.advrbd import get_poisoned_training
    from bdray.models import save_weights

    t0 = time.perf_counter()
    storage = Path(config.storage).resolve()
    store = StageStore(storage / "stages", reuse=reuse)
    cfg = config.to_dict()
    name = config.defense.name
    progress(f"[1/3] data: {config.data.name}, poison with {config.attack.name} at {config.attack.poison_rate}")
    pair = load_pair(config)
    spec = model_spec(config, pair)
    attack = build_attack(config.attack, image_shape=pair.train.image_shape, num_classes=pair.train.num_classes)
    poisoned = poison_dataset(pair.train, attack, config.seed)
    triggered, _ = triggered_testset(pair.test, attack)
    truth = GroundTruth(poisoned.is_poison, pair.test.images, pair.test.labels, triggered.images, triggered.labels)
    # The baselines' own loops run in this process (not Ray Train): threads as the training stages get.
    torch.set_num_threads(max(1, int(config.ray.train.cpus_per_worker)))

    def compute(tmp: Path) -> None:
        defense = get_poisoned_training(config.defense)
        defense.set_builder(spec.build)  # type: ignore[attr-defined]
        defense.fit(poisoned.data, seed=config.seed)
        save_weights(defense.repair(), tmp / "model.safetensors")

    progress(f"[2/3] {name} on the {len(poisoned.data)} untrusted samples")
    key = {"data": cfg["data"], "seed": config.seed, "model": cfg["model"], "attack": cfg["attack"],
           "defense": cfg["defense"]}
    result = store.run(f"poisoned_training_{name}", key, [], compute)
    progress(f"      {'reused' if result.cached else f'done in {result.seconds:.1f}s'}")
    progress("[3/3] evaluate")
    metrics = evaluate_model(load_weights(spec.build(), result.path / "model.safetensors"), truth)
    summary: dict[str, Any] = {"defense": name, "final_acc": metrics["acc"], "final_asr": metrics["asr"],
                               "time_defense": result.seconds, "num_train": len(poisoned.data),
                               "num_poison": len(poisoned.poison_index)}
    summary["time_total"] = time.perf_counter() - t0
    summary["mlflow_run_id"] = None
    if config.tracking.enabled:
        from bdray.tracking import Tracker, git_commit

        tracker = Tracker(config.tracking_uri(), config.tracking.experiment, artifact_root=storage / "mlartifacts")
        tags = {"attack": config.attack.name, "defense": name, "dataset": config.data.name,
                "model": config.model.name, "seed": str(config.seed)}
        with tracker.run(config.tracking.run_name or f"{name}-{config.attack.name}", tags=tags,
                         parent_run_id=parent_run_id) as run:
            summary["mlflow_run_id"] = run.run_id
            run.log_params(cfg)
            run.set_tags({"git_commit": git_commit() or "unknown"})
            run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
            run.log_text(yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
            run.log_text(json.dumps(summary, indent=2, default=float), "summary.json")
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _cross_check_stage(flagged: np.ndarray, config: AdvrBDExperiment, spec: ModelSpec, poisoned: PoisonedSet,
                       poison_key: str, train_stage: Callable[..., Path], summary: dict[str, Any], run: Any,
                       progress: ProgressFn) -> np.ndarray:
    """The cross-check (:func:`bdray.defenses.advrbd.cross_check`; on in advrbd+, off in advrbd), each label model
    a cached stage, and the suspect-label check's as stage ``advrbd_suspect``."""
    defense = config.defense
    check = defense.crosscheck
    recipe = defense.clean_train.model_dump(mode="json")

    suspect_models: list[int] = []

    def stage_trainer(stage: str, offset: int, key: Callable[[np.ndarray], dict[str, Any]],
                      trained: list[int] | None = None) -> ExpertTrainer:
        # a new model on the rows with clean_train's recipe as a cached stage; the cross-check's and the
        # suspect check's models differ in their stage, seeds and what keys their rows
        def train(j: int, rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
            if trained is not None:
                trained.append(j)
            # repeated rows (the suspect check's oversampled fold) are keyed by the rows themselves
            repeats = {"rows_sha": _digest(rows)} if len(np.unique(rows)) < len(rows) else {}
            path = train_stage(stage, poisoned.data.subset(rows), defense.clean_train,
                               {**key(excluded), **repeats, "recipe": recipe, "fold": j}, [poison_key],
                               config.seed + offset + j)
            return given_label_prob(load_weights(spec.build(), path), poisoned.data)
        return train

    # a cross-check model's rows: the unflagged outside its fold; a suspect model's: all but ``excluded``
    train_label_model = stage_trainer("advrbd_crosscheck", 20,
                                      lambda excluded: {"flagged_sha": _mask_digest(excluded), "folds": check.folds})
    train_suspect_model = stage_trainer("advrbd_suspect", 40, lambda excluded: {"excluded_sha": _mask_digest(excluded)},
                                        suspect_models)

    progress(f"      cross-check: {check.folds} label models, flag p(given) < {check.threshold}, up to "
             f"{check.rounds} round(s)")
    summary.update(identification_metrics(flagged, poisoned.is_poison, "pre_crosscheck_id_"))
    verdict = cross_check(flagged, poisoned.data.labels, check, config.seed, train_label_model, train_suspect_model)
    added = verdict.flagged & ~flagged
    summary["crosscheck_rounds"] = len(verdict.history)
    summary["crosscheck_flagged"] = int(added.sum())
    summary["crosscheck_flagged_poison"] = int((added & poisoned.is_poison).sum())
    before = flagged
    for r, decided in enumerate(verdict.history):
        round_id = identification_metrics(decided, poisoned.is_poison)
        if run is not None:
            run.log_metrics({f"crosscheck_round_{k}": v for k, v in round_id.items()}, step=r)
        new = decided & ~before
        progress(f"      cross-check round {r}: flagged {int(new.sum())} more ({int((new & poisoned.is_poison).sum())} "
                 f"poisoned), recall {round_id['recall']:.3f}, FPR {round_id['fpr']:.3f}")
        before = decided
    if check.suspect is not None:
        added = verdict.flagged & ~verdict.history[-1]
        summary["suspect_label"] = -1 if verdict.suspect is None else verdict.suspect
        summary["suspect_flagged"] = int(added.sum())
        summary["suspect_flagged_poison"] = int((added & poisoned.is_poison).sum())
        summary["suspect_models"] = len(suspect_models)
        summary["suspect_pool"] = 0 if verdict.suspect_score is None else int((~np.isnan(verdict.suspect_score)).sum())
        if verdict.suspect_score is None:
            why = "no flagged sample's label implausible" if verdict.suspect is None else "a thin class, left alone"
            progress(f"      suspect-label check: label {summary['suspect_label']}: {why}")
        else:
            progress(f"      suspect-label check: label {verdict.suspect}, {len(suspect_models)} label models, "
                     f"flagged {int(added.sum())} of the {summary['suspect_pool']} they judged "
                     f"({summary['suspect_flagged_poison']} poisoned)")
    return verdict.flagged


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temp name
        np.save(f, array)


def _digest(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _mask_digest(mask: np.ndarray) -> str:
    return _digest(np.packbits(mask))


def _relabel_rates(labels: np.ndarray, poisoned: PoisonedSet) -> dict[str, float]:
    """Shares of the poisons relabeled to their true class, and of those still carrying the attacker's
    label (what can re-implant the backdoor); nan at 0% poison."""
    idx = poisoned.poison_index
    if not len(idx):
        return {"relabel_true_rate_poison": float("nan"), "relabel_kept_rate_poison": float("nan")}
    return {"relabel_true_rate_poison": float((labels[idx] == poisoned.true_labels[idx]).mean()),
            "relabel_kept_rate_poison": float((labels[idx] == poisoned.data.labels[idx]).mean())}


def _round_line(record: RoundRecord) -> str:
    s = record.stats
    parts = [f"assumed clean {int(s.get('assumed_clean_size', record.clean_mask.sum()))}"]
    if "id_recall" in s:
        parts.append(f"({100 * s['assumed_clean_poison_rate']:.2f}% poisoned) id P/R/FPR {s['id_precision']:.3f}/"
                     f"{s['id_recall']:.3f}/{s['id_fpr']:.3f} enhanced ACC/ASR {100 * s['enhanced_acc']:.1f}/"
                     f"{100 * s['enhanced_asr']:.1f}")
    parts.append(f"{s['round_seconds']:.1f}s")
    return " ".join(parts)


SUMMARY_ROWS = (
    ("no defense (partition model)", "no_defense"),
    ("enhanced model", "enhanced"),
    ("AdvrBD w/o relearn (fresh model)", "final"),
    ("AdvrBD w/ relabel + relearn", "relearn"),
)


def format_summary(summary: Mapping[str, Any], config: AdvrBDExperiment | None = None) -> str:
    """The run as a small table; every ASR has the clean model's rate for the same trigger beside it."""
    if "id_precision" not in summary:  # a baseline: one model
        return (f"{summary['defense']}: ACC {100 * summary['final_acc']:.2f}%  ASR {100 * summary['final_asr']:.2f}%"
                f"  ({summary['num_poison']} of {summary['num_train']} training samples poisoned); wall time "
                f"{summary['time_total']:.0f}s; MLflow run {summary.get('mlflow_run_id')}")
    ref = 100 * summary["clean_model_asr"]
    head = f"{'':34}  {'ACC %':>7}  {'ASR %':>7}  {'clean-model ASR %':>17}"
    lines = [head, "-" * len(head)]
    for label, key in SUMMARY_ROWS:
        lines.append(f"{label:34}  {100 * summary[f'{key}_acc']:7.2f}  {100 * summary[f'{key}_asr']:7.2f}  {ref:17.2f}")
    lines += [
        "-" * len(head),
        f"clean model (trained on the true clean set)  ACC {100 * summary['clean_model_acc']:.2f}",
        f"seed set {summary['seed_size']} ({100 * summary['seed_poison_rate']:.2f}% poisoned), premise class ratio "
        f"{summary['premise_class_ratio']:.2f}",
        *([f"backdoor expert (ACC/ASR {100 * summary['expert_acc']:.2f}/{100 * summary['expert_asr']:.2f}) "
           f"un-flagged {summary['expert_unflagged']} of the {int(summary['pre_expert_id_flagged'])} identified "
           f"({summary['expert_unflagged_poison']} poisoned) and flagged {summary.get('expert_reflagged', 0)} more "
           f"({summary.get('expert_reflagged_poison', 0)} poisoned)"] if "expert_unflagged" in summary else []),
        f"identification: precision {summary['id_precision']:.3f} recall {summary['id_recall']:.3f} "
        f"F1 {summary['id_f1']:.3f} FPR {summary['id_fpr']:.3f} ({int(summary['id_leaked'])} poisons leaked)",
        f"wall time {summary['time_total']:.0f}s; MLflow run {summary.get('mlflow_run_id')}",
    ]
    return "\n".join(lines)


def results_markdown(rows: list[tuple[str, Mapping[str, Any]]]) -> str:
    """One markdown table row per (label, summary); ASR cells carry the clean model's rate in brackets."""
    head = ("| run | seed poisoned % | id P / R / FPR | leaked | enhanced ACC / ASR | final ACC / ASR (w/o relearn) "
            "| final ACC / ASR (relearn) | clean-model ACC / ASR |")
    lines = [head, "|" + "---|" * 8]
    for label, s in rows:
        def pair(key: str, s: Mapping[str, Any] = s) -> str:
            return f"{100 * s[f'{key}_acc']:.2f} / {100 * s[f'{key}_asr']:.2f}"

        lines.append(f"| {label} | {100 * s['seed_poison_rate']:.2f} | {s['id_precision']:.3f} / {s['id_recall']:.3f}"
                     f" / {s['id_fpr']:.3f} | {int(s['id_leaked'])} | {pair('enhanced')} | {pair('final')} | "
                     f"{pair('relearn')} | {pair('clean_model')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdray.advrbd_run", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--out", help="folder for summary.json")
    parser.add_argument("--no-reuse", action="store_true", help="recompute every cached stage")
    args = parser.parse_args(argv)
    try:
        config = load_advrbd_config(args.config, args.set)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    summary = run_advrbd(config, out=args.out, reuse=not args.no_reuse)
    print(format_summary(summary, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
