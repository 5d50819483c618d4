"""MLflow records through an explicit client: no process-global tracking URI or active run."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: config fields become dotted MLflow params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Tracker:
    """One MLflow experiment; ``run()`` opens a run that is always ended, FAILED on an exception."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = None
            if artifact_root is not None:
                location = str(Path(artifact_root).resolve() / experiment)
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    @contextlib.contextmanager
    def run(
        self, run_name: str | None = None, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None
    ) -> Iterator[RunLogger]:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        logger = RunLogger(self.client, run.info.run_id)
        try:
            yield logger
        except BaseException:
            self.client.set_terminated(run.info.run_id, status="FAILED")
            raise
        self.client.set_terminated(run.info.run_id, status="FINISHED")


class RunLogger:
    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            figure.savefig(target, dpi=110)
            self.client.log_artifact(self.run_id, str(target), artifact_path="plots")
        plt.close(figure)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)
