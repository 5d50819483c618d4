"""Run a sweep (a base experiment + a search space) on Ray Tune, one MLflow child run per trial.

    python jobs/sweep.py --config configs/sweeps/table9_eta.yaml --set max_concurrent_trials=2

``--set`` names sweep fields; the base experiment's fields sit under ``overrides.``
(``--set overrides.train.epochs=2``), which is also where the environment's storage and tracking
URI go.
"""

from __future__ import annotations

import json

from _common import job_parser, overrides, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--no-resume", action="store_true", help="run finished trials again instead of skipping them")
    args = parser.parse_args(argv)
    from bdray import workflows

    config = workflows.load_sweep_config(args.config, overrides(args, prefix="overrides."))
    result = workflows.sweep(config, resume=not args.no_resume)
    ran = sum(not t["skipped"] for t in result["trials"])
    print(f"{len(result['trials'])} trials ({ran} run now); MLflow experiment '{result['experiment']}', "
          f"parent run {result['parent_run_id']}")
    print(json.dumps({"experiment": result["experiment"], "parent_run_id": result["parent_run_id"],
                      "trials": len(result["trials"]), "best": result["best"]}, default=str))
    return 0


if __name__ == "__main__":
    run_job(main)
