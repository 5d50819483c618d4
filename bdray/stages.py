"""Content-addressed stage artifacts.

A stage (poison, train, expert, auxiliary, ...) writes its output under
``<root>/<stage>/<key>/`` where the key hashes the stage's config and the keys of its inputs. A
sweep over eta therefore finds the trained backdoored model instead of training it again, and two
processes that need the same missing artifact take a file lock so only one computes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdray.config import config_hash

STAGE_FORMAT = 1  # bump when an artifact layout changes, so old caches are not misread


@dataclass(frozen=True)
class StageResult:
    stage: str
    key: str
    path: Path
    cached: bool
    seconds: float


class StageStore:
    def __init__(self, root: str | os.PathLike, *, reuse: bool = True) -> None:
        self.root = Path(root)
        self.reuse = reuse

    def key(self, stage: str, config: Any, inputs: Sequence[str] = ()) -> str:
        return config_hash({"stage": stage, "format": STAGE_FORMAT, "config": config, "inputs": list(inputs)})

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def done(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / "_SUCCESS").is_file()

    def run(
        self,
        stage: str,
        config: Any,
        inputs: Sequence[str],
        compute: Callable[[Path], None],
    ) -> StageResult:
        """Return the artifact for (stage, config, inputs), computing it with ``compute(tmp_dir)`` if absent."""
        key = self.key(stage, config, inputs)
        final = self.path(stage, key)
        start = time.perf_counter()
        if self.reuse and self.done(stage, key):
            return StageResult(stage, key, final, True, 0.0)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(final.parent / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent trial computing the same key finishes first
            if self.reuse and self.done(stage, key):
                return StageResult(stage, key, final, True, time.perf_counter() - start)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
            try:
                compute(tmp)
                (tmp / "_stage.json").write_text(
                    json.dumps({"stage": stage, "key": key, "inputs": list(inputs), "config": config}, default=str)
                )
                (tmp / "_SUCCESS").write_text("")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._record(stage, key)
        return StageResult(stage, key, final, False, time.perf_counter() - start)

    def _record(self, stage: str, key: str) -> None:
        # An append-only log of computations: how tests and benchmarks count real stage executions.
        with open(self.root / "executions.jsonl", "a") as f:
            f.write(json.dumps({"stage": stage, "key": key, "time": time.time(), "pid": os.getpid()}) + "\n")

    def executions(self, stage: str | None = None) -> list[dict[str, Any]]:
        log = self.root / "executions.jsonl"
        if not log.is_file():
            return []
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [r for r in rows if stage is None or r["stage"] == stage]
