"""Sweeps: bad sweep configs fail before any trial; a real Tune sweep nests trial runs in MLflow,
shares stages between trials, and resumes after an interruption without rerunning finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bdray.cli import main
from bdray.config import ConfigError
from bdray.tune import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SWEEP = ROOT / "configs" / "sweeps" / "smoke_eta.yaml"


def write_sweep(tmp_path: Path, storage: str | None = None, **changes) -> Path:
    raw = yaml.safe_load(SMOKE_SWEEP.read_text())
    raw["base"] = str(ROOT / "configs" / "smoke.yaml")
    raw.setdefault("overrides", {})["storage"] = storage or str(tmp_path / "store")
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_sweeps_validate() -> None:
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.num_trials >= 2, path
    assert load_sweep(ROOT / "configs" / "sweeps" / "table9_eta.yaml").num_trials == 7 * 2 * 3


@pytest.mark.parametrize(("change", "field"), [
    ({"space": {"defense.etaa": {"grid": [1e-3]}}}, "space.defense.etaa"),
    ({"space": {"defense.eta": {"grid": []}}}, "space.defense.eta"),
    ({"space": {"defense.eta": {"grid": [1e-3, -1.0]}}}, "space.defense.eta=-1.0"),
    ({"space": {"defense.eta": {"loguniform": [0, 1]}}}, "space.defense.eta"),
    ({"space": {}}, "space"),
    ({"resources": {"cpu": -1}}, "resources.cpu"),
    ({"resources": {"cpu": 1, "gpu": -0.5}}, "resources.gpu"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_sweep_configs_are_refused_before_any_trial(tmp_path: Path, capsys, change, field) -> None:
    path = write_sweep(tmp_path, **change)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert any(loc.startswith(field) for loc, _ in info.value.errors), info.value.errors
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err
    assert not (tmp_path / "store").exists(), "nothing may be written for a refused sweep"


def wait_for_session_exit(sid: int, timeout: float = 60) -> None:
    """Ray's workers outlive a killed driver for a moment: wait until no live process of the session is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append(stat.parent.name)
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes of the killed sweep still alive: {alive}")


def executions(store: Path) -> Counter:
    log = store / "stages" / "executions.jsonl"
    return Counter(json.loads(line)["stage"] for line in log.read_text().splitlines()) if log.exists() else Counter()


@pytest.mark.slow
def test_sweep_nests_trials_reuses_stages_and_resumes(ray_session, tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from bdray.report import write_report
    from bdray.tune import run_sweep

    etas = [5e-4, 1e-3, 2e-3]
    # A relative storage, as the shipped configs have it: it means the folder the sweep is started in,
    # for the trials (which run in Tune's actors, elsewhere) as much as for the driver.
    path = write_sweep(tmp_path, storage="store", space={"defense.eta": {"grid": etas}, "seed": {"grid": [0]}})
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    # First attempt in a separate process, killed (process group) once its first trial has finished.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # the test's own Ray exports it; the first attempt gets a Ray of its own
    proc = subprocess.Popen([sys.executable, "-m", "bdray.cli", "sweep", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ledger = next(iter(store.glob("sweeps/*/trials")), None)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            ledger = next(iter(store.glob("sweeps/*/trials")), None)
            if ledger is not None and any(ledger.glob("*.json")):
                break
            time.sleep(0.2)
        assert ledger is not None and any(ledger.glob("*.json")), proc.stdout.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for_session_exit(proc.pid)
    finished_first = {p.stem for p in ledger.glob("*.json")}
    assert 1 <= len(finished_first) < len(etas), "the sweep was meant to be interrupted part-way"
    before = executions(store)

    sweep = load_sweep(path)
    result = run_sweep(sweep, progress=lambda _: None)
    after = executions(store)

    assert len(result["trials"]) == len(etas)
    skipped = [t for t in result["trials"] if t["skipped"]]
    assert len(skipped) == len(finished_first), "trials finished before the interruption must not run again"
    # Each stage ran once over both attempts: every further eta trained only its own expert.
    # Predictions of M and M' are shared too; only each new expert B is scored afresh.
    assert after == Counter({"poison": 1, "train": 1, "auxiliary": 1, "expert": len(etas),
                             "predict": 2 + len(etas)}), (before, after)

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke-eta")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`bdray.sweep_key` != ''")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"))
    trial_runs = [r for r in trials if r.data.tags.get("bdray.trial") == "1" and r.info.status == "FINISHED"]
    # One finished run per trial: none was run twice.
    assert sorted(float(r.data.params["defense.eta"]) for r in trial_runs) == etas
    assert len({r.data.tags["bdray.trial_key"] for r in trial_runs}) == len(trial_runs) == len(etas)

    report = write_report("smoke-eta", uri, tmp_path / "report", x="defense.eta")
    assert report["trials"] == len(etas) and len(report["rows"]) == len(etas)
    assert (tmp_path / "report" / "report.md").read_text().count("\n| ") >= 3
    assert (tmp_path / "report" / "auroc_vs_defense_eta.png").stat().st_size > 0


def test_a_stage_that_can_never_be_scheduled_is_refused(smoke_config) -> None:
    from bdray.config import validate_config
    from bdray.pipeline import check_resources

    smoke_config["ray"] = {"train": {"num_workers": 1, "cpus_per_worker": 2}}
    config = validate_config(smoke_config)
    check_resources(config, 2.0)  # fits alone
    with pytest.raises(ValueError, match=r"ray\.train asks for 2 CPUs .* plus 0\.01 held by running sweep trials"):
        check_resources(config, 2.0, reserved=0.01)
