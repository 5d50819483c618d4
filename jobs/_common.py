"""What every entry point in jobs/ shares: ``--config``, ``--set`` overrides, the environment, exit codes.

A job is ``python jobs/<workflow>.py --config FILE [--set key=value ...]``, the same command on a
laptop head node and on a cluster (``ray job submit --working-dir . -- python jobs/...``): where the
runs go comes from the environment, ``MLFLOW_TRACKING_URI`` and ``BDRAY_STORAGE`` (see
:func:`bdray.workflows.environment_overrides`); an explicit ``--set`` still wins over both.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_CONFIG = 2  # as `bdray`: a config error, reported one line per field
EXIT_TERMINATED = 143  # 128 + SIGTERM


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, relative to the working directory")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a dotted config field (repeatable), e.g. defense.eta=3e-4")
    return parser


def overrides(args: argparse.Namespace, prefix: str = "") -> list[str]:
    """The environment's overrides (under ``prefix``), then the command line's."""
    from bdray.workflows import environment_overrides

    return [*environment_overrides(os.environ, prefix), *args.overrides]


def _terminate(signum: int, frame: object) -> None:
    # `ray job stop` sends SIGTERM: unwinding (rather than dying) lets every open MLflow run be ended.
    raise SystemExit(EXIT_TERMINATED)


def run_job(main: Callable[[], int]) -> NoReturn:
    """Run ``main`` and exit with its code; a config error exits 2 with one ``error:`` line per field."""
    from bdray.config import ConfigError

    signal.signal(signal.SIGTERM, _terminate)
    # MLflow announces schema migrations at INFO on every fresh store; it reads its level at import.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        code = main()
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr, flush=True)
        code = EXIT_CONFIG
    sys.exit(code)
