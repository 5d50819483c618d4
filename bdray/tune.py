"""Ray Tune sweeps over any experiment field, tracked in MLflow, reusing stage artifacts.

A sweep is a base experiment plus a search space keyed by dotted config paths::

    name: table9-eta                       # the MLflow experiment and Tune run name
    base: ../quickstart.yaml               # experiment config, relative to this file
    overrides: {data: {train_subset: 20000}}   # merged into the base before sampling
    space:
      defense.eta: {grid: [5.0e-5, 1.0e-4, 5.0e-4]}
      defense.gamma: {uniform: [0.3, 0.7]}
      attack: {grid: [{name: badnet}, {name: blend, alpha: 0.2}]}    # a whole section per value
      seed: {grid: [0, 1, 2]}

Each trial is the full experiment of :func:`bdray.pipeline.run_experiment`; its stages are keyed
by content, so trials that differ only in eta share the poisoned set and the trained model, and two
trials that need the same missing stage compute it once (the stage store locks it). A finished
trial leaves a ledger entry keyed by the hash of its resolved config: running an interrupted sweep
again skips what finished. MLflow: one experiment per sweep, a parent run for the sweep and a
child run per trial (whose own children are the training stages).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from bdray.config import (
    ConfigError,
    ExperimentConfig,
    Strict,
    apply_overrides,
    config_hash,
    read_yaml,
    validate_config,
)

ProgressFn = Callable[[str], None]


class Distribution(Strict):
    """Exactly one of: grid (every value), choice (sampled), uniform/loguniform (low, high), randint."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        kinds = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform, randint"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
        kind = kinds[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind} is empty: list at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high (got {list(value)})")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {value[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values checked against the experiment schema before any trial starts."""
        value = getattr(self, self.kind)
        return list(value) if self.kind in ("grid", "choice") else [value[0], value[1]]

    def to_tune(self) -> Any:
        from ray import tune

        value = getattr(self, self.kind)
        return {
            "grid": lambda: tune.grid_search(list(value)),
            "choice": lambda: tune.choice(list(value)),
            "uniform": lambda: tune.uniform(*value),
            "loguniform": lambda: tune.loguniform(*value),
            "randint": lambda: tune.randint(value[0], value[1]),
        }[self.kind]()

    @property
    def size(self) -> int:
        return len(self.grid) if self.grid is not None else 1


class Resources(Strict):
    """Resources of one trial's driver; its stages ask for their own (Ray Train workers, tasks)."""

    cpu: float = Field(0.01, gt=0, description="CPUs held by the trial itself (fractions allowed)")
    gpu: float = Field(0.0, ge=0)


class SchedulerConfig(Strict):
    name: Literal["fifo", "asha"] = "fifo"
    max_t: int = Field(10, ge=1, description="ASHA: most reports (training_iteration) a trial may make")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class SweepConfig(Strict):
    name: str = Field(min_length=1, description="MLflow experiment and Tune run name")
    base: str = Field(description="experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the base experiment")
    space: dict[str, Distribution] = Field(min_length=1, description="dotted config path -> distribution")
    num_samples: int = Field(1, ge=1, description="samples of the non-grid axes per grid point")
    metric: str = "auroc"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = Field(1, ge=1)
    resources: Resources = Resources()
    scheduler: SchedulerConfig = SchedulerConfig()
    search_seed: int = Field(0, description="seed of the sampled axes: a rerun draws the same trials")
    reuse_stages: bool = Field(True, description="find stage artifacts instead of recomputing them "
                               "(off only to measure what reuse saves)")

    # Filled by load_sweep: the merged base experiment as a plain dict, and where the file was.
    base_raw: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @property
    def num_trials(self) -> int:
        grid = 1
        for dist in self.space.values():
            grid *= dist.size
        return grid * self.num_samples

    def key(self) -> str:
        return config_hash({"sweep": self.model_dump(mode="json"), "base": self.base_raw})

    def trial_raw(self, params: Mapping[str, Any]) -> dict[str, Any]:
        raw = copy.deepcopy(self.base_raw)
        for path, value in params.items():
            _set_path(raw, path, copy.deepcopy(value))
        return raw


def _set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _known_path(config: dict[str, Any], path: str) -> bool:
    """Whether ``path`` names a field of the experiment (free-form ``options`` maps accept any key)."""
    node: Any = config
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return False
        if part not in node:
            return parts[i - 1] == "options" if i else False
        node = node[part]
    return True


def load_sweep(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read and check a sweep YAML: the space, resources, and every grid value against the schema."""
    from bdray.config import load_config  # noqa: F401  (registers every component first)

    path = Path(path)
    source = str(path)
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([(".".join(str(p) for p in e["loc"]) or "(top level)", e["msg"])
                           for e in exc.errors()], source) from None
    base_path = (path.parent / sweep.base).resolve()
    if not base_path.is_file():
        raise ConfigError([("base", f"{base_path} does not exist")], source)
    base_raw = _deep_merge(read_yaml(base_path), sweep.overrides)
    base = validate_config(base_raw, f"{source} (base {sweep.base} + overrides)")
    resolved = base.to_dict()
    errors: list[tuple[str, str]] = []
    for key, dist in sweep.space.items():
        if not _known_path(resolved, key):
            errors.append((f"space.{key}", "not a field of the experiment config"))
            continue
        for value in dist.probe_values():
            trial = copy.deepcopy(base_raw)
            _set_path(trial, key, value)
            try:
                validate_config(trial)
            except ConfigError as exc:
                errors.extend((f"space.{key}={value!r}", f"{loc}: {msg}") for loc, msg in exc.errors)
    if errors:
        raise ConfigError(errors, source)
    return sweep.model_copy(update={"base_raw": base_raw})


# -- running ------------------------------------------------------------------------------------------


def _numeric(summary: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _trial(params: dict[str, Any], *, context: dict[str, Any]) -> None:
    """One trial: resolve its config, skip it if the ledger says it finished, else run the experiment."""
    from ray import tune

    from bdray.atomic import atomic_write
    from bdray.pipeline import run_experiment

    sweep: SweepConfig = context["sweep"]
    raw = sweep.trial_raw(params)
    raw.setdefault("tracking", {})
    raw["tracking"] = {**raw["tracking"], "experiment": sweep.name,
                       "run_name": ",".join(f"{_short(k)}={_show(v)}" for k, v in params.items())}
    config = validate_config(raw, f"trial {params}")
    key = config_hash(config)
    ledger = Path(context["ledger"]) / f"{key}.json"
    if not ledger.is_file():
        _ledger_from_mlflow(config, key, context["parent_run_id"], ledger)
    if ledger.is_file():
        done = json.loads(ledger.read_text())
        tune.report({**done["metrics"], "skipped": 1.0})
        return
    tags = {"bdray.trial": "1", "bdray.trial_key": key, "bdray.sweep": sweep.name}
    summary = run_experiment(config, parent_run_id=context["parent_run_id"], progress=lambda _: None, tags=tags,
                             reuse=sweep.reuse_stages)
    metrics = _numeric(summary)
    entry = {"params": params, "metrics": metrics, "mlflow_run_id": summary.get("mlflow_run_id"),
             "stage_keys": summary.get("stage_keys")}
    atomic_write(ledger, lambda tmp: Path(tmp).write_text(json.dumps(entry, indent=2, default=str)))
    tune.report({**metrics, "skipped": 0.0})


def _ledger_from_mlflow(config: ExperimentConfig, key: str, parent_run_id: str, ledger: Path) -> None:
    """A trial whose MLflow run finished but whose process died before writing the ledger counts as done."""
    from mlflow.tracking import MlflowClient

    from bdray.atomic import atomic_write

    client = MlflowClient(tracking_uri=config.tracking_uri())
    exp = client.get_experiment_by_name(config.tracking.experiment)
    if exp is None:
        return
    found = client.search_runs([exp.experiment_id], max_results=1, filter_string=(
        f"tags.`bdray.trial_key` = '{key}' and tags.`mlflow.parentRunId` = '{parent_run_id}' "
        "and attributes.status = 'FINISHED'"))
    if found:
        run = found[0]
        entry = {"params": {}, "metrics": dict(run.data.metrics), "mlflow_run_id": run.info.run_id}
        atomic_write(ledger, lambda tmp: Path(tmp).write_text(json.dumps(entry, indent=2)))


def _short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name", "?"))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parent_run(tracker: Any, sweep: SweepConfig) -> str:
    """The sweep's MLflow parent run: the one a previous, interrupted attempt opened, or a new one."""
    key = sweep.key()
    found = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`bdray.sweep_key` = '{key}'",
                                       max_results=1)
    if found:
        run_id = found[0].info.run_id
        tracker.client.update_run(run_id, status="RUNNING")
        # Runs an interrupted attempt left RUNNING will never finish: mark them so.
        for stale in tracker.client.search_runs([tracker.experiment_id], max_results=5000,
                                                filter_string="attributes.status = 'RUNNING'"):
            if stale.info.run_id != run_id:
                tracker.client.set_terminated(stale.info.run_id, status="KILLED")
        return run_id
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"sweep {sweep.name}", tags={
        "bdray.sweep": sweep.name, "bdray.sweep_key": key, "bdray.swept": json.dumps(sorted(sweep.space)),
        "bdray.metric": sweep.metric,
    })
    from bdray.tracking import RunLogger

    RunLogger(tracker.client, run.info.run_id).log_params(
        {"sweep": sweep.model_dump(mode="json", exclude={"base_raw"}), "base": sweep.base_raw})
    return run.info.run_id


class SweepInterrupted(RuntimeError):
    """The sweep was stopped (Ctrl-C, SIGTERM, ``ray job stop``) before every trial ended."""


def run_sweep(sweep: SweepConfig, *, resume: bool = True, progress: ProgressFn = print) -> dict[str, Any]:
    """Run every trial of ``sweep`` on Ray Tune; returns the parent run id, the trials and the best one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from bdray.pipeline import ensure_ray
    from bdray.tracking import Tracker

    # Trials run in Tune's actors, whose working directory is not the driver's: a relative storage
    # (the default '.bdray') would give every trial a stage store and an MLflow database of its own,
    # so nothing would be reused and the parent run would show no children. Resolve it here, where
    # the user means it, and keep the actors in their usual working directory (Tune would chdir each
    # into its trial folder) so other relative paths (data.root, model.checkpoint) mean what they
    # mean for `bdray run`.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    storage = Path(validate_config(sweep.base_raw).storage).resolve()
    sweep = sweep.model_copy(update={"base_raw": {**sweep.base_raw, "storage": str(storage)}})
    base = validate_config(sweep.base_raw)
    sweep_dir = storage / "sweeps" / f"{sweep.name}-{sweep.key()}"
    ledger = sweep_dir / "trials"
    if not resume and ledger.exists():
        import shutil

        shutil.rmtree(ledger)
    ledger.mkdir(parents=True, exist_ok=True)
    storage.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(base.tracking_uri(), sweep.name, artifact_root=storage / "mlartifacts")
    parent_run_id = _parent_run(tracker, sweep)
    progress(f"sweep {sweep.name}: {sweep.num_trials} trials, {sweep.max_concurrent_trials} at a time; "
             f"MLflow parent run {parent_run_id}")

    trial_cpus = sweep.max_concurrent_trials * sweep.resources.cpu
    started_here = ensure_ray(base, extra_cpus=trial_cpus)
    status = "FAILED"
    try:
        from bdray.pipeline import check_resources

        # Every running trial holds its own CPUs while its stages wait for theirs.
        check_resources(base, float(ray.cluster_resources().get("CPU", 1)), reserved=trial_cpus)
        scheduler = None
        if sweep.scheduler.name == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(max_t=sweep.scheduler.max_t, grace_period=sweep.scheduler.grace_period,
                                      reduction_factor=sweep.scheduler.reduction_factor)
        trainable = tune.with_resources(
            tune.with_parameters(_trial, context={"sweep": sweep, "ledger": str(ledger),
                                                  "parent_run_id": parent_run_id}),
            {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={k: d.to_tune() for k, d in sweep.space.items()},
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=sweep.search_seed,
                                                 max_concurrent=sweep.max_concurrent_trials),
            ),
            run_config=tune.RunConfig(name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(sweep_dir / "tune"), verbose=0,
                                      callbacks=[_progress_callback(progress, sweep.num_trials)]),
        )
        grid = tuner.fit()
        # Tune turns Ctrl-C / SIGTERM into a graceful stop and returns what it has: an interrupted
        # sweep must not look finished (its parent run ends KILLED; running it again resumes it).
        # A trial Tune stopped mid-way still comes back, without an error and without the metric.
        reported = sum(1 for r in grid if r.error is None and sweep.metric in (r.metrics or {}))
        if grid.num_errors == 0 and reported < sweep.num_trials:
            raise SweepInterrupted(f"sweep {sweep.name} stopped after {reported} of {sweep.num_trials} trials; "
                                   "run it again to resume (finished trials are not rerun)")
        trials = []
        for result in grid:
            if result.error is not None:
                raise RuntimeError(f"trial {result.config} failed: {result.error}")
            trials.append({"params": result.config, "metrics": dict(result.metrics or {}),
                           "skipped": bool((result.metrics or {}).get("skipped"))})
        best = max(trials, key=lambda t: t["metrics"].get(sweep.metric, float("-inf")) * (
            1 if sweep.mode == "max" else -1)) if trials else None
        if best is not None:
            tracker.client.log_metric(parent_run_id, f"best_{sweep.metric}", best["metrics"][sweep.metric])
            tracker.client.set_tag(parent_run_id, "bdray.best_params", json.dumps(best["params"], default=str))
        status = "FINISHED"
        return {"parent_run_id": parent_run_id, "experiment": sweep.name, "trials": trials, "best": best,
                "ledger": str(ledger)}
    except (KeyboardInterrupt, SweepInterrupted):
        status = "KILLED"
        raise
    finally:
        tracker.client.set_terminated(parent_run_id, status=status)
        if started_here:
            ray.shutdown()


def _progress_callback(progress: ProgressFn, total: int) -> Any:
    """A Tune callback printing one line per finished trial (Tune's own table is switched off)."""
    from ray.tune import Callback  # imported here: ray is heavy and `bdray validate` never needs it

    class Progress(Callback):
        def __init__(self) -> None:
            self.done = 0

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            result = trial.last_result or {}
            how = "reused from the ledger" if result.get("skipped") else "done"
            shown = {k: round(v, 4) for k, v in result.items() if k in ("auroc", "defended_asr", "model_asr")}
            params = ", ".join(f"{_short(k)}={_show(v)}" for k, v in trial.config.items())
            progress(f"  [{self.done}/{total}] {params}: {how} {shown}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            progress(f"  [{self.done}/{total}] {trial.config}: FAILED")

    return Progress()


def experiment_config(sweep: SweepConfig, params: Mapping[str, Any]) -> ExperimentConfig:
    """The resolved experiment of one trial (for inspection and tests)."""
    return validate_config(sweep.trial_raw(params))
