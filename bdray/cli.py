"""``bdray`` command line: a thin shell over library functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bdray.config import ConfigError, load_config
from bdray.detect import add_filter_arguments

EXIT_CONFIG = 2

SUMMARY_ROWS = (
    ("suspect model M", "model_ca", "model_asr"),
    ("backdoor expert B", "expert_ca", "expert_asr"),
    ("auxiliary model M'", "aux_ca", "aux_asr"),
    ("M + BaDExpert (held-out threshold)", "defended_ca", "defended_asr"),
    ("M + BaDExpert (in-sample threshold, as the paper)", "defended_ca_insample", "defended_asr_insample"),
)


def format_summary(summary: dict) -> str:
    width = max(len(r[0]) for r in SUMMARY_ROWS)
    lines = [f"{'':{width}}  {'CA %':>7}  {'ASR %':>7}", "-" * (width + 18)]
    for label, ca, asr in SUMMARY_ROWS:
        lines.append(f"{label:{width}}  {100 * summary[ca]:7.2f}  {100 * summary[asr]:7.2f}")
    lines += [
        "-" * (width + 18),
        f"AUROC {summary['auroc']:.4f}   AUROC (noisy augmented) {summary['auroc_noisy']:.4f}   "
        f"TPR at {100 * summary['target_fpr']:g}% FPR {summary['tpr_at_fpr']:.4f}",
        f"threshold {summary['threshold']:.4g} calibrated on held-out clean data for "
        f"{100 * summary['target_fpr']:g}% FPR; measured FPR on the evaluation set {100 * summary['fpr']:.2f}%",
        f"CA drop {100 * (summary['model_ca'] - summary['defended_ca']):.2f} points; "
        f"wall time {summary['time_total']:.0f}s; MLflow run {summary.get('mlflow_run_id')}",
    ]
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    from bdray.pipeline import run_experiment

    config = load_config(args.config, args.set)
    out = Path(args.out) if args.out else None
    summary = run_experiment(config, out=out, reuse=not args.no_reuse)
    print(format_summary(summary))
    if out is not None:
        print(f"summary written to {out / 'summary.json'}")
    if config.tracking.enabled:
        print(f"MLflow: mlflow ui --backend-store-uri {config.tracking_uri()}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from bdray.tune import SweepInterrupted, load_sweep, run_sweep

    sweep = load_sweep(args.sweep, args.set)
    try:
        result = run_sweep(sweep, resume=not args.no_resume)
    except SweepInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    ran = sum(not t["skipped"] for t in result["trials"])
    print(f"{len(result['trials'])} trials ({ran} run now, {len(result['trials']) - ran} finished earlier); "
          f"MLflow experiment '{result['experiment']}', parent run {result['parent_run_id']}")
    if result["best"] is not None:
        print(f"best {sweep.metric}: {result['best']['metrics'][sweep.metric]:.4f} at {result['best']['params']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from bdray.report import DEFAULT_METRICS, write_report

    uri = args.uri or f"sqlite:///{Path(args.storage).resolve() / 'mlflow.db'}"
    metrics = tuple(args.metric) if args.metric else DEFAULT_METRICS
    try:
        written = write_report(args.experiment, uri, args.out, metrics=metrics, x=args.x)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(written["markdown"])
    print(f"report written to {Path(args.out) / 'report.md'} (+ report.csv, {len(written['plots'])} plots)")
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from bdray.results import load_results, run_results

    config = load_results(args.config, args.set)
    written = run_results(config, only=args.only, out=args.out, reuse=not args.no_reuse)
    print(Path(written["path"]).read_text())
    return 0


def _cmd_filter(args: argparse.Namespace) -> int:
    from bdray.detect import filter_from_args

    try:
        summary = filter_from_args(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    counts = summary["counts"]
    print(f"{counts['rows']} rows screened: {counts['accepted']} accepted, {counts['rejected']} rejected "
          f"(threshold {summary['detector']['threshold']:.4g}); written to {args.out}")
    return 0


def load_any(path: str | Path, overrides: list[str]) -> Any:
    """Any shipped kind of config through the loader that runs it: a results file (``tables``), a sweep
    (``space``), or an experiment of whichever defense it names."""
    from bdray.config import read_yaml

    raw = read_yaml(Path(path))
    if isinstance(raw, dict) and "tables" in raw:
        from bdray.results import load_results

        return load_results(path, overrides)
    if isinstance(raw, dict) and "space" in raw:
        from bdray.workflows import load_sweep_config

        return load_sweep_config(path, overrides)
    from bdray.workflows import load_defended

    return load_defended(path, overrides)[1]


def _cmd_validate(args: argparse.Namespace) -> int:
    config = load_any(args.config, args.set)
    print(json.dumps(config.model_dump(mode="json"), indent=2, default=str) if args.show else f"{args.config}: ok")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from bdray.attacks import list_attacks
    from bdray.data import list_datasets
    from bdray.defenses import list_defenses
    from bdray.models import list_models

    listing = {"attacks": list_attacks, "datasets": list_datasets, "defenses": list_defenses, "models": list_models}
    for name in listing[args.what]():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bdray", description="Backdoor defenses, swept on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment config (poison, train, defend, evaluate)")
    run.add_argument("config", help="YAML experiment config")
    run.add_argument("--out", help="folder for summary.json and the saved detector")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. defense.eta=3e-4")
    run.add_argument("--no-reuse", action="store_true", help="recompute every stage even if its artifact exists")
    run.set_defaults(func=_cmd_run)
    swp = sub.add_parser("sweep", help="run a Ray Tune sweep over experiment fields, tracked in MLflow")
    swp.add_argument("sweep", help="YAML sweep config (base experiment + search space)")
    swp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a sweep field, e.g. max_concurrent_trials=2 or overrides.data.train_subset=5000")
    swp.add_argument("--no-resume", action="store_true", help="run finished trials again instead of skipping them")
    swp.set_defaults(func=_cmd_sweep)
    rep = sub.add_parser("report", help="compare a sweep's trials from MLflow: table and plots")
    rep.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's name)")
    rep.add_argument("--uri", help="MLflow tracking URI (default: sqlite under --storage)")
    rep.add_argument("--storage", default=".bdray", help="storage folder holding mlflow.db")
    rep.add_argument("--out", default="runs/report", help="folder for report.md, report.csv and plots")
    rep.add_argument("--metric", action="append", help="metric to report (repeatable; default: the main ones)")
    rep.add_argument("--x", help="swept field on the plots' x axis (default: the first numeric one)")
    rep.set_defaults(func=_cmd_report)
    res = sub.add_parser("results", help="build the papers' comparison tables (attacks x defenses) into one report")
    res.add_argument("config", help="YAML results file (tables of attacks x defenses), e.g. configs/results.yaml")
    res.add_argument("--only", action="append", default=[], metavar="TABLE", help="run only this table (repeatable)")
    res.add_argument("--out", help="report path (default: the file's 'out', e.g. docs/results.md)")
    res.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. tables.detectors.overrides=[data.train_subset=5000]")
    res.add_argument("--no-reuse", action="store_true", help="recompute every cell and stage")
    res.set_defaults(func=_cmd_results)
    flt = sub.add_parser("filter", help="screen a shard directory with a saved detector: accepted/rejected shards")
    add_filter_arguments(flt).set_defaults(func=_cmd_filter)
    val = sub.add_parser("validate", help="validate a config without running anything")
    val.add_argument("config")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("--show", action="store_true", help="print the resolved config")
    val.set_defaults(func=_cmd_validate)
    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument("what", choices=["attacks", "datasets", "defenses", "models"])
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow announces its sqlite schema migrations at INFO on every fresh store.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
