"""Compare a sweep's finished trials from MLflow: a table (markdown, CSV) and one plot per metric.

    python jobs/report.py --config configs/sweeps/table9_eta.yaml --x defense.eta

Written to ``<storage>/reports/<sweep name>`` (or ``--out``) and attached to the sweep's parent run.
"""

from __future__ import annotations

from _common import job_parser, overrides, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--out", help="folder for report.md, report.csv and the plots")
    parser.add_argument("--x", help="swept field on the plots' x axis (default: the first numeric one)")
    parser.add_argument("--metric", action="append", help="metric to report (repeatable; default: the main ones)")
    args = parser.parse_args(argv)
    from bdray import workflows

    config = workflows.load_sweep_config(args.config, overrides(args, prefix="overrides."))
    written = workflows.report(config, out=args.out, x=args.x, metrics=tuple(args.metric or ()) or None)
    print(written["markdown"])
    print(f"report written to {written['out']} and attached to MLflow run {written['parent_run_id']}")
    return 0


if __name__ == "__main__":
    run_job(main)
