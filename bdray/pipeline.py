"""The BaDExpert experiment: poison -> train M -> expert B and auxiliary M' -> calibrate -> evaluate.

Each stage runs as a Ray task and leaves a content-addressed artifact (see :mod:`bdray.stages`), so
re-running with another eta or gamma reuses the poisoned set and the trained model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bdray.attacks import Attack, PoisonedSet, PoisonPlan, apply_plan, build_attack, triggered_testset
from bdray.config import ExperimentConfig
from bdray.data import CleanSplits, DatasetPair, get_dataset, split_clean
from bdray.defenses import BaDExpert
from bdray.models import ModelSpec
from bdray.stages import StageResult, StageStore
from bdray.train import TrainRecipe
from bdray.train.distributed import Scaling

ProgressFn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- data -----------------------------------------------------------------------------------------


def load_data(config: ExperimentConfig) -> DatasetPair:
    pair = get_dataset(config.data.name, root=config.data.root, **config.data.options)
    if config.data.train_subset and config.data.train_subset < len(pair.train):
        rng = np.random.default_rng(config.seed)
        keep = np.sort(rng.choice(len(pair.train), config.data.train_subset, replace=False))
        pair = DatasetPair(pair.train.subset(keep), pair.test)
    return pair


def clean_splits(config: ExperimentConfig, pair: DatasetPair) -> CleanSplits:
    return split_clean(pair.test, config.data.reserved_size, config.data.calibration_size, seed=config.seed)


def model_spec(config: ExperimentConfig, pair: DatasetPair) -> ModelSpec:
    c, h, _ = pair.train.image_shape
    return ModelSpec(
        name=config.model.name, in_channels=c, num_classes=pair.train.num_classes, image_size=h,
        mean=list(pair.train.mean), std=list(pair.train.std), kwargs=dict(config.model.options),
    )


def _attack(config: ExperimentConfig, pair: DatasetPair):
    return build_attack(config.attack, image_shape=pair.train.image_shape, num_classes=pair.train.num_classes)


# -- stage bodies (each writes into the directory it is given) ------------------------------------


def _set_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def poison_stage(out: Path, config: ExperimentConfig, pair: DatasetPair) -> None:
    attack = _attack(config, pair)
    if attack.needs_fit:
        from safetensors.torch import save_file

        attack.fit(pair.train, seed=config.seed)
        save_file(attack.state_dict(), str(out / "attack.safetensors"))
    plan = attack.plan(pair.train.labels, config.seed)
    poisoned = apply_plan(pair.train, attack, plan)
    np.savez(out / "plan.npz", poison_index=plan.poison_index, cover_index=plan.cover_index, labels=plan.labels)
    digest = hashlib.sha256(poisoned.data.images.tobytes() + poisoned.data.labels.tobytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps({
        "attack": attack.metadata(), "seed": config.seed, "num_samples": len(pair.train),
        "num_poisoned": len(plan.poison_index), "num_cover": len(plan.cover_index),
        "content_sha256": digest,
    }, indent=2))


def load_attack(path: Path, config: ExperimentConfig, pair: DatasetPair) -> Attack:
    """The attack of a poison or trigger artifact, with its trained parts (if any) loaded from it.

    A ``needs_model`` attack's test-time trigger lives in its trigger artifact only: loaded from the
    poison artifact, the attack poisons training data but refuses to trigger test inputs.
    """
    from safetensors.torch import load_file

    attack = _attack(config, pair)
    state = path / "attack.safetensors"
    if attack.needs_fit or (attack.needs_model and state.exists()):
        attack.load_state_dict(load_file(str(state)))
    return attack


def trigger_stage(out: Path, config: ExperimentConfig, pair: DatasetPair, poison_path: Path, model_path: Path,
                  num_cpus: float) -> None:
    """``needs_model`` attacks (BaDExpert-Adap): the attacker's test-time trigger, optimized against
    the trained M with the clean training data the attacker holds."""
    from safetensors.torch import save_file

    from bdray.models import load_weights

    _set_threads(num_cpus)
    attack = load_attack(poison_path, config, pair)
    model = load_weights(model_spec(config, pair).build(), model_path).eval()
    attack.prepare(model, pair.train, seed=config.seed)
    save_file(attack.state_dict(), str(out / "attack.safetensors"))
    (out / "manifest.json").write_text(json.dumps({"attack": attack.metadata(), "seed": config.seed}, indent=2))


def trigger_report(path: Path) -> dict[str, float]:
    """What the trigger stage measured on the attacker's own data, as ``trigger_*`` metrics."""
    report = json.loads((path / "manifest.json").read_text())["attack"].get("prepare_report") or {}
    return {f"trigger_{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))}


def load_poisoned(path: Path, config: ExperimentConfig, pair: DatasetPair) -> PoisonedSet:
    saved = np.load(path / "plan.npz")
    plan = PoisonPlan(saved["poison_index"], saved["cover_index"], saved["labels"])
    return apply_plan(pair.train, load_attack(path, config, pair), plan)


@dataclass(frozen=True)
class TrainJob:
    """One Ray Train stage: what to train, on what, from which weights, tracked where."""

    stage: str
    recipe: TrainRecipe
    scaling: Scaling
    seed: int
    init_weights: Path | None = None
    tracking: dict[str, Any] | None = None  # uri, experiment, parent_run_id
    resume: bool = True  # continue an interrupted Ray Train run of this stage from its checkpoint


def train_stage(out: Path, job: TrainJob, config: ExperimentConfig, pair: DatasetPair, data: Any) -> None:
    """Train with Ray Train into ``out``; one MLflow run for the stage, ended even on failure."""
    from bdray.train.distributed import train_model

    storage = Path(config.storage).resolve() / "ray_train"
    # The store computes into ".<key>.<random>": naming the Train run by the key makes a rerun of an
    # interrupted stage resume from its last epoch checkpoint.
    name = f"{job.stage}-{out.name.split('.')[1]}"
    kwargs = dict(seed=job.seed, scaling=job.scaling, storage_path=storage, name=name, out=out,
                  init_weights=job.init_weights, resume=job.resume)
    if isinstance(data, Path):
        data = load_poisoned(data, config, pair).data
    if job.tracking is None:
        result = train_model(model_spec(config, pair), data, job.recipe, **kwargs)
    else:
        from bdray.tracking import Tracker

        tracker = Tracker(job.tracking["uri"], job.tracking["experiment"])
        with tracker.run(f"{job.stage}", tags={"stage": job.stage}, parent_run_id=job.tracking["parent_run_id"]) as run:
            run.log_params({"recipe": job.recipe.model_dump(mode="json"),
                            "scaling": job.scaling.model_dump(mode="json")})
            result = train_model(model_spec(config, pair), data, job.recipe, mlflow_uri=job.tracking["uri"],
                                 mlflow_run_id=run.run_id, **kwargs)
            run.log_metrics({f"final_{k}": v for k, v in result.metrics.items() if k != "epoch"})
    (out / "history.json").write_text(json.dumps(result.history))


# -- evaluation -----------------------------------------------------------------------------------


def eval_inputs(config: ExperimentConfig, pair: DatasetPair, attack_path: Path) -> dict[str, Any]:
    """The images every model is scored on: held-out calibration, evaluation, triggered, noisy copies.

    ``attack_path`` is the artifact whose attack triggers the test inputs: the poison stage's, or the
    trigger stage's for a ``needs_model`` attack."""
    from bdray.metrics import gaussian_noise_copy

    splits = clean_splits(config, pair)
    evaluation = splits.evaluation
    triggered, src = triggered_testset(evaluation, load_attack(attack_path, config, pair))
    sigma = config.eval.noise_sigma
    return {
        "splits": splits, "triggered": triggered, "src": src,
        "images": {
            "calibration": splits.calibration.images,
            "clean": evaluation.images,
            "triggered": triggered.images,
            # The paper's noisy augmented set adds a Gaussian-noise copy of every input.
            "clean_noisy": gaussian_noise_copy(evaluation.images, sigma, config.seed),
            "triggered_noisy": gaussian_noise_copy(triggered.images, sigma, config.seed + 1),
        },
    }


def predict_stage(out: Path, config: ExperimentConfig, pair: DatasetPair, attack_path: Path, weights: Path,
                  num_cpus: float) -> None:
    """Softmax outputs of one model on every evaluation input: computed once per model, so a sweep
    over eta scores M and M' once and only each new expert B afresh."""
    from bdray.models import load_weights
    from bdray.train import predict_proba

    _set_threads(num_cpus)
    model = load_weights(model_spec(config, pair).build(), weights)
    inputs = eval_inputs(config, pair, attack_path)["images"]
    np.savez(out / "probs.npz", **{k: predict_proba(model, v, batch_size=config.eval.batch_size).astype(np.float32)
                                   for k, v in inputs.items()})


def evaluate(
    config: ExperimentConfig, pair: DatasetPair, attack_path: Path, model_dir: Path, expert_dir: Path,
    aux_dir: Path, probs: dict[str, Path], num_cpus: float,
) -> dict[str, Any]:
    """Calibrate on held-out clean data and measure everything from the models' saved predictions."""
    from bdray import metrics
    from bdray.defenses.badexpert import eq3_score
    from bdray.models import load_weights

    _set_threads(num_cpus)
    spec = model_spec(config, pair)
    detector = BaDExpert(config.defense).set_models(
        *(load_weights(spec.build(), d / "model.safetensors") for d in (model_dir, expert_dir, aux_dir))
    )
    inputs = eval_inputs(config, pair, attack_path)
    evaluation, triggered, src = inputs["splits"].evaluation, inputs["triggered"], inputs["src"]
    p = {who: np.load(path / "probs.npz") for who, path in probs.items()}
    gamma = config.defense.gamma

    def conf(name: str) -> dict[str, np.ndarray]:
        """Eq. 3's inputs on one input set: M's prediction, B's and M''s confidence in it."""
        pm = p["model"][name]
        pred = pm.argmax(1)
        rows = np.arange(len(pred))
        pe, pa = p["expert"][name], p["auxiliary"][name]
        c = {"pred": pred, "conf_expert": pe[rows, pred], "conf_aux": pa[rows, pred],
             "pred_expert": pe.argmax(1), "pred_aux": pa.argmax(1)}
        c["score"] = -eq3_score(c["conf_expert"], c["conf_aux"], gamma)
        return c

    calib, clean_c, bd_c = conf("calibration"), conf("clean"), conf("triggered")
    threshold = metrics.calibrate_threshold(calib["score"], config.defense.target_fpr)
    detector.threshold_ = threshold
    clean_s, bd_s = clean_c["score"], bd_c["score"]
    clean_ok, bd_ok = metrics.detection_population(clean_c["pred"], evaluation.labels, bd_c["pred"], triggered.labels)

    out: dict[str, Any] = {
        "model_ca": metrics.accuracy(clean_c["pred"], evaluation.labels),
        "model_asr": metrics.accuracy(bd_c["pred"], triggered.labels),
        "expert_ca": metrics.accuracy(clean_c["pred_expert"], evaluation.labels),
        "expert_asr": metrics.accuracy(bd_c["pred_expert"], triggered.labels),
        "aux_ca": metrics.accuracy(clean_c["pred_aux"], evaluation.labels),
        "aux_asr": metrics.accuracy(bd_c["pred_aux"], triggered.labels),
        **metrics.detection_metrics(clean_s, bd_s, clean_c["pred"], evaluation.labels, bd_c["pred"],
                                    triggered.labels, threshold, config.defense.target_fpr),
        "threshold": threshold,
        "target_fpr": config.defense.target_fpr,
        "num_eval_clean": len(evaluation),
        "num_eval_triggered": len(triggered),
    }
    # The official code calibrates on the evaluation set itself; report that figure beside ours.
    in_sample = metrics.calibrate_threshold(clean_s, config.defense.target_fpr)
    out["defended_ca_insample"] = metrics.accuracy(clean_c["pred"], evaluation.labels, clean_s <= in_sample)
    out["defended_asr_insample"] = metrics.accuracy(bd_c["pred"], triggered.labels, bd_s <= in_sample)
    # AUROC on the noisy augmented set: every input plus its Gaussian-noise copy.
    nc, nb = conf("clean_noisy"), conf("triggered_noisy")
    nc_ok, nb_ok = metrics.detection_population(nc["pred"], evaluation.labels, nb["pred"], triggered.labels)
    out["auroc_noisy"] = metrics.auroc(np.r_[clean_s[clean_ok], nc["score"][nc_ok]],
                                       np.r_[bd_s[bd_ok], nb["score"][nb_ok]])
    out["filter_flops_vs_model"] = _filter_flops(config, detector, pair.train.image_shape)
    arrays = {
        "clean_scores": clean_s[clean_ok], "bd_scores": bd_s[bd_ok],
        "clean_conf": (clean_c["conf_expert"][clean_ok], clean_c["conf_aux"][clean_ok]),
        "bd_conf": (bd_c["conf_expert"][bd_ok], bd_c["conf_aux"][bd_ok]),
        "threshold": threshold,
        "preview": (evaluation.images[src[:8]], triggered.images[:8]),
    }
    return {"metrics": out, "arrays": arrays, "detector": detector}


def _filter_flops(config: ExperimentConfig, detector: BaDExpert, image_shape: tuple[int, ...]) -> float:
    """The deployed filter's FLOPs per input over M's (bdray.detect.Filter): 3 for three full passes;
    1 + 2 x (the suffix's share) when B and M' kept M's first blocks (defense.trainable_blocks)."""
    from bdray.models.blocks import same_prefix, shared_pass_cost

    k = config.defense.trainable_blocks
    models = (detector.model_, detector.expert_, detector.auxiliary_)
    shared = k is not None and same_prefix(models, k)
    return shared_pass_cost(detector.model_, k if shared else None, image_shape)


# -- orchestration --------------------------------------------------------------------------------


def _stage_task(
    store_root: str, reuse: bool, stage: str, key_config: Any, inputs: list[str], body: Callable, *args: Any
) -> StageResult:
    """Runs inside a Ray task: find or compute one stage artifact."""
    return StageStore(store_root, reuse=reuse).run(stage, key_config, inputs, lambda tmp: body(tmp, *args))


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_ray(config: Any, *, extra_cpus: float = 0) -> bool:
    """Connect to the configured cluster or start a local one; True if this call started it.

    ``config`` is any experiment config with a ``ray`` section (``address``, ``num_cpus``,
    ``dashboard``, ``log_to_driver``): BaDExpert's and AdvrBD's alike.

    ``extra_cpus`` adds logical CPUs to a local Ray for processes that mostly wait (Tune trial
    drivers), so they do not take a core away from the training workers they wait on.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": config.ray.log_to_driver}
    # A `ray job submit` job (or a shell with RAY_ADDRESS set) runs on that cluster, not a new one.
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Loopback only: a local dashboard (and its job API) must not be reachable from the network.
        num_cpus = (config.ray.num_cpus or os.cpu_count() or 1) + math.ceil(extra_cpus)
        ray.init(num_cpus=num_cpus, include_dashboard=config.ray.dashboard,
                 dashboard_host="127.0.0.1", **kwargs)
    return True


def run_experiment(
    config: ExperimentConfig,
    *,
    out: str | Path | None = None,
    reuse: bool = True,
    progress: ProgressFn = _stderr,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the whole BaDExpert experiment on Ray and record it in MLflow; returns the summary.

    ``parent_run_id`` nests the run under another (a sweep's); ``tags`` are added to it.
    """
    import ray

    started_here = ensure_ray(config)
    try:
        return _run(config, out=out, reuse=reuse, progress=progress, parent_run_id=parent_run_id, tags=tags)
    finally:
        if started_here:
            ray.shutdown()


def check_resources(config: ExperimentConfig, cluster_cpus: float, *, reserved: float = 0) -> None:
    """Refuse, before any work, a stage that could never be scheduled (Ray would wait forever)."""
    for name, scaling in (("ray.train", config.ray.train), ("ray.finetune", config.ray.finetune)):
        need = max(scaling.num_workers, 1) * scaling.cpus_per_worker + reserved
        if need > cluster_cpus:
            held = f" plus {reserved:g} held by running sweep trials" if reserved else ""
            raise ValueError(f"{name} asks for {need - reserved:g} CPUs (num_workers x cpus_per_worker){held} "
                             f"but the Ray cluster has {cluster_cpus:g}; lower it or add nodes")


def _run(
    config: ExperimentConfig, *, out: str | Path | None, reuse: bool, progress: ProgressFn, parent_run_id: str | None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    import contextlib

    import ray

    t0 = time.perf_counter()
    storage = Path(config.storage).resolve()
    store = StageStore(storage / "stages", reuse=reuse)
    check_resources(config, float(ray.cluster_resources().get("CPU", 1)))
    tracker = None
    if config.tracking.enabled:
        from bdray.tracking import Tracker

        storage.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(config.tracking_uri(), config.tracking.experiment, artifact_root=storage / "mlartifacts")
    with (tracker.run(config.tracking.run_name, tags={**_tags(config), **(tags or {})}, parent_run_id=parent_run_id)
          if tracker else contextlib.nullcontext()) as run:
        tracking = None if run is None else {
            "uri": config.tracking_uri(), "experiment": config.tracking.experiment, "parent_run_id": run.run_id}
        if run is not None:
            run.log_params(config.to_dict())
        summary, evaluation, pair = _stages(config, store, reuse, progress, tracking)
        summary["time_total"] = time.perf_counter() - t0
        if run is not None:
            summary["mlflow_run_id"] = run.run_id
            _log_results(run, config, summary, evaluation, pair, out)
        else:
            summary["mlflow_run_id"] = None
    if out is not None:
        _write_json(Path(out) / "summary.json", summary)
    return summary


def _outside_trial():
    # Inside a Tune trial, tasks would be captured into the trial's placement group (a sliver of a
    # CPU); stages ask for their own resources from the whole cluster instead.
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)


def _stages(
    config: ExperimentConfig, store: StageStore, reuse: bool, progress: ProgressFn, tracking: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any], DatasetPair]:
    import ray

    storage = store.root.parent

    def orchestrator(scaling: Scaling | None = None):
        # A stage that launches Ray Train workers holds no CPU itself (its workers do); one that
        # computes in-process (light tasks, Train's local mode) holds what it computes with.
        if scaling is None:
            cpus = config.ray.task_cpus
        else:
            cpus = scaling.cpus_per_worker if scaling.num_workers == 0 else 0
        return ray.remote(num_cpus=cpus, max_retries=0, scheduling_strategy=_outside_trial())(_stage_task)

    progress(f"[1/5] data: loading {config.data.name}")
    pair = load_data(config)
    pair_ref = ray.put(pair)
    cfg = config.to_dict()
    data_key = {"data": cfg["data"], "seed": config.seed}
    timings: dict[str, float] = {}

    def report(result: StageResult) -> StageResult:
        timings[f"time_{result.stage}"] = result.seconds
        how = "reused" if result.cached else f"done in {result.seconds:.1f}s"
        progress(f"      {result.stage}: {how} ({result.path.relative_to(storage)})")
        return result

    progress(f"[2/5] poison: {config.attack.name} at rate {config.attack.poison_rate} (seed {config.seed})")
    poison = report(ray.get(orchestrator().remote(
        str(store.root), reuse, "poison", {**data_key, "attack": config.attack.poison_key()}, [], poison_stage, config,
        pair_ref,
    )))
    if config.model.checkpoint:
        progress(f"[3/5] model: vetting the suspect checkpoint {config.model.checkpoint}")
        suspect_key = {"checkpoint_sha256": _file_sha256(config.model.checkpoint), "model": cfg["model"]}

        def import_checkpoint(tmp: Path) -> None:
            from bdray.models import load_weights, save_weights

            model = load_weights(model_spec(config, pair).build(), config.model.checkpoint)
            save_weights(model, tmp / "model.safetensors")

        train = report(store.run("suspect", suspect_key, [], import_checkpoint))
    else:
        scaling = config.ray.train
        progress(f"[3/5] train M: {config.model.name}, {config.train.epochs} epochs on {len(pair.train)} images, "
                 f"{scaling.num_workers} Ray Train worker(s)")
        job = TrainJob("train", config.train, scaling, config.seed, tracking=tracking, resume=reuse)
        train = report(ray.get(orchestrator(scaling).remote(
            str(store.root), reuse, "train", {"model": cfg["model"], "train": cfg["train"], "seed": config.seed},
            [poison.key], train_stage, job, config, pair_ref, poison.path,
        )))
    model_path = train.path / "model.safetensors"
    # What triggers the test inputs: the poison artifact's attack, or for an attack whose test-time
    # trigger is optimized against M, the trigger stage's (keyed by M, so each model gets its own).
    attack_stage = poison
    if _attack(config, pair).needs_model:
        progress(f"      trigger: optimizing {config.attack.name}'s test-time trigger against M")
        attack_stage = report(ray.get(orchestrator().remote(
            str(store.root), reuse, "trigger", {"attack": cfg["attack"], "seed": config.seed}, [train.key, poison.key],
            trigger_stage, config, pair_ref, poison.path, model_path, config.ray.task_cpus,
        )))

    progress("[4/5] expert B and auxiliary M' (side by side)")
    splits = clean_splits(config, pair)
    reserved_ref = ray.put(splits.reserved)
    split_key = {**data_key, "reserved": config.data.reserved_size, "calibration": config.data.calibration_size}
    jobs = {
        "expert": TrainJob("expert", config.defense.expert_recipe(), config.ray.finetune, config.seed,
                           model_path, tracking, resume=reuse),
        "auxiliary": TrainJob("auxiliary", config.defense.auxiliary_recipe(), config.ray.finetune, config.seed + 1,
                              model_path, tracking, resume=reuse),
    }
    refs = {
        kind: orchestrator(job.scaling).remote(
            str(store.root), reuse, kind,
            {"split": split_key, "recipe": job.recipe.model_dump(mode="json"), "seed": job.seed},
            [train.key], train_stage, job, config, pair_ref, reserved_ref,
        )
        for kind, job in jobs.items()
    }
    expert, auxiliary = (report(ray.get(refs[k])) for k in ("expert", "auxiliary"))

    progress("[5/5] score the evaluation inputs with M, B and M', calibrate on held-out clean data, evaluate")
    eval_key = {**split_key, "attack": cfg["attack"], "eval": cfg["eval"]}
    dirs = {"model": train.path, "expert": expert.path, "auxiliary": auxiliary.path}
    model_keys = {"model": train.key, "expert": expert.key, "auxiliary": auxiliary.key}
    refs = {
        who: orchestrator().remote(
            str(store.root), reuse, "predict", eval_key, [model_keys[who], attack_stage.key], predict_stage,
            config, pair_ref, attack_stage.path, dirs[who] / "model.safetensors", config.ray.task_cpus,
        )
        for who in dirs
    }
    predicted = {who: ray.get(ref) for who, ref in refs.items()}
    timings["time_predict"] = sum(r.seconds for r in predicted.values())
    evaluation = ray.get(ray.remote(num_cpus=config.ray.task_cpus, max_retries=0,
                                    scheduling_strategy=_outside_trial())(evaluate).remote(
        config, pair_ref, attack_stage.path, train.path, expert.path, auxiliary.path,
        {who: r.path for who, r in predicted.items()}, config.ray.task_cpus,
    ))
    keys = {"poison": poison.key, "train": train.key, "expert": expert.key, "auxiliary": auxiliary.key,
            **{f"predict_{who}": r.key for who, r in predicted.items()}}
    extra: dict[str, float] = {}
    if attack_stage is not poison:
        keys["trigger"] = attack_stage.key
        extra = trigger_report(attack_stage.path)
    return {**evaluation["metrics"], **extra, **timings, "stage_keys": keys}, evaluation, pair


def _tags(config: ExperimentConfig) -> dict[str, str]:
    from bdray.tracking import git_commit

    return {
        "attack": config.attack.name, "defense": config.defense.name, "dataset": config.data.name,
        "model": config.model.name, "seed": str(config.seed), "git_commit": git_commit() or "unknown",
    }


def _write_json(path: Path, obj: Any) -> None:
    from bdray.atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=float)))


def _log_results(
    run: Any, config: ExperimentConfig, summary: dict[str, Any], evaluation: dict[str, Any], pair: DatasetPair,
    out: str | Path | None,
) -> None:
    import tempfile

    import yaml

    from bdray.tracking import plots

    arrays = evaluation["arrays"]
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v == v})
    run.log_text(yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")
    run.log_text(json.dumps(summary["stage_keys"], indent=2), "stage_keys.json")
    run.log_figure(plots.roc_figure(arrays["clean_scores"], arrays["bd_scores"], "BaDExpert ROC"), "roc.png")
    run.log_figure(plots.score_histogram(arrays["clean_scores"], arrays["bd_scores"], arrays["threshold"]),
                   "score_histogram.png")
    run.log_figure(plots.confidence_plane(arrays["clean_conf"], arrays["bd_conf"], config.defense.gamma),
                   "confidence_plane.png")
    if "preview" in arrays:
        run.log_figure(plots.trigger_preview(*arrays["preview"]), "trigger_preview.png")
    with tempfile.TemporaryDirectory() as tmp:
        detector_dir = Path(out) / "detector" if out is not None else Path(tmp) / "detector"
        evaluation["detector"].save(detector_dir, model_spec(config, pair), {"attack": config.attack.name})
        run.log_artifact(detector_dir, "detector")
