"""StageStore: content-addressed, computed once, atomic on failure, locked across processes."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from bdray.stages import StageStore


class Counter:
    """A compute function that counts its calls and writes one artifact file."""

    def __init__(self, payload: str = "hello") -> None:
        self.calls = 0
        self.payload = payload

    def __call__(self, tmp: Path) -> None:
        self.calls += 1
        assert tmp.is_dir() and tmp.name.startswith(".")  # computing in a hidden temp dir
        (tmp / "artifact.txt").write_text(self.payload)


CONFIG = {"lr": 0.1, "epochs": 3}
INPUTS = ["abc123"]


def leftovers(store: StageStore, stage: str) -> list[str]:
    """Hidden temp dirs left in the stage folder."""
    folder = store.root / stage
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def test_first_run_computes_then_caches(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    compute = Counter()

    first = store.run("train", CONFIG, INPUTS, compute)
    assert compute.calls == 1 and not first.cached
    assert first.path == store.path("train", first.key) == tmp_path / "train" / first.key
    assert (first.path / "_SUCCESS").is_file() and store.done("train", first.key)
    assert (first.path / "artifact.txt").read_text() == "hello"
    meta = json.loads((first.path / "_stage.json").read_text())
    assert meta == {"stage": "train", "key": first.key, "inputs": INPUTS, "config": CONFIG}
    rows = store.executions()
    assert len(rows) == 1 and rows[0]["stage"] == "train" and rows[0]["key"] == first.key
    assert leftovers(store, "train") == []

    second = store.run("train", dict(CONFIG), list(INPUTS), compute)
    assert compute.calls == 1  # not called again
    assert second.cached and second.key == first.key and second.path == first.path
    assert len(store.executions()) == 1

    # a fresh store object on the same root sees the artifact too
    again = StageStore(tmp_path).run("train", CONFIG, INPUTS, compute)
    assert again.cached and compute.calls == 1


def test_key_depends_on_stage_config_and_inputs(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    base = store.key("train", CONFIG, INPUTS)
    assert base == store.key("train", {"epochs": 3, "lr": 0.1}, INPUTS)  # key order does not matter
    variants = {
        store.key("expert", CONFIG, INPUTS),
        store.key("train", {**CONFIG, "lr": 0.2}, INPUTS),
        store.key("train", CONFIG, ["abc124"]),
        store.key("train", CONFIG, [*INPUTS, "def"]),
        store.key("train", CONFIG, []),
    }
    assert base not in variants and len(variants) == 5

    compute = Counter()
    a = store.run("train", CONFIG, INPUTS, compute)
    b = store.run("train", {**CONFIG, "lr": 0.2}, INPUTS, compute)
    c = store.run("train", CONFIG, ["other"], compute)
    assert compute.calls == 3 and not (a.cached or b.cached or c.cached)
    assert len({a.path, b.path, c.path}) == 3
    assert [r["key"] for r in store.executions("train")] == [a.key, b.key, c.key]
    assert store.executions("expert") == []


def test_reuse_false_recomputes(tmp_path: Path) -> None:
    StageStore(tmp_path).run("train", CONFIG, INPUTS, Counter("old"))
    store = StageStore(tmp_path, reuse=False)
    compute = Counter("new")
    result = store.run("train", CONFIG, INPUTS, compute)
    assert compute.calls == 1 and not result.cached
    assert (result.path / "artifact.txt").read_text() == "new"  # replaced, not merged
    assert (result.path / "_SUCCESS").is_file()
    assert len(store.executions()) == 2
    assert leftovers(store, "train") == []


def test_failed_compute_leaves_nothing_behind(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    seen = {}

    def boom(tmp: Path) -> None:
        seen["tmp"] = tmp
        (tmp / "partial.bin").write_bytes(b"half")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        store.run("train", CONFIG, INPUTS, boom)
    key = store.key("train", CONFIG, INPUTS)
    assert not store.path("train", key).exists()
    assert not store.done("train", key)
    assert not seen["tmp"].exists()
    assert leftovers(store, "train") == []
    assert store.executions() == []

    # the next attempt computes normally
    compute = Counter()
    result = store.run("train", CONFIG, INPUTS, compute)
    assert compute.calls == 1 and not result.cached and len(store.executions()) == 1


def test_failed_recompute_keeps_previous_artifact(tmp_path: Path) -> None:
    first = StageStore(tmp_path).run("train", CONFIG, INPUTS, Counter("good"))

    def boom(tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageStore(tmp_path, reuse=False).run("train", CONFIG, INPUTS, boom)
    assert (first.path / "artifact.txt").read_text() == "good" and (first.path / "_SUCCESS").is_file()
    assert leftovers(StageStore(tmp_path), "train") == []
    assert len(StageStore(tmp_path).executions()) == 1


def test_directory_without_success_marker_is_recomputed(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    key = store.key("train", CONFIG, INPUTS)
    stale = store.path("train", key)
    stale.mkdir(parents=True)
    (stale / "artifact.txt").write_text("from a crashed run")
    compute = Counter()
    result = store.run("train", CONFIG, INPUTS, compute)
    assert compute.calls == 1 and not result.cached
    assert (result.path / "artifact.txt").read_text() == "hello"


# -- concurrency ------------------------------------------------------------------------------------


def _slow_compute(log: Path):
    def compute(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write("computed\n")
        time.sleep(0.5)
        (tmp / "artifact.txt").write_text("done")

    return compute


def _worker(root: str, log: str, barrier, results) -> None:
    barrier.wait(timeout=30)
    result = StageStore(root).run("train", CONFIG, INPUTS, _slow_compute(Path(log)))
    results.put((result.cached, str(result.path)))


def test_two_processes_compute_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # fcntl locks are POSIX anyway; fork skips re-importing torch
    log = tmp_path / "computations.log"
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "store"), str(log), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    outcomes = sorted(results.get(timeout=5) for _ in range(2))

    assert log.read_text().splitlines() == ["computed"]  # exactly one computation
    assert [cached for cached, _ in outcomes] == [False, True]  # the other waited and reused it
    assert outcomes[0][1] == outcomes[1][1]
    store = StageStore(tmp_path / "store")
    assert len(store.executions()) == 1
    assert (Path(outcomes[0][1]) / "artifact.txt").read_text() == "done"
    assert leftovers(store, "train") == []


def test_two_threads_compute_once(tmp_path: Path) -> None:
    log = tmp_path / "computations.log"
    barrier = threading.Barrier(2)
    results, errors = [], []

    def worker() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(StageStore(tmp_path / "store").run("train", CONFIG, INPUTS, _slow_compute(log)))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert log.read_text().splitlines() == ["computed"]
    assert sorted(r.cached for r in results) == [False, True]
    assert len(StageStore(tmp_path / "store").executions()) == 1
