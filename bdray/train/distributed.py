"""Every training stage on Ray Train: DDP workers, per-epoch checkpoints, restart on failure.

``train_model`` builds a ``TorchTrainer`` whose workers all run :func:`_worker_loop`, the same epoch
loop as :func:`bdray.train.fit` (so a 1-worker run reproduces it), with:

- DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU); every global batch is
  split evenly across workers, so the averaged gradient equals a 1-worker step on the union;
- data either from memory (an ``ImageSet`` in the object store, each worker indexing its part) or
  from a Ray Data stream through ``get_dataset_shard`` when it does not fit in memory;
- a checkpoint every epoch (model as safetensors, optimizer/scheduler/epoch as plain tensors and
  numbers); a run created again with the same storage path and name resumes from it, and
  ``max_failures`` restarts a failed worker group from the last one;
- rank 0 alone logs epoch metrics, to one MLflow run the caller owns, so restarts do not add runs;
- bf16 autocast and channels_last when on GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from bdray.data.base import ImageSet
from bdray.models import ModelSpec, load_weights
from bdray.models.blocks import freeze_prefix
from bdray.models.io import save_weights
from bdray.train.loop import augment_generator, train_epoch, worker_batches
from bdray.train.recipe import TrainRecipe

T = TypeVar("T")


class Scaling(BaseModel):
    """How a training stage is spread over Ray Train workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_workers: int = Field(1, ge=0, description="0 runs the loop in the calling process (Ray Train local mode)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint")
    amp: bool = Field(True, description="bf16 autocast (GPU only)")
    channels_last: bool = Field(True, description="channels_last memory format (GPU only)")


@dataclass
class TrainResult:
    model_path: Path
    history: list[dict[str, float]]
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from_epoch: int = 0


def _worker_loop(cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg["threads"])))
    recipe = TrainRecipe.model_validate(cfg["recipe"])
    seed = int(cfg["seed"])
    device = ray.train.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")
    on_gpu = device.type == "cuda"

    torch.manual_seed(seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = ModelSpec(cfg["spec"]).build()
    if cfg.get("init_weights"):
        load_weights(model, cfg["init_weights"])
    if on_gpu and cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # Before DDP wraps it: DDP syncs the gradients of the parameters that require one when it is built.
    trainable = freeze_prefix(model, recipe.trainable_blocks)
    model = ray.train.torch.prepare_model(model)
    module = model.module if hasattr(model, "module") else model
    optimizer = recipe.make_optimizer(trainable)

    data = cfg.get("data")
    if data is not None:
        n = len(data)
        images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
        labels = (labels + recipe.label_shift) % data.num_classes
    else:
        n = int(cfg["num_rows"])
    scheduler = recipe.make_scheduler(optimizer, -(-n // recipe.batch_size))

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint is not None else None
        if directory is None and cfg.get("run_dir"):
            directory = latest_checkpoint(cfg["run_dir"])
        if directory is not None:
            load_weights(module, directory / "model.safetensors")
            state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"]) + 1
            history = json.loads((directory / "history.json").read_text())
        if directory is not None and start_epoch >= recipe.epochs:
            # A finished run created again: hand back its final checkpoint instead of an empty result.
            ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(str(directory))
                             if rank == 0 else None)
            return

    client = None
    if rank == 0 and cfg.get("mlflow_uri") and cfg.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=cfg["mlflow_uri"])

    crash = cfg.get("crash")
    for epoch in range(start_epoch, recipe.epochs):
        if data is not None:
            batches = (
                (images[i], labels[i])
                for i in worker_batches(n, recipe.batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world)
            )
        else:
            batches = _stream_batches(recipe, per_worker=max(1, recipe.batch_size // world),
                                      num_classes=int(cfg["num_classes"]))

        def on_step(step: int, epoch: int = epoch) -> None:
            # Test hook: die mid-epoch once, as a preempted or OOM-killed worker would.
            if crash and epoch == crash["epoch"] and step == crash["step"] and not os.path.exists(crash["marker"]):
                Path(crash["marker"]).write_text(str(os.getpid()))
                os._exit(1)

        started = time.perf_counter()
        stats = train_epoch(
            model, optimizer, scheduler, batches, recipe, generator=augment_generator(seed, epoch, rank),
            device=device, amp=on_gpu and cfg["amp"], channels_last=on_gpu and cfg["channels_last"], on_step=on_step,
        )
        totals = torch.tensor([stats.loss_sum, stats.correct, stats.seen], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch, "loss": float(totals[0] / totals[2]), "train_acc": float(totals[1] / totals[2]),
                   "epoch_seconds": seconds, "samples_per_s": float(totals[2]) / seconds}
        history.append(metrics)
        if client is not None:
            for key in ("loss", "train_acc", "samples_per_s"):
                client.log_metric(cfg["mlflow_run_id"], f"{cfg['metric_prefix']}{key}", metrics[key], step=epoch)
        if rank == 0:
            # Ray copies a reported checkpoint into the run's storage, except in local mode
            # (num_workers=0), which keeps a reference: there the folder must outlive the loop.
            keep = cfg.get("local_checkpoints")
            tmp = tempfile.mkdtemp(dir=keep) if keep else tempfile.mkdtemp()
            save_weights(module, Path(tmp) / "model.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch},
                       Path(tmp) / "train_state.pt")
            (Path(tmp) / "history.json").write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(metrics, checkpoint=None)


CHECKPOINT_FILES = ("model.safetensors", "train_state.pt", "history.json")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete epoch checkpoint under a run's folder, found by reading it.

    Ray Train registers a reported checkpoint when its controller next polls the workers; a worker
    killed in between leaves the checkpoint uploaded but unregistered, and the restarted group would
    begin again from epoch 0. Looking in the run's storage as well closes that gap.
    """
    best: tuple[int, Path] | None = None
    for directory in Path(run_dir).glob("**/train_state.pt"):
        directory = directory.parent
        if not all((directory / f).is_file() for f in CHECKPOINT_FILES):
            continue
        try:
            epoch = int(torch.load(directory / "train_state.pt", map_location="cpu", weights_only=True)["epoch"])
            json.loads((directory / "history.json").read_text())
        except Exception:  # a checkpoint cut off mid-upload: fall back to an older one
            continue
        if best is None or epoch > best[0]:
            best = (epoch, directory)
    return None if best is None else best[1]


def _stream_batches(recipe: TrainRecipe, *, per_worker: int, num_classes: int):
    """Batches from this worker's Ray Data shard: columns 'image' (uint8 C,H,W) and 'label'."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    for batch in shard.select_columns(["image", "label"]).iter_torch_batches(
        batch_size=per_worker, dtypes={"image": torch.uint8, "label": torch.int64}
    ):
        yield batch["image"], (batch["label"] + recipe.label_shift) % num_classes


def train_model(
    spec: ModelSpec,
    data: ImageSet | Any,
    recipe: TrainRecipe,
    *,
    seed: int,
    scaling: Scaling,
    storage_path: str | os.PathLike,
    name: str,
    out: str | os.PathLike,
    init_weights: str | os.PathLike | None = None,
    mlflow_uri: str | None = None,
    mlflow_run_id: str | None = None,
    metric_prefix: str = "",
    num_classes: int | None = None,
    crash: dict[str, Any] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train ``spec`` on ``data`` (an ImageSet, or a Ray Dataset with 'image'/'label') with Ray Train.

    The final weights are written to ``out/model.safetensors``. Calling again with the same
    ``storage_path`` and ``name`` resumes an interrupted run from its last epoch checkpoint;
    ``resume=False`` discards what an earlier run of that name left and starts from epoch 0.
    """
    import ray

    streaming = not isinstance(data, ImageSet)
    cfg: dict[str, Any] = {
        "spec": dict(spec), "recipe": recipe.model_dump(mode="json"), "seed": seed,
        "threads": scaling.cpus_per_worker, "use_gpu": scaling.use_gpu, "amp": scaling.amp,
        "channels_last": scaling.channels_last, "init_weights": str(init_weights) if init_weights else None,
        "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id, "metric_prefix": metric_prefix, "crash": crash,
    }
    if "://" not in str(storage_path):
        cfg["run_dir"] = str(Path(storage_path).resolve() / name)
        if not resume:
            shutil.rmtree(cfg["run_dir"], ignore_errors=True)
    if streaming:
        cfg["num_rows"] = data.count()
        cfg["num_classes"] = num_classes or spec["num_classes"]
    else:
        cfg["data"] = ray.put(data) if scaling.num_workers > 0 else data
    model_path, history, metrics = fit_trainer(
        _worker_loop_resolving, cfg, scaling=scaling, storage_path=storage_path, name=name, out=out,
        read=lambda directory: json.loads((directory / "history.json").read_text()),
        datasets={"train": data} if streaming else None,
    )
    return TrainResult(model_path, history, dict(metrics or history[-1]))


def fit_trainer(
    loop: Callable[[dict[str, Any]], None],
    cfg: dict[str, Any],
    *,
    scaling: Scaling,
    storage_path: str | os.PathLike,
    name: str,
    out: str | os.PathLike,
    read: Callable[[Path], T],
    datasets: dict[str, Any] | None = None,
) -> tuple[Path, T, dict[str, Any]]:
    """Run ``loop(cfg)`` under a TorchTrainer named ``name``; copy the final weights to ``out``.

    Returns ``out/model.safetensors``, ``read(checkpoint directory)`` and the last reported
    metrics. ``num_workers == 0`` runs the loop in the driver (``cfg["local_checkpoints"]`` is its
    scratch directory, removed afterwards); a local ``storage_path`` is made absolute because Ray
    Train resolves relative paths against each worker's directory.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    local = scaling.num_workers == 0
    if local:
        cfg["local_checkpoints"] = str(Path(storage_path) / name / "local_checkpoints")
        Path(cfg["local_checkpoints"]).mkdir(parents=True, exist_ok=True)
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=None if local else resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()) if "://" not in str(storage_path) else str(storage_path),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        shutil.copyfile(Path(directory) / "model.safetensors", out / "model.safetensors")
        value = read(Path(directory))
    if local:
        shutil.rmtree(cfg["local_checkpoints"], ignore_errors=True)
    return out / "model.safetensors", value, dict(result.metrics or {})


def _worker_loop_resolving(cfg: dict[str, Any]) -> None:
    import ray

    data = cfg.get("data")
    if isinstance(data, ray.ObjectRef):
        cfg = {**cfg, "data": ray.get(data)}
    _worker_loop(cfg)
