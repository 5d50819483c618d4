"""Build the papers' comparison tables (attacks x defenses) into one report, on the cluster.

    python jobs/results.py --config configs/results.yaml [--only detectors]

Every cell is a stage artifact under the storage (``BDRAY_STORAGE``): a resubmitted job continues
where the last one stopped. Every number goes to MLflow (``MLFLOW_TRACKING_URI``), experiment
``name`` of the file, one parent run with a child run per row; the report is attached to it.
"""

from __future__ import annotations

from pathlib import Path

from _common import job_parser, overrides, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--only", action="append", default=[], metavar="TABLE", help="run only this table")
    parser.add_argument("--out", help="report path (default: the file's 'out')")
    args = parser.parse_args(argv)
    from bdray.results import load_results, run_results

    config = load_results(args.config, overrides(args))
    written = run_results(config, only=args.only, out=args.out)
    print(Path(written["path"]).read_text())
    print(f"report written to {written['path']}; MLflow run {written['meta']['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    run_job(main)
