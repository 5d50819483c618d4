"""Run the whole experiment with the defense the config names (BaDExpert, AdvrBD, AdvrBD+).

    python jobs/defend.py --config configs/quickstart.yaml --set defense.eta=3e-4
    python jobs/defend.py --config configs/advrbd.yaml --set defense.name=advrbd+
"""

from __future__ import annotations

import json

from _common import job_parser, overrides, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--out", help="folder for summary.json (default: none; everything is in MLflow)")
    parser.add_argument("--no-reuse", action="store_true", help="recompute every stage even if its artifact exists")
    args = parser.parse_args(argv)
    from bdray import workflows

    workflow, config = workflows.load_defended(args.config, overrides(args))
    summary = workflows.defend(workflow, config, out=args.out, reuse=not args.no_reuse)
    print(workflow.function("describe")(summary, config))
    print(json.dumps({"mlflow_run_id": summary.get("mlflow_run_id"), "tracking_uri": config.tracking_uri(),
                      "experiment": config.tracking.experiment}))
    return 0


if __name__ == "__main__":
    run_job(main)
