"""Ray Train path: local mode reproduces ``fit``, 2-worker DDP averages like one worker, a killed
worker group resumes from its last epoch checkpoint with one MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bdray.data import get_dataset
from bdray.data.base import ImageSet
from bdray.models import ModelSpec
from bdray.train import TrainRecipe, fit
from bdray.train.distributed import Scaling, train_model
from bdray.train.loop import worker_batches


def spec(name: str = "compact_cnn", **kwargs) -> ModelSpec:
    return ModelSpec(name=name, in_channels=1, num_classes=4, image_size=16, mean=[0.5], std=[0.25], kwargs=kwargs)


@pytest.fixture(scope="module")
def tiny() -> ImageSet:
    return get_dataset("synthetic", image_size=16, train_size=128, test_size=40, num_classes=4).train


def fit_weights(model_spec: ModelSpec, data: ImageSet, recipe: TrainRecipe, seed: int) -> dict[str, torch.Tensor]:
    """The plain in-process loop, seeded as a Ray Train worker seeds itself."""
    torch.manual_seed(seed)
    model = fit(model_spec.build(), data, recipe, seed=seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_worker_shards_are_disjoint_and_cover_each_global_batch() -> None:
    one = list(worker_batches(50, 16, seed=3, epoch=1))
    two = [list(worker_batches(50, 16, seed=3, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert len(two[0]) == len(two[1]) == len(one)
    for batch, a, b in zip(one, *two, strict=True):
        assert not set(a.tolist()) & set(b.tolist())
        assert sorted(a.tolist() + b.tolist()) == sorted(batch.tolist())


def test_local_mode_is_bit_identical_to_fit(ray_session, tiny, tmp_path: Path, one_thread) -> None:
    recipe = TrainRecipe(epochs=2, batch_size=32, lr=0.05)
    result = train_model(spec(width=4), tiny, recipe, seed=5, scaling=Scaling(num_workers=0),
                         storage_path=tmp_path / "ray", name="local", out=tmp_path / "out")
    got = load_file(str(result.model_path))
    want = fit_weights(spec(width=4), tiny, recipe, seed=5)
    assert [h["epoch"] for h in result.history] == [0, 1]
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.slow
def test_two_gloo_workers_average_gradients_like_one(ray_session, tiny, tmp_path: Path) -> None:
    # One SGD step of lr 1 over one global batch: the weight change is exactly minus the averaged
    # gradient. Each worker holds half the batch (disjoint halves); DDP's all-reduce must give the
    # gradient of the union. An MLP has no BatchNorm, whose per-worker statistics would differ.
    recipe = TrainRecipe(epochs=1, batch_size=len(tiny), lr=1.0, momentum=0.0, weight_decay=0.0)
    mlp = spec("mlp")
    result = train_model(mlp, tiny, recipe, seed=1, scaling=Scaling(num_workers=2),
                         storage_path=tmp_path / "ray", name="ddp", out=tmp_path / "out")
    torch.manual_seed(1)
    initial = {k: v.clone() for k, v in mlp.build().state_dict().items()}
    two = load_file(str(result.model_path))
    one = fit_weights(mlp, tiny, recipe, seed=1)
    for key in one:
        step_one, step_two = one[key] - initial[key], two[key] - initial[key]
        if not step_one.is_floating_point():
            continue
        assert step_one.abs().max() > 0 or key in ("mean", "std"), key
        torch.testing.assert_close(step_two, step_one, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(ray_session, tiny, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from bdray.tracking import Tracker

    recipe = TrainRecipe(epochs=3, batch_size=32, lr=0.05)
    marker = tmp_path / "crashed"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "fault", artifact_root=tmp_path / "artifacts")
    with tracker.run("train", tags={"stage": "train"}) as run:
        result = train_model(
            spec(width=4), tiny, recipe, seed=2, scaling=Scaling(num_workers=1, max_failures=1),
            storage_path=tmp_path / "ray", name="fault", out=tmp_path / "out",
            mlflow_uri=uri, mlflow_run_id=run.run_id,
            crash={"epoch": 1, "step": 2, "marker": str(marker)},  # dies mid-way through the 2nd epoch
        )
    assert marker.exists(), "the test hook never killed the worker"
    assert [h["epoch"] for h in result.history] == [0, 1, 2]

    client = MlflowClient(uri)
    runs = client.search_runs([tracker.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # Epoch 0 came from the checkpoint, not from a second pass: each epoch is logged exactly once.
    steps = sorted(m.step for m in client.get_metric_history(run.run_id, "loss"))
    assert steps == [0, 1, 2]

    # Resuming restores weights, optimizer and schedule: the result equals an uninterrupted run.
    torch.set_num_threads(1)
    want = fit_weights(spec(width=4), tiny, recipe, seed=2)
    got = load_file(str(result.model_path))
    for key, value in want.items():
        np.testing.assert_allclose(got[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_streams_a_ray_dataset_through_get_dataset_shard(ray_session, tiny, tmp_path: Path) -> None:
    # Data that does not fit in memory arrives as a Ray Dataset ('image' uint8 C,H,W, 'label').
    import ray.data

    ds = ray.data.from_items([{"image": img, "label": int(y)} for img, y in zip(tiny.images, tiny.labels, strict=True)])
    recipe = TrainRecipe(epochs=3, batch_size=32, lr=0.05)
    result = train_model(spec(width=4), ds, recipe, seed=0, scaling=Scaling(num_workers=0),
                         storage_path=tmp_path / "ray", name="stream", out=tmp_path / "out", num_classes=4)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    seen = [h["samples_per_s"] * h["epoch_seconds"] for h in result.history]
    assert seen == pytest.approx([len(tiny)] * 3)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
