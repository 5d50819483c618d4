"""The jobs/ entry points without a cluster: the environment becomes overrides, a defense picks its
workflow, config errors exit 2 with one line per field, a poison job leaves its stage artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdray import workflows
from bdray.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch):
    """jobs/ on sys.path, as when a job runs as `python jobs/<name>.py`."""
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import _common

    return _common


def test_the_environment_becomes_overrides() -> None:
    assert workflows.environment_overrides({}) == []
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.bdray.svc.cluster.local:5000", "BDRAY_STORAGE": "file:///mnt/bdray"}
    assert workflows.environment_overrides(env) == [
        'tracking.uri="http://mlflow.bdray.svc.cluster.local:5000"', 'storage="/mnt/bdray"']
    assert workflows.environment_overrides({"BDRAY_STORAGE": "/mnt/x"}, "overrides.") == ['overrides.storage="/mnt/x"']


def test_object_store_storage_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"s3:// storage is not supported; mount it on every node"):
        workflows.environment_overrides({"BDRAY_STORAGE": "s3://bucket/bdray"})
    with pytest.raises(ConfigError, match="gs:// storage"):
        workflows.load_experiment(SMOKE, ["storage=gs://bucket/x"])


def test_a_ray_job_needs_an_absolute_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(workflows.RAY_JOB_ENV, "{}")
    with pytest.raises(ConfigError, match=r"storage: '\.bdray' is relative, and this Ray job runs in a temporary"):
        workflows.load_experiment(SMOKE)
    assert workflows.load_experiment(SMOKE, ["storage=/mnt/bdray"]).storage == "/mnt/bdray"


def test_environment_then_command_line(jobs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("BDRAY_STORAGE", str(tmp_path / "env"))
    args = jobs.job_parser("x").parse_args(["--config", str(SMOKE), "--set", f"storage={tmp_path / 'cli'}"])
    config = workflows.load_experiment(args.config, jobs.overrides(args))
    assert config.tracking_uri() == "http://127.0.0.1:5000"
    assert config.storage == str(tmp_path / "cli")  # an explicit --set wins over the environment

    sweep = workflows.load_sweep_config(ROOT / "configs" / "sweeps" / "smoke_eta.yaml", jobs.overrides(
        jobs.job_parser("x").parse_args(["--config", "unused"]), prefix="overrides."))
    assert sweep.base_raw["storage"] == str(tmp_path / "env")
    assert sweep.base_raw["tracking"]["uri"] == "http://127.0.0.1:5000"


def test_the_config_picks_the_defense_workflow() -> None:
    name, workflow = workflows.defense_workflow(SMOKE)
    assert name == "badexpert" and workflow.function("run").__name__ == "run_experiment"
    with pytest.raises(ConfigError,
                       match=r"defense\.name: unknown defense 'nope'; jobs/defend\.py runs: abl, advrbd, "):
        workflows.defense_workflow(SMOKE, ["defense.name=nope"])
    # Validation is the defense's own: a BaDExpert field error reads as from `bdray validate`.
    with pytest.raises(ConfigError, match=r"attack\.poison_rate: Input should be less than 1 \(got 1\.5\)"):
        workflows.load_defended(SMOKE, ["attack.poison_rate=1.5"])


def test_advrbd_configs_go_to_the_advrbd_workflow() -> None:
    workflow, config = workflows.load_defended(ROOT / "configs" / "advrbd_smoke.yaml", ["defense.name=advrbd+"])
    assert type(config).__name__ == "AdvrBDExperiment" and config.defense.name == "advrbd+"
    assert workflow.function("run").__name__ == "run_advrbd"
    # so do the baselines AdvrBD is compared with
    workflow, config = workflows.load_defended(ROOT / "configs" / "advrbd_smoke.yaml", ["defense={name: abl}"])
    assert config.defense.name == "abl" and workflow.function("run").__name__ == "run_advrbd"


def test_a_config_error_exits_2_with_one_line_per_field(jobs, capsys: pytest.CaptureFixture) -> None:
    def main() -> int:
        workflows.load_experiment(SMOKE, ["attack.poison_rate=1.5", "train.epochs=0"])
        return 0

    with pytest.raises(SystemExit) as exit_info:
        jobs.run_job(main)
    assert exit_info.value.code == jobs.EXIT_CONFIG
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {SMOKE}: ") for line in lines)
    assert "attack.poison_rate" in lines[0] + lines[1] and "train.epochs" in lines[0] + lines[1]


def test_sigterm_unwinds_so_open_runs_are_ended(jobs) -> None:
    with pytest.raises(SystemExit) as exit_info:
        jobs._terminate(15, None)
    assert exit_info.value.code == 143


def test_poison_job_writes_the_stage_artifact(jobs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import poison

    storage = tmp_path / "store"
    code = poison.main(["--config", str(SMOKE), "--set", f"storage={storage}", "--set", "tracking.enabled=false"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not result["cached"] and result["num_poisoned"] == 100 and result["num_samples"] == 1000
    assert Path(result["path"]) == storage / "stages" / "poison" / result["key"]
    assert (Path(result["path"]) / "_SUCCESS").is_file() and (Path(result["path"]) / "plan.npz").is_file()
    poison.main(["--config", str(SMOKE), "--set", f"storage={storage}", "--set", "tracking.enabled=false"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["cached"] and again["key"] == result["key"]


def test_train_refuses_a_given_checkpoint() -> None:
    config = workflows.load_experiment(SMOKE, ["model.checkpoint=suspect.safetensors"])
    with pytest.raises(ConfigError, match="model.checkpoint: a given suspect model is not trained"):
        workflows.train(config)
