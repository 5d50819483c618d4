"""The papers' comparison tables from one command, every number from that run.

A results file lists tables; each table is a base experiment, the attacks that make its rows and
the defenses that make its columns::

    name: results                      # MLflow experiment of the parent run and every row's run
    out: ../docs/results.md
    tables:
      detectors:                       # BaDExpert's Table 2 (AUROC) and Table 1 (CA/ASR at 1% FPR)
        kind: detection
        base: quickstart.yaml          # the BaDExpert experiment every row derives from
        attacks: {badnet: {name: badnet, patch_size: 3}, blend: {name: blend, alpha: 0.2}}
        detectors: {strip: {name: strip}, scale_up: {name: scale_up}}
        repairs: {fine_pruning: {name: fine_pruning}}
      advrbd:                          # AdvrBD's Table II: train on the poisoned set
        kind: poisoned_training
        base: advrbd.yaml
        attacks: {badnet: {name: badnet}, clean: {name: badnet, poison_rate: 0}}
        defenses: {advrbd: {name: advrbd}, abl: {name: abl}}

A detection row is the full BaDExpert experiment (:func:`bdray.pipeline.run_experiment`) for one
attack; every baseline detector and repair then sees the same suspect model M, the same reserved
clean set D_c, the same held-out calibration set and the same evaluation inputs, and is scored by
:func:`bdray.metrics.detection_metrics`, the code BaDExpert's own numbers come from. Detector and
repair cells run as Ray tasks side by side. A poisoned-training cell is one
:func:`bdray.advrbd_run.run_advrbd` run. Every cell is a stage artifact keyed by its config and
inputs, so an interrupted run picks up where it stopped and a table that grows a column computes
only that column.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from bdray.config import ConfigError, ExperimentConfig, Strict, apply_overrides, config_hash, read_yaml, validate_config

ProgressFn = Callable[[str], None]


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


# -- configuration --------------------------------------------------------------------------------


class DetectionTable(Strict):
    kind: Literal["detection"]
    title: str = Field("", description="heading of the table in the report")
    base: str = Field(description="BaDExpert experiment YAML, relative to the results file")
    overrides: list[str] = Field(default_factory=list, description="'section.field=value' applied to the base")
    attacks: dict[str, dict[str, Any]] = Field(min_length=1, description="row label -> attack section")
    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict, description="column -> detector section")
    repairs: dict[str, dict[str, Any]] = Field(default_factory=dict, description="column -> repair section")
    eval_subset: dict[str, Annotated[int, Field(ge=100)]] = Field(
        default_factory=dict,
        description="detector column -> how many clean and how many triggered evaluation inputs it is scored on "
        "(a seeded random draw of each; for detectors that cost many forward passes per input, e.g. STRIP's 100)",
    )
    min_asr: float = Field(
        0.5,
        ge=0,
        le=1,
        description="below this ASR of M a row is marked as not implanted "
        "and left out of the averages: a detector cannot be judged on a backdoor that is not there",
    )


class PoisonedTrainingTable(Strict):
    kind: Literal["poisoned_training"]
    title: str = ""
    base: str = Field(description="AdvrBD experiment YAML, relative to the results file")
    overrides: list[str] = Field(default_factory=list)
    attacks: dict[str, dict[str, Any]] = Field(min_length=1, description="column label -> attack section")
    defenses: dict[str, dict[str, Any]] = Field(min_length=1, description="row label -> defense section")


Table = Annotated[DetectionTable | PoisonedTrainingTable, Field(discriminator="kind")]


class ResultsTracking(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite under storage)")


class ResultsConfig(Strict):
    name: str = Field("results", min_length=1, description="MLflow experiment of every run this makes")
    storage: str = Field(".bdray", description="stage artifacts and the local MLflow store, relative to the cwd")
    tracking: ResultsTracking = ResultsTracking()
    out: str = Field("docs/results.md", description="the report, relative to the results file")
    tables: dict[str, Table] = Field(min_length=1)

    # Filled at load: where the file was, and each row's validated experiment config.
    source: str = Field("", exclude=True)
    rows: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude=True)

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.storage).resolve() / 'mlflow.db'}"


def _raise_errors(errors: list[tuple[str, str]], source: str) -> None:
    if errors:
        # A poisoned-training table validates every (attack, defense) pair: each error once.
        raise ConfigError(list(dict.fromkeys(errors)), source)


def _row_config(
    config: ResultsConfig,
    table_name: str,
    table: DetectionTable | PoisonedTrainingTable,
    base_dir: Path,
    row: str,
    attack: Mapping[str, Any],
    label: str | None,
    defense: Mapping[str, Any] | None,
    errors: list[tuple[str, str]],
) -> Any:
    from bdray.advrbd_run import validate_advrbd

    where = f"tables.{table_name}"
    try:
        raw = apply_overrides(read_yaml(base_dir / table.base), table.overrides)
    except ConfigError as exc:
        errors.extend((f"{where}.base ({table.base}): {field}", msg) for field, msg in exc.errors)
        return None
    raw["attack"] = dict(attack)
    if defense is not None:
        raw["defense"] = _defense_section(raw.get("defense"), defense)
    raw["storage"] = config.storage
    run_name = f"{table_name}/{row}" + (f"/{label}" if label else "")
    raw["tracking"] = {"enabled": True, "uri": config.tracking_uri(), "experiment": config.name, "run_name": run_name}
    try:
        return (validate_config if table.kind == "detection" else validate_advrbd)(raw)
    except ConfigError as exc:
        for field, msg in exc.errors:
            if field.startswith("attack"):
                errors.append((f"{where}.attacks.{row}{field[len('attack') :]}", msg))
            elif field.startswith("defense") and label is not None:
                errors.append((f"{where}.defenses.{label}{field[len('defense') :]}", msg))
            else:
                errors.append((f"{where}.base ({table.base}): {field}", msg))
    return None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if nested else value
    return out


def _defense_section(base: Any, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's defense over the base's: merged when the row's defense extends the base's (advrbd+ keeps
    advrbd.yaml's budget and changes only its own fields), replaced otherwise (ABL has its own)."""
    from bdray.defenses.advrbd import POISONED_TRAINING

    if not isinstance(base, Mapping):
        return dict(row)
    try:
        base_cls = POISONED_TRAINING.get(str(base.get("name", "advrbd"))).Config
        row_cls = POISONED_TRAINING.get(str(row.get("name"))).Config
    except KeyError:
        return dict(row)  # validation names the unknown defense
    return _merge(base, row) if issubclass(row_cls, base_cls) else dict(row)


def _check_sections(
    where: str, sections: Mapping[str, Mapping[str, Any]], resolve: Callable[[str], Any], errors: list[tuple[str, str]]
) -> None:
    from bdray.config import _pydantic_errors

    for label, section in sections.items():
        name = section.get("name")
        if not name:
            errors.append((f"{where}.{label}.name", "missing; name the component"))
            continue
        try:
            resolve(str(name)).Config.model_validate(section)
        except KeyError as exc:
            errors.append((f"{where}.{label}.name", str(exc.args[0])))
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, (*where.split("."), label)))


def validate_results(raw: Mapping[str, Any], source: str = "results", base_dir: str | Path = ".") -> ResultsConfig:
    """Validate a results file: its own fields, then every row's experiment, detector and repair,
    so a typo in the last table fails before the first model trains."""
    from bdray.config import _pydantic_errors
    from bdray.defenses import defense_class
    from bdray.defenses.repair import repair_class

    if not isinstance(raw, Mapping):
        raise ConfigError([("(top level)", "expected a mapping with 'tables'")], source)
    tables = raw.get("tables")
    if isinstance(tables, Mapping):
        missing = [name for name, t in tables.items() if isinstance(t, Mapping) and "kind" not in t]
        if missing:
            raise ConfigError(
                [(f"tables.{n}.kind", "missing; 'detection' or 'poisoned_training'") for n in missing], source
            )
    try:
        config = ResultsConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(exc), source) from None
    errors: list[tuple[str, str]] = []
    rows: dict[str, dict[str, Any]] = {}
    base_dir = Path(base_dir)
    for name, table in config.tables.items():
        rows[name] = {}
        if isinstance(table, DetectionTable):
            _check_sections(f"tables.{name}.detectors", table.detectors, defense_class, errors)
            _check_sections(f"tables.{name}.repairs", table.repairs, repair_class, errors)
            errors.extend(
                (
                    f"tables.{name}.eval_subset.{k}",
                    f"not a detector column of this table; it has {list(table.detectors)}",
                )
                for k in table.eval_subset
                if k not in table.detectors
            )
            for row, attack in table.attacks.items():
                rows[name][row] = _row_config(config, name, table, base_dir, row, attack, None, None, errors)
        else:
            for row, attack in table.attacks.items():
                for label, defense in table.defenses.items():
                    rows[name][(row, label)] = _row_config(
                        config, name, table, base_dir, row, attack, label, defense, errors
                    )
    _raise_errors(errors, source)
    return config.model_copy(update={"source": source, "rows": rows})


def load_results(path: str | Path, overrides: Iterable[str] = ()) -> ResultsConfig:
    path = Path(path)
    return validate_results(apply_overrides(read_yaml(path), overrides), str(path), path.parent)


# -- cells ----------------------------------------------------------------------------------------


def _experiment_key(config: Any) -> dict[str, Any]:
    # Where a run is tracked and how many workers run it do not change its numbers.
    return {k: v for k, v in config.to_dict().items() if k not in ("tracking", "ray", "storage")}


def _summary_cell(
    store: Any,
    cells: _Cells,
    stage: str,
    exp: Any,
    run: Callable[..., dict[str, Any]],
    progress: ProgressFn,
    parent_run_id: str | None,
) -> dict[str, Any]:
    """A row's whole experiment (``run``: BaDExpert's or AdvrBD's) as one stage; its summary."""

    def compute(tmp: Path) -> None:
        summary = run(exp, reuse=store.reuse, progress=progress, parent_run_id=parent_run_id)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=float))

    result = cells.note(store.run(stage, _experiment_key(exp), [], compute))
    return json.loads((result.path / "summary.json").read_text())


def _cell_inputs(exp: ExperimentConfig, pair: Any, attack_path: Path, model_path: Path, num_cpus: float) -> tuple:
    """What every baseline cell sees: the row's M, its clean splits and its triggered test inputs."""
    from bdray.models import load_weights
    from bdray.pipeline import _set_threads, eval_inputs, model_spec

    _set_threads(num_cpus)
    model = load_weights(model_spec(exp, pair).build(), model_path)
    inputs = eval_inputs(exp, pair, attack_path)
    return model, inputs["splits"], inputs["triggered"]


def _detector_cell(
    tmp: Path,
    exp: ExperimentConfig,
    pair: Any,
    attack_path: Path,
    model_path: Path,
    probs_path: Path,
    section: dict[str, Any],
    num_cpus: float,
    subset: int | None = None,
) -> None:
    from bdray import metrics
    from bdray.defenses import build_defense

    model, splits, triggered = _cell_inputs(exp, pair, attack_path, model_path, num_cpus)
    probs = np.load(probs_path)
    evaluation, clean_pred, bd_pred = splits.evaluation, probs["clean"].argmax(1), probs["triggered"].argmax(1)
    if subset is not None:
        # The same draw for every detector with the same size and seed, independent of the detector.
        rng = np.random.default_rng([exp.seed, subset])
        ci = np.sort(rng.permutation(len(evaluation))[:subset])
        ti = np.sort(rng.permutation(len(triggered))[:subset])
        evaluation, clean_pred = evaluation.subset(ci), clean_pred[ci]
        triggered, bd_pred = triggered.subset(ti), bd_pred[ti]
    detector = build_defense(section)
    t0 = time.perf_counter()
    detector.fit(model, splits.reserved, seed=exp.seed)
    fit_seconds = time.perf_counter() - t0
    fpr = exp.defense.target_fpr
    detector.calibrate(splits.calibration, fpr)
    t0 = time.perf_counter()
    clean_s, bd_s = detector.score(evaluation.images), detector.score(triggered.images)
    score_seconds = time.perf_counter() - t0
    out = metrics.detection_metrics(
        clean_s, bd_s, clean_pred, evaluation.labels, bd_pred, triggered.labels, detector.threshold_, fpr
    )
    out |= {
        "num_eval_clean": len(clean_s),
        "num_eval_triggered": len(bd_s),
        "threshold": detector.threshold_,
        "time_fit": fit_seconds,
        "seconds_per_input": score_seconds / max(1, len(clean_s) + len(bd_s)),
    }
    (tmp / "metrics.json").write_text(json.dumps(out, indent=2))
    np.savez(tmp / "scores.npz", clean=clean_s, triggered=bd_s)


def _repair_cell(
    tmp: Path,
    exp: ExperimentConfig,
    pair: Any,
    attack_path: Path,
    model_path: Path,
    section: dict[str, Any],
    num_cpus: float,
) -> None:
    from bdray import metrics
    from bdray.defenses.repair import build_repair
    from bdray.models import save_weights
    from bdray.train import predict_proba

    model, splits, triggered = _cell_inputs(exp, pair, attack_path, model_path, num_cpus)
    t0 = time.perf_counter()
    repaired = build_repair(section).fit(model, splits.reserved, seed=exp.seed).repaired_
    seconds = time.perf_counter() - t0
    batch = exp.eval.batch_size
    out = {
        "defended_ca": metrics.accuracy(
            predict_proba(repaired, splits.evaluation.images, batch_size=batch).argmax(1), splits.evaluation.labels
        ),
        "defended_asr": metrics.accuracy(
            predict_proba(repaired, triggered.images, batch_size=batch).argmax(1), triggered.labels
        ),
        "time_fit": seconds,
    }
    (tmp / "metrics.json").write_text(json.dumps(out, indent=2))
    save_weights(repaired, tmp / "model.safetensors")


# -- running --------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def metric_name(text: str) -> str:
    """A row or column label as MLflow accepts it in a metric name (labels such as 'l1=10 l2=0.5' are
    free-form): characters outside letters, digits, '_', '-', '.', ' ', ':' and '/' become '_'."""
    return re.sub(r"[^\w\-. :/]", "_", text)


class _Cells:
    """Counts what a run computed and what it found in the stage store."""

    def __init__(self) -> None:
        self.computed = 0
        self.reused = 0

    def note(self, result: Any) -> Any:
        if result.cached:
            self.reused += 1
        else:
            self.computed += 1
        return result


def _detection_table(
    name: str,
    table: DetectionTable,
    config: ResultsConfig,
    store: Any,
    cells: _Cells,
    parent_run_id: str | None,
    progress: ProgressFn,
) -> dict[str, dict[str, Any]]:
    import ray

    from bdray.pipeline import _outside_trial, _stage_task, load_data, run_experiment

    out: dict[str, dict[str, Any]] = {}
    for i, (row, exp) in enumerate(config.rows[name].items(), 1):
        progress(f"[{name} {i}/{len(table.attacks)}] {row}: BaDExpert")
        summary = _summary_cell(store, cells, "results_badexpert", exp, run_experiment, progress, parent_run_id)
        keys = summary["stage_keys"]
        stages = store.root
        model_stage = "suspect" if exp.model.checkpoint else "train"
        model_path = stages / model_stage / keys["train"] / "model.safetensors"
        # The inputs are triggered by the trigger stage's attack where there is one (BaDExpert-Adap).
        attack_path = stages / "trigger" / keys["trigger"] if "trigger" in keys else stages / "poison" / keys["poison"]
        probs_path = stages / "predict" / keys["predict_model"] / "probs.npz"
        row_out: dict[str, Any] = {
            "badexpert": {
                k: summary[k]
                for k in (
                    "model_ca",
                    "model_asr",
                    "auroc",
                    "auroc_noisy",
                    "tpr_at_fpr",
                    "fpr",
                    "defended_ca",
                    "defended_asr",
                )
            }
            # A trigger optimized against M (BaDExpert-Adap) reports its mask norm, Table 13's "Norm".
            | ({"mask_l1": summary["trigger_mask_l1"]} if "trigger_mask_l1" in summary else {})
        }
        pair_ref = ray.put(load_data(exp))
        cpus = exp.ray.task_cpus
        task = ray.remote(num_cpus=cpus, max_retries=0, scheduling_strategy=_outside_trial())(_stage_task)
        base_key = {
            "data": exp.to_dict()["data"],
            "seed": exp.seed,
            "eval": exp.to_dict()["eval"],
            "target_fpr": exp.defense.target_fpr,
        }
        inputs = [keys["train"], keys.get("trigger", keys["poison"]), keys["predict_model"]]
        refs = {}
        for label, section in table.detectors.items():
            subset = table.eval_subset.get(label)
            refs[label] = task.remote(
                str(store.root),
                store.reuse,
                "results_detector",
                {**base_key, "detector": section, **({"eval_subset": subset} if subset else {})},
                inputs,
                _detector_cell,
                exp,
                pair_ref,
                attack_path,
                model_path,
                probs_path,
                section,
                cpus,
                subset,
            )
        for label, section in table.repairs.items():
            refs[label] = task.remote(
                str(store.root),
                store.reuse,
                "results_repair",
                {**base_key, "repair": section},
                inputs[:2],
                _repair_cell,
                exp,
                pair_ref,
                attack_path,
                model_path,
                section,
                cpus,
            )
        for label, ref in refs.items():
            cell = cells.note(ray.get(ref))
            row_out[label] = json.loads((cell.path / "metrics.json").read_text())
            progress(f"      {label}: {'reused' if cell.cached else f'done in {cell.seconds:.0f}s'}")
        out[row] = row_out
    return out


def _poisoned_training_table(
    name: str,
    table: PoisonedTrainingTable,
    config: ResultsConfig,
    store: Any,
    cells: _Cells,
    parent_run_id: str | None,
    progress: ProgressFn,
) -> dict[str, dict[str, Any]]:
    from bdray.advrbd_run import run_advrbd

    out: dict[str, dict[str, Any]] = {}
    total = len(config.rows[name])
    for i, ((attack, label), exp) in enumerate(config.rows[name].items(), 1):
        progress(f"[{name} {i}/{total}] {attack}: {label}")
        summary = _summary_cell(store, cells, "results_poisoned_training", exp, run_advrbd, progress, parent_run_id)
        out.setdefault(attack, {})[label] = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    return out


def run_results(
    config: ResultsConfig,
    *,
    only: Iterable[str] = (),
    out: str | Path | None = None,
    reuse: bool = True,
    progress: ProgressFn = _stderr,
) -> dict[str, Any]:
    """Run every table (or those named in ``only``), write the report and log it all to MLflow."""
    import ray

    from bdray.pipeline import ensure_ray
    from bdray.stages import StageStore
    from bdray.tracking import Tracker

    names = list(only) or list(config.tables)
    unknown = [n for n in names if n not in config.tables]
    if unknown:
        raise ConfigError(
            [("--only", f"no table named {n!r}; the file has {', '.join(config.tables)}") for n in unknown],
            config.source,
        )
    t0 = time.perf_counter()
    storage = Path(config.storage).resolve()
    store = StageStore(storage / "stages", reuse=reuse)
    first = next(iter(config.rows[names[0]].values()))
    started_here = ensure_ray(first)
    cells = _Cells()
    results: dict[str, Any] = {}
    try:
        tracker = Tracker(config.tracking_uri(), config.name, artifact_root=storage / "mlartifacts")
        with tracker.run(
            "results", tags={"bdray.kind": "results", "tables": ",".join(names), "git_commit": _git_commit()}
        ) as run:
            run.log_params(
                {
                    "results_file": config.source,
                    "tables": ",".join(names),
                    "config_hash": config_hash(config.model_dump(mode="json")),
                }
            )
            for name in names:
                table = config.tables[name]
                build = _detection_table if isinstance(table, DetectionTable) else _poisoned_training_table
                results[name] = build(name, table, config, store, cells, run.run_id, progress)
                run.log_metrics(
                    {
                        metric_name(f"{name}.{row}.{col}.{k}"): v
                        for row, cols in results[name].items()
                        for col, values in cols.items()
                        for k, v in values.items()
                        if isinstance(v, int | float) and math.isfinite(v)
                    }
                )
            meta = {
                "command": f"bdray results {config.source}" + "".join(f" --only {n}" for n in only),
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "git_commit": _git_commit(),
                "seconds": time.perf_counter() - t0,
                "computed": cells.computed,
                "reused": cells.reused,
                "mlflow_run_id": run.run_id,
                "experiment": config.name,
            }
            target = Path(out) if out is not None else Path(config.source).parent / config.out
            previous = target.read_text() if only and target.is_file() else None
            text = to_markdown(config, results, meta, previous)
            run.log_text(text, "results.md")
            run.log_text(json.dumps({"meta": meta, "results": results}, indent=2, default=float), "results.json")
    finally:
        if started_here:
            ray.shutdown()
    from bdray.atomic import atomic_write

    atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    progress(
        f"wrote {target} ({cells.computed} cells computed, {cells.reused} reused, "
        f"{time.perf_counter() - t0:.0f}s); MLflow run {meta['mlflow_run_id']} in experiment {config.name}"
    )
    return {"meta": meta, "results": results, "path": str(target)}


# -- the report -----------------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _pair(values: Mapping[str, Any] | None, a: str, b: str) -> str:
    if not values:
        return "-"
    return f"{_pct(values.get(a))} / {_pct(values.get(b))}"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _detection_markdown(name: str, table: DetectionTable, rows: dict[str, dict[str, Any]], fpr: float) -> list[str]:
    detectors = ["badexpert", *table.detectors]
    head = {
        "badexpert": "BaDExpert",
        **{k: v["name"] + " ‡" * (k in table.eval_subset) for k, v in table.detectors.items()},
    }
    # Table 13's "Norm" column where a trigger was optimized against M: the mask's L1 norm in pixels.
    norm = any("mask_l1" in cols["badexpert"] for cols in rows.values())
    lines = [
        f"### {table.title or name}: AUROC (%) of each input detector",
        "",
        "| attack | M's CA | M's ASR | "
        + ("Norm \\|m\\| | " if norm else "")
        + " | ".join(head[d] for d in detectors)
        + " |",
        "|---" * (3 + norm + len(detectors)) + "|",
    ]
    implanted = {row: cols for row, cols in rows.items() if cols["badexpert"]["model_asr"] >= table.min_asr}

    def label(row: str) -> str:
        return row if row in implanted else f"{row} †"

    def cells(values: list[str], mask: str) -> str:
        return " | ".join([*values[:2], *([mask] if norm else []), *values[2:]])

    for row, cols in rows.items():
        be = cols["badexpert"]
        values = [_pct(be["model_ca"]), _pct(be["model_asr"]), *(_pct(cols[d].get("auroc")) for d in detectors)]
        mask = f"{be['mask_l1']:.1f}" if "mask_l1" in be else "-"
        lines.append(f"| {label(row)} | {cells(values, mask)} |")
    averages = [
        _pct(_mean([cols[d][k] for cols in implanted.values()]))
        for d, k in [("badexpert", "model_ca"), ("badexpert", "model_asr"), *((d, "auroc") for d in detectors)]
    ]
    lines.append(f"| **average** | {cells(averages, '-')} |")
    if table.eval_subset:
        lines += [
            "",
            "‡ Scored on a seeded random draw of "
            + ", ".join(f"{n:,} clean and {n:,} triggered inputs ({k})" for k, n in table.eval_subset.items())
            + " of the evaluation set, for its cost (forward passes per input); the other columns see all of it.",
        ]
    if len(implanted) < len(rows):
        lines += [
            "",
            f"† M's ASR is below {100 * table.min_asr:g}%: the backdoor does not fire on these test inputs (the "
            "attack did not implant at this budget, or an adaptive trigger traded M's ASR for evasion), so the "
            "row says little about the detectors and the averages leave it out.",
        ]
    repairs = list(table.repairs)
    columns = ["none", *detectors, *repairs]
    titles = {"none": "no defense", **head, **{k: v["name"] for k, v in table.repairs.items()}}
    lines += [
        "",
        f"### {table.title or name}: CA / ASR (%) after each defense (detectors reject at "
        f"{100 * fpr:g}% FPR, calibrated on held-out clean data; repairs finetune M on D_c)",
        "",
        "| attack | " + " | ".join(titles[c] for c in columns) + " |",
        "|---" * (1 + len(columns)) + "|",
    ]

    def cell(cols: Mapping[str, Any], c: str) -> tuple[float, float]:
        if c == "none":
            return cols["badexpert"]["model_ca"], cols["badexpert"]["model_asr"]
        return cols[c]["defended_ca"], cols[c]["defended_asr"]

    for row, cols in rows.items():
        lines.append(
            f"| {label(row)} | " + " | ".join("{} / {}".format(*map(_pct, cell(cols, c))) for c in columns) + " |"
        )
    lines.append(
        "| **average** | "
        + " | ".join(
            f"{_pct(_mean([cell(cols, c)[0] for cols in implanted.values()]))} / "
            f"{_pct(_mean([cell(cols, c)[1] for cols in implanted.values()]))}"
            for c in columns
        )
        + " |"
    )
    return lines


def _poisoned_training_markdown(name: str, table: PoisonedTrainingTable, rows: dict[str, dict[str, Any]]) -> list[str]:
    attacks = list(rows)
    lines = [
        f"### {table.title or name}: ACC / ASR (%) of the model trained on the poisoned set",
        "",
        "| defense | " + " | ".join(attacks) + " |",
        "|---" * (1 + len(attacks)) + "|",
    ]
    advrbd_like = [lbl for lbl in table.defenses if any("relearn_acc" in rows[a].get(lbl, {}) for a in attacks)]
    ref = advrbd_like[0] if advrbd_like else None
    if ref is not None:
        lines.append(
            "| clean model (trained before poisoning) | "
            + " | ".join(_pair(rows[a].get(ref), "clean_model_acc", "clean_model_asr") for a in attacks)
            + " |"
        )
        lines.append(
            "| no defense | "
            + " | ".join(_pair(rows[a].get(ref), "no_defense_acc", "no_defense_asr") for a in attacks)
            + " |"
        )
    for label in table.defenses:
        if label in advrbd_like:
            lines.append(
                f"| {label} | "
                + " | ".join(_pair(rows[a].get(label), "relearn_acc", "relearn_asr") for a in attacks)
                + " |"
            )
            lines.append(
                f"| {label} without relearn | "
                + " | ".join(_pair(rows[a].get(label), "final_acc", "final_asr") for a in attacks)
                + " |"
            )
        else:
            lines.append(
                f"| {label} | "
                + " | ".join(_pair(rows[a].get(label), "final_acc", "final_asr") for a in attacks)
                + " |"
            )
    if advrbd_like:
        lines += [
            "",
            f"Identification of the poisoned samples (recall / FPR, %) in {name}:",
            "",
            "| defense | " + " | ".join(attacks) + " |",
            "|---" * (1 + len(attacks)) + "|",
        ]
        for label in advrbd_like:
            if any("pre_expert_id_recall" in rows[a].get(label, {}) for a in attacks):
                lines.append(
                    f"| {label}: identification alone | "
                    + " | ".join(_pair(rows[a].get(label), "pre_expert_id_recall", "pre_expert_id_fpr")
                                 for a in attacks)
                    + " |"
                )
            lines.append(
                f"| {label} | " + " | ".join(_pair(rows[a].get(label), "id_recall", "id_fpr") for a in attacks) + " |"
            )
    return lines


# Each table is its own section, headed by a marker line, so that `--only NAME` can replace that
# section and keep the others: on a small machine the tables come from separate runs of the same file.
_MARK = "<!-- bdray results table: {} -->"
_SECTION = re.compile("^" + re.escape(_MARK).replace(r"\{\}", "(.+?)") + "$", re.M)


def report_sections(text: str) -> dict[str, str]:
    """The sections of a report written by :func:`to_markdown`, by table name (a file without markers has none)."""
    marks = list(_SECTION.finditer(text))
    ends = [m.start() for m in marks[1:]] + [len(text)] * bool(marks)
    return {m.group(1): text[m.start() : end].strip() for m, end in zip(marks, ends, strict=True)}


def _provenance(meta: Mapping[str, Any]) -> str:
    reused = (f", {meta['reused']} found in the stage store (computed by an earlier run with the same config and "
              "inputs)" if meta["reused"] else "")
    return (
        f"Written by `{meta['command']}` on {meta['date']} (git {meta['git_commit']}), "
        f"{meta['seconds'] / 60:.0f} min; {meta['computed']} cells computed by this run{reused}. "
        f"MLflow: experiment `{meta['experiment']}`, parent run `{meta['mlflow_run_id']}`, one child run per row."
    )


def to_markdown(
    config: ResultsConfig, results: Mapping[str, Any], meta: Mapping[str, Any], previous: str | None = None
) -> str:
    """The report: one section per table in this run, plus the sections of ``previous`` (the file
    being replaced) for the results file's other tables, in the results file's order."""
    sections = {n: s for n, s in report_sections(previous or "").items() if n in config.tables}
    for name, rows in results.items():
        table = config.tables[name]
        lines = [_MARK.format(name), f"## {table.title or name}", "", _provenance(meta), ""]
        if isinstance(table, DetectionTable):
            fpr = next(iter(config.rows[name].values())).defense.target_fpr
            lines += _detection_markdown(name, table, rows, fpr)
        else:
            lines += _poisoned_training_markdown(name, table, rows)
        sections[name] = "\n".join(lines).strip()
    missing = [n for n in config.tables if n not in sections]
    head = [
        "# Results",
        "",
        f"Every table of `{config.source}`, each written by the command named under its title, every number "
        "in a table from that run. `--only NAME` replaces that table's section and keeps the others. "
        "Do not edit by hand: rerun the command.",
    ]
    if missing:
        head.append(f"Not yet run: {', '.join(missing)}.")
    body = [sections[n] for n in config.tables if n in sections]
    return "\n\n".join(["\n".join(head), *body]) + "\n"
