"""What the cluster entry points (``jobs/*.py``) call: one function per workflow.

    poison   the poisoned training set (a stage artifact), nothing else
    train    poison + the suspect model M on Ray Train
    defend   the whole experiment with the config's defense (BaDExpert, AdvrBD, ...)
    sweep    a Ray Tune sweep (:mod:`bdray.tune`)
    report   a sweep's comparison table and plots, read back from MLflow (:mod:`bdray.report`)

The same job runs on a laptop head node and on a cluster because the deployment, not the config,
says where things go: :func:`environment_overrides` turns ``MLFLOW_TRACKING_URI`` and
``BDRAY_STORAGE`` into ordinary dotted overrides, applied before the command line's own ``--set``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bdray.config import ConfigError, ExperimentConfig, apply_overrides, load_config, read_yaml

ProgressFn = Callable[[str], None]

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_STORAGE = "BDRAY_STORAGE"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- configuration from the environment -------------------------------------------------------------


def storage_path(value: str, source: str = "storage") -> str:
    """A storage location as the local path every node sees; ``file://`` URIs are accepted.

    Stage artifacts are written with local file operations and file locks, so multi-node runs share
    them through a filesystem mounted on every node (NFS, a ReadWriteMany volume, a FUSE-mounted
    bucket). An object-store URI is refused rather than written to a folder named ``s3:``.
    """
    parsed = urlparse(value)
    if parsed.scheme == "":
        return value
    if parsed.scheme == "file":
        return parsed.path
    raise ConfigError([("storage", f"'{value}': {parsed.scheme}:// storage is not supported; mount it on every "
                                   "node (NFS, a ReadWriteMany volume, a FUSE-mounted bucket) and give that path")],
                      source)


def environment_overrides(environ: Mapping[str, str], prefix: str = "") -> list[str]:
    """``MLFLOW_TRACKING_URI`` -> ``tracking.uri``, ``BDRAY_STORAGE`` -> ``storage``, as ``--set`` items.

    ``prefix`` places them under a section (``overrides.`` for a sweep's base experiment). Values are
    JSON-quoted so a URI is read back as a string whatever YAML would make of it.
    """
    out = []
    if uri := environ.get(ENV_TRACKING_URI, "").strip():
        out.append(f"{prefix}tracking.uri={json.dumps(uri)}")
    if storage := environ.get(ENV_STORAGE, "").strip():
        out.append(f"{prefix}storage={json.dumps(storage_path(storage, ENV_STORAGE))}")
    return out


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of every `ray job submit` job


def _checked(config: Any) -> Any:
    storage = storage_path(config.storage, "storage")
    # A job runs in a temporary copy of its working dir: a relative storage (the configs' `.bdray`)
    # would put every artifact and the default sqlite MLflow store there, gone with the session.
    if os.environ.get(RAY_JOB_ENV) and not Path(storage).is_absolute():
        raise ConfigError([("storage", f"'{storage}' is relative, and this Ray job runs in a temporary copy of its "
                                       f"working dir: set {ENV_STORAGE} (or --set storage=) to an absolute path "
                                       "every node sees")], "storage")
    return config


def prepare_tracking(uri: str, experiment: str) -> None:
    """Create the MLflow experiment on a tracking server with the server's artifact store.

    :class:`bdray.tracking.Tracker` gives a new experiment an artifact location under the local
    storage folder; through a server that would put every artifact on the disk of whichever node ran
    the job. Created here first, the experiment keeps the server's default (``mlflow-artifacts:``,
    proxied to its ``--artifacts-destination``), and the Tracker finds it. Local stores are left alone.
    """
    if urlparse(uri).scheme not in ("http", "https"):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is not None:
        return
    try:
        client.create_experiment(experiment)
    except MlflowException as exc:  # another job created it in between
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


# -- loading ---------------------------------------------------------------------------------------


def load_experiment(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """An experiment config (the BaDExpert schema) with overrides, validated; storage checked."""
    return _checked(load_config(path, list(overrides)))


@dataclass(frozen=True)
class DefenseWorkflow:
    """How to load and run the experiment of one defense; ``module:function`` names, imported on use."""

    load: str  # (path, overrides) -> config
    run: str  # (config, *, out, reuse) -> summary dict
    describe: str  # (summary, config) -> printable text

    def function(self, which: str) -> Callable[..., Any]:
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


_POISONED_TRAINING = DefenseWorkflow("bdray.advrbd_run:load_advrbd_config", "bdray.advrbd_run:run_advrbd",
                                     "bdray.advrbd_run:format_summary")
DEFENSE_WORKFLOWS: dict[str, DefenseWorkflow] = {
    "badexpert": DefenseWorkflow("bdray.config:load_config", "bdray.pipeline:run_experiment",
                                 "bdray.workflows:describe_badexpert"),
    # AdvrBD and the baselines it is compared with share one runner (bdray.advrbd_run).
    **{name: _POISONED_TRAINING for name in ("advrbd", "advrbd+", "abl", "dbr", "dbd", "cutmix")},
}
DEFAULT_DEFENSE = "badexpert"


def describe_badexpert(summary: Mapping[str, Any], config: Any = None) -> str:
    from bdray.cli import format_summary

    return format_summary(dict(summary))


def defense_workflow(path: str | Path, overrides: Iterable[str] = ()) -> tuple[str, DefenseWorkflow]:
    """The defense a config names (after overrides) and the workflow that runs it."""
    overrides = list(overrides)
    raw = apply_overrides(read_yaml(path), overrides)
    section = raw.get("defense")
    name = str(section.get("name", DEFAULT_DEFENSE)) if isinstance(section, Mapping) else DEFAULT_DEFENSE
    if name not in DEFENSE_WORKFLOWS:
        from bdray.defenses import list_defenses

        runs = ", ".join(sorted(DEFENSE_WORKFLOWS))
        why = (f"'{name}' is a registered defense but no experiment workflow runs it yet" if name in list_defenses()
               else f"unknown defense '{name}'")
        raise ConfigError([("defense.name", f"{why}; jobs/defend.py runs: {runs}")], str(path))
    return name, DEFENSE_WORKFLOWS[name]


def load_defended(path: str | Path, overrides: Iterable[str] = ()) -> tuple[DefenseWorkflow, Any]:
    """The workflow of the config's defense and the config validated by that defense's own schema."""
    overrides = list(overrides)
    _, workflow = defense_workflow(path, overrides)
    return workflow, _checked(workflow.function("load")(path, overrides))


def load_sweep_config(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """A sweep (:func:`bdray.tune.load_sweep`), with its base experiment's storage checked."""
    from bdray.config import validate_config
    from bdray.tune import load_sweep

    sweep = load_sweep(path, list(overrides))
    _checked(validate_config(sweep.base_raw, str(path)))
    return sweep


# -- the workflows ---------------------------------------------------------------------------------


def _stage_keys(config: ExperimentConfig) -> dict[str, Any]:
    """The key configs of the poison and train stages, exactly as :mod:`bdray.pipeline` builds them,
    so a poison or train job leaves the artifacts a later experiment (or sweep) finds."""
    cfg = config.to_dict()
    data_key = {"data": cfg["data"], "seed": config.seed}
    return {
        "poison": {**data_key, "attack": config.attack.poison_key()},
        "train": {"model": cfg["model"], "train": cfg["train"], "seed": config.seed},
    }


def _tracker(config: Any):
    from bdray.tracking import Tracker

    storage = Path(config.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    prepare_tracking(config.tracking_uri(), config.tracking.experiment)
    return Tracker(config.tracking_uri(), config.tracking.experiment, artifact_root=storage / "mlartifacts")


def _workflow_run(config: ExperimentConfig, workflow: str):
    """One MLflow run for a poison or train job (ended FAILED if the job fails), or none."""
    import contextlib

    if not config.tracking.enabled:
        return contextlib.nullcontext()
    from bdray.pipeline import _tags

    run = _tracker(config).run(config.tracking.run_name or workflow,
                               tags={**_tags(config), "bdray.workflow": workflow})
    return run


def poison(config: ExperimentConfig, *, reuse: bool = True, progress: ProgressFn = _stderr) -> dict[str, Any]:
    """Poison the training set as the experiment would and keep it as a stage artifact; no Ray needed."""
    from bdray.pipeline import load_data, poison_stage
    from bdray.stages import StageStore

    store = StageStore(Path(config.storage).resolve() / "stages", reuse=reuse)
    with _workflow_run(config, "poison") as run:
        progress(f"poison: {config.attack.name} at rate {config.attack.poison_rate} on {config.data.name} "
                 f"(seed {config.seed})")
        pair = load_data(config)
        result = store.run("poison", _stage_keys(config)["poison"], [], lambda tmp: poison_stage(tmp, config, pair))
        manifest = json.loads((result.path / "manifest.json").read_text())
        out = {"stage": "poison", "key": result.key, "path": str(result.path), "cached": result.cached,
               "num_poisoned": manifest["num_poisoned"], "num_samples": manifest["num_samples"]}
        if run is not None:
            run.log_params(config.to_dict())
            run.log_metrics({k: out[k] for k in ("num_poisoned", "num_samples")})
            run.set_tags({"bdray.poison_key": result.key, "bdray.poison_path": result.path})
            out["mlflow_run_id"] = run.run_id
    return out


def train(config: ExperimentConfig, *, reuse: bool = True, progress: ProgressFn = _stderr) -> dict[str, Any]:
    """Poison and train the suspect model M on Ray Train (each a stage artifact, reused if present)."""
    import ray

    from bdray import pipeline

    if config.model.checkpoint:
        raise ConfigError([("model.checkpoint", "a given suspect model is not trained; run jobs/defend.py to vet "
                                                "it, or drop model.checkpoint to train one")], "train")
    started_here = pipeline.ensure_ray(config)
    try:
        pipeline.check_resources(config, float(ray.cluster_resources().get("CPU", 1)))
        store_root = str(Path(config.storage).resolve() / "stages")
        keys = _stage_keys(config)
        scaling = config.ray.train
        # As in the pipeline: a stage that launches Ray Train workers holds no CPU itself.
        train_cpus = scaling.cpus_per_worker if scaling.num_workers == 0 else 0
        task = ray.remote(max_retries=0, scheduling_strategy=pipeline._outside_trial())(pipeline._stage_task)
        with _workflow_run(config, "train") as run:
            pair_ref = ray.put(pipeline.load_data(config))
            progress(f"poison: {config.attack.name} at rate {config.attack.poison_rate}")
            poisoned = ray.get(task.options(num_cpus=config.ray.task_cpus).remote(
                store_root, reuse, "poison", keys["poison"], [], pipeline.poison_stage, config, pair_ref))
            tracking = None if run is None else {"uri": config.tracking_uri(), "experiment": config.tracking.experiment,
                                                 "parent_run_id": run.run_id}
            job = pipeline.TrainJob("train", config.train, scaling, config.seed, tracking=tracking, resume=reuse)
            progress(f"train M: {config.model.name}, {config.train.epochs} epochs, "
                     f"{scaling.num_workers} Ray Train worker(s)")
            trained = ray.get(task.options(num_cpus=train_cpus).remote(
                store_root, reuse, "train", keys["train"], [poisoned.key], pipeline.train_stage, job, config, pair_ref,
                poisoned.path))
            history = json.loads((trained.path / "history.json").read_text())
            out = {"stage": "train", "key": trained.key, "path": str(trained.path), "cached": trained.cached,
                   "poison_key": poisoned.key, "poison_cached": poisoned.cached,
                   "model": str(trained.path / "model.safetensors"),
                   "final": {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}}
            if run is not None:
                run.log_params(config.to_dict())
                run.set_tags({"bdray.poison_key": poisoned.key, "bdray.train_key": trained.key,
                              "bdray.model_path": out["model"]})
                out["mlflow_run_id"] = run.run_id
        return out
    finally:
        if started_here:
            ray.shutdown()


def defend(workflow: DefenseWorkflow, config: Any, *, out: str | Path | None = None,
           reuse: bool = True) -> dict[str, Any]:
    """The whole experiment of the config's defense, recorded in MLflow; returns its summary."""
    if config.tracking.enabled:
        prepare_tracking(config.tracking_uri(), config.tracking.experiment)
    return workflow.function("run")(config, out=out, reuse=reuse)


def sweep(config: Any, *, resume: bool = True, progress: ProgressFn = print) -> dict[str, Any]:
    """Run a sweep on Ray Tune (see :func:`bdray.tune.run_sweep`)."""
    from bdray.config import validate_config
    from bdray.tune import run_sweep

    prepare_tracking(validate_config(config.base_raw).tracking_uri(), config.name)
    return run_sweep(config, resume=resume, progress=progress)


def report(config: Any, *, out: str | Path | None = None, x: str | None = None,
           metrics: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Compare a sweep's finished trials from MLflow: report.md, report.csv and plots in ``out``
    (default ``<storage>/reports/<sweep>``), also attached to the sweep's parent run under ``report/``."""
    from mlflow.tracking import MlflowClient

    from bdray.config import validate_config
    from bdray.report import DEFAULT_METRICS, write_report

    base = validate_config(config.base_raw)
    uri = base.tracking_uri()
    out = Path(out) if out is not None else Path(base.storage).resolve() / "reports" / config.name
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(config.name)
    if exp is None:
        raise ValueError(f"no MLflow experiment named '{config.name}' at {uri}: has the sweep run?")
    # This sweep's parent run (its key covers the space and the base), else the latest sweep there.
    parents = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                 filter_string=f"tags.`bdray.sweep_key` = '{config.key()}'")
    parent_run_id = parents[0].info.run_id if parents else None
    written = write_report(config.name, uri, out, metrics=tuple(metrics or DEFAULT_METRICS), x=x,
                           parent_run_id=parent_run_id)
    if parent_run_id is not None:
        client.log_artifacts(parent_run_id, str(out), artifact_path="report")
    return {**written, "out": str(out), "parent_run_id": parent_run_id, "uri": uri}
