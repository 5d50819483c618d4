"""Poison and train the suspect model M on Ray Train; both stages are kept as artifacts.

    python jobs/train.py --config configs/quickstart.yaml --set train.epochs=5
"""

from __future__ import annotations

import json

from _common import job_parser, overrides, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--no-reuse", action="store_true", help="recompute every stage even if its artifact exists")
    args = parser.parse_args(argv)
    from bdray import workflows

    config = workflows.load_experiment(args.config, overrides(args))
    result = workflows.train(config, reuse=not args.no_reuse)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_job(main)
