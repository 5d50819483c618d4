"""End to end on generated data: local Ray, a real sqlite MLflow store, the saved detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bdray.config import validate_config
from bdray.defenses import BaDExpert
from bdray.pipeline import run_experiment

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"auroc", "model_ca", "model_asr", "expert_ca", "expert_asr", "defended_ca", "defended_asr",
                "fpr", "threshold", "mlflow_run_id"}


def test_experiment_end_to_end_with_mlflow_and_stage_reuse(ray_session, smoke_config, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    config = validate_config(smoke_config)
    out = tmp_path / "out"
    lines: list[str] = []
    summary = run_experiment(config, out=out, progress=lines.append)

    written = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= written.keys()
    assert written["mlflow_run_id"] == summary["mlflow_run_id"]
    # The smoke model learns both the task and the patch; the detector must beat chance clearly.
    assert summary["model_ca"] > 0.8 and summary["model_asr"] > 0.8
    assert summary["auroc"] > 0.8
    assert summary["defended_asr"] < summary["model_asr"]

    client = MlflowClient(tracking_uri=config.tracking_uri())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["defense.eta"] == "0.001"
    assert run.data.params["attack.name"] == "badnet"
    assert run.data.tags["dataset"] == "synthetic"
    assert np.isclose(run.data.metrics["auroc"], summary["auroc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "detector"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"roc.png", "score_histogram.png", "confidence_plane.png", "trigger_preview.png"}

    # One child run per training stage, each finished, with its per-epoch metrics.
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(c.data.tags["stage"] for c in children) == ["auxiliary", "expert", "train"]
    assert all(c.info.status == "FINISHED" for c in children)
    train_run = next(c for c in children if c.data.tags["stage"] == "train")
    steps = [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")]
    assert sorted(steps) == list(range(config.train.epochs))

    # The saved detector reloads (no pickle) and scores exactly as the run did.
    detector = BaDExpert.load(out / "detector")
    assert detector.threshold_ == pytest.approx(summary["threshold"])
    # ... and deploys as a filter with the detector's own verdicts (its content hash checked on load).
    from bdray.detect import Filter

    images = np.zeros((2, *Filter.load(out / "detector").image_shape), np.uint8)
    np.testing.assert_array_equal(Filter.load(out / "detector")(images).reject, detector.reject(images))

    # Same config again: every stage is found in the store, nothing is retrained.
    untracked = config.model_copy(update={"tracking": config.tracking.model_copy(update={"enabled": False})})
    again = run_experiment(untracked, progress=lines.append)
    assert again["stage_keys"] == summary["stage_keys"]
    assert again["auroc"] == pytest.approx(summary["auroc"])
    from bdray.stages import StageStore

    executions = StageStore(Path(config.storage).resolve() / "stages").executions()
    assert sorted(r["stage"] for r in executions) == ["auxiliary", "expert", "poison", "predict", "predict",
                                                       "predict", "train"]


def test_needs_model_attack_gets_a_trigger_stage_keyed_by_the_model(ray_session, smoke_config) -> None:
    from bdray.stages import StageStore

    # BaDExpert-Adap: BadNet poisoning, then a test-time trigger optimized against the trained M.
    smoke_config["attack"] = {"name": "badexpert_adap", "poison_rate": 0.1, "target": 0, "patch_size": 3,
                              "steps": 40, "batch_size": 64, "attacker_samples": 300, "eta": 1e-3,
                              "lambda_1": 3.0, "lambda_2": 0.001}
    smoke_config["tracking"] = {"enabled": False}
    config = validate_config(smoke_config)
    summary = run_experiment(config, progress=lambda _: None)
    keys = summary["stage_keys"]
    store = Path(config.storage).resolve() / "stages"
    assert (store / "trigger" / keys["trigger"] / "attack.safetensors").exists()
    # prepare's own report travels into the summary (and so into MLflow)
    assert 0 <= summary["trigger_adaptive_asr_model"] <= 1 and summary["trigger_mask_l1"] > 0

    # Another lambda_1: the poisoned set and M are reused, only the trigger and what it feeds are new.
    again = run_experiment(config.model_copy(update={"attack": config.attack.model_copy(update={"lambda_1": 0.0})}),
                           progress=lambda _: None)
    assert again["stage_keys"]["train"] == keys["train"] and again["stage_keys"]["poison"] == keys["poison"]
    assert again["stage_keys"]["trigger"] != keys["trigger"]
    assert again["stage_keys"]["expert"] == keys["expert"]  # B and M' depend on M only
    # the test inputs were triggered with each run's own trigger
    assert again["trigger_mask_l1"] != summary["trigger_mask_l1"] and again["auroc"] != summary["auroc"]
    stages = [r["stage"] for r in StageStore(store).executions()]
    assert stages.count("train") == 1 and stages.count("poison") == 1 and stages.count("trigger") == 2
