"""Poison the training set as the experiment would, and keep it as a stage artifact.

    python jobs/poison.py --config configs/smoke.yaml --set attack.poison_rate=0.05
"""

from __future__ import annotations

import json

from _common import job_parser, overrides, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--no-reuse", action="store_true", help="recompute even if the artifact exists")
    args = parser.parse_args(argv)
    from bdray import workflows

    config = workflows.load_experiment(args.config, overrides(args))
    result = workflows.poison(config, reuse=not args.no_reuse)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_job(main)
