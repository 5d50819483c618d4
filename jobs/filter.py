"""Screen a shard directory with a saved BaDExpert detector; write the accepted and the rejected rows.

    python jobs/filter.py --detector runs/quickstart/detector --input data/incoming --out runs/filtered

Reads the shards as a Ray Data stream, runs one filter per actor (``--actors``, ``--gpu``) and writes
``accepted/`` and ``rejected/`` Parquet shards with ``pred_label`` and ``score``, plus ``filter.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

from _common import EXIT_CONFIG, run_job


def main(argv: list[str] | None = None) -> int:
    from bdray.detect import add_filter_arguments, filter_from_args

    parser = add_filter_arguments(argparse.ArgumentParser(description=__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        summary = filter_from_args(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # A bad detector, input or output path: one line, like a config error, not a traceback.
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    print(json.dumps({"out": args.out, **summary["counts"]}))
    return 0


if __name__ == "__main__":
    run_job(main)
