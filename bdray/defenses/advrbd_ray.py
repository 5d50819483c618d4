"""AdvrBD's two heavy stages on Ray.

- :func:`score_with_ray_data`: Algorithm 1's scoring pass as a Ray Data ``map_batches`` over an
  actor pool, one model replica per actor (a GPU each when asked for). Each sample's mask and random
  start derive from (seed, sample index), so the scores equal the in-process ones whatever the
  blocks and actors.
- :func:`enhance_with_ray_train`: Algorithm 2 as a Ray Train worker loop (DDP when num_workers > 1).
  It runs :func:`bdray.defenses.advrbd.run_enhancement`, the same code as the in-process defense:
  rank 0 decides each round's assumed-clean set and broadcasts it, every round ends in a checkpoint
  (model + decisions so far), and a run created again with the same storage path and name resumes
  from the last finished round.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdray.data.base import ImageSet
from bdray.defenses.advrbd import (
    AdvrBDConfig,
    GroundTruth,
    PartitionConfig,
    RoundRecord,
    make_probe,
    partition_scores,
    run_enhancement,
)
from bdray.models import ModelSpec, load_weights, save_weights
from bdray.train.distributed import Scaling, fit_trainer

# -- Algorithm 1 on Ray Data ----------------------------------------------------------------------


class KLScorer:
    """One model replica in a Ray Data actor: scores a batch of (index, image) rows."""

    def __init__(self, spec: dict[str, Any], state: Any, config: dict[str, Any], seed: int,
                 threads: int = 1) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = ModelSpec(spec).build()
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        self.model.to(self.device).eval()
        self.config = PartitionConfig.model_validate(config)
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = partition_scores(self.model, batch["image"], self.config, seed=self.seed, index=batch["index"],
                                  device=self.device)
        return {"index": batch["index"], "score": scores}


def image_dataset(images: np.ndarray, index: np.ndarray | None = None, *, block_rows: int = 2048) -> Any:
    """A Ray Dataset of ('index', uint8 'image' (C, H, W)) rows; uint8 keeps the object store 4x lighter."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    index = np.arange(len(images)) if index is None else np.asarray(index)
    tables = [
        pa.table({"index": pa.array(index[s : s + block_rows]),
                  "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[s : s + block_rows]))})
        for s in range(0, len(images), block_rows)
    ]
    return ray.data.from_arrow(tables)


def score_with_ray_data(
    model: torch.nn.Module,
    spec: ModelSpec,
    images: np.ndarray,
    config: PartitionConfig,
    *,
    seed: int,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    use_gpu: bool = False,
    block_rows: int = 2048,
) -> np.ndarray:
    """Algorithm 1's scores for every image, computed by an actor pool of model replicas."""
    import ray

    # The weights go to the object store once; each replica's constructor gets only the reference, so a
    # restarted actor can still fetch them.
    state = ray.put({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    ds = image_dataset(images, block_rows=block_rows)
    scored = ds.map_batches(
        KLScorer,
        fn_constructor_kwargs={"spec": dict(spec), "state": state, "config": config.model_dump(mode="json"),
                               "seed": seed, "threads": max(1, int(cpus_per_actor))},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    out = np.full(len(images), np.nan, np.float32)
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        out[batch["index"]] = batch["score"]
    if np.isnan(out).any():
        raise RuntimeError(f"Ray Data scoring returned no score for {int(np.isnan(out).sum())} samples")
    return out


# -- Algorithm 2 on Ray Train ---------------------------------------------------------------------


def _share_from_rank_zero(obj: Any, rank: int) -> Any:
    """Rank 0's object on every worker: the object goes through the object store and only its
    reference through the broadcast (which is meant for < 1 kB)."""
    import ray
    from ray.train.collective import barrier, broadcast_from_rank_zero

    box = broadcast_from_rank_zero([ray.put(obj)] if rank == 0 else None)
    value = ray.get(box[0])
    barrier()  # rank 0 holds the reference until everyone has read it
    return value


def _save_records(directory: Path, records: list[RoundRecord], next_round: int, next_mask: np.ndarray) -> None:
    np.savez(
        directory / "rounds.npz",
        clean_masks=np.stack([np.packbits(r.clean_mask) for r in records]) if records else np.zeros((0, 0), np.uint8),
        fits=np.stack([np.packbits(r.fit) for r in records]) if records else np.zeros((0, 0), np.uint8),
        rounds=np.array([r.round for r in records], np.int64),
        next_mask=np.packbits(next_mask), next_round=np.int64(next_round), n=np.int64(len(next_mask)),
    )
    (directory / "stats.json").write_text(json.dumps([r.stats for r in records]))


def load_records(directory: str | os.PathLike) -> tuple[list[RoundRecord], int, np.ndarray]:
    """Rounds saved in an enhancement checkpoint, the next round and its assumed-clean set."""
    directory = Path(directory)
    saved = np.load(directory / "rounds.npz")
    n = int(saved["n"])
    stats = json.loads((directory / "stats.json").read_text())

    def unpack(row: np.ndarray) -> np.ndarray:
        return np.unpackbits(row, count=n).astype(bool)

    records = [RoundRecord(int(r), unpack(m), unpack(f), s)
               for r, m, f, s in zip(saved["rounds"], saved["clean_masks"], saved["fits"], stats, strict=True)]
    return records, int(saved["next_round"]), unpack(saved["next_mask"])


def _enhance_worker(cfg: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    for key in ("data", "truth"):
        if isinstance(cfg.get(key), ray.ObjectRef):
            cfg = {**cfg, key: ray.get(cfg[key])}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg["threads"])))
    device = ray.train.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")
    config: AdvrBDConfig = cfg["defense"]
    data: ImageSet = cfg["data"]
    seed = int(cfg["seed"])

    torch.manual_seed(seed + 1)  # the in-process defense seeds its enhancement the same way
    model = ModelSpec(cfg["spec"]).build()
    if config.enhance.init == "poisoned":
        load_weights(model, cfg["init_weights"])
    records: list[RoundRecord] = []
    start = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_weights(model, Path(directory) / "model.safetensors")
            records, next_round, next_mask = load_records(directory)
            start = (next_round, next_mask)
            if next_round >= config.enhance.rounds:
                # A finished run created again: hand back its last checkpoint.
                ray.train.report({"round": next_round - 1}, checkpoint=checkpoint if rank == 0 else None)
                return
    model = model.to(device)
    ddp = ray.train.torch.prepare_model(model)
    module = ddp.module if hasattr(ddp, "module") else ddp

    client = None
    if rank == 0 and cfg.get("mlflow_uri") and cfg.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=cfg["mlflow_uri"])

    trace = []

    def on_round(round_: int, record: RoundRecord | None, next_mask: np.ndarray) -> None:
        if cfg.get("trace_dir"):
            # Test hook: what this rank will unlearn next, to check every worker got the same set.
            trace.append(hashlib.sha256(np.packbits(next_mask).tobytes()).hexdigest())
            Path(cfg["trace_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(cfg["trace_dir"]) / f"rank{rank}.json").write_text(json.dumps(trace))
        metrics = {"round": round_}
        if rank != 0 or record is None:
            ray.train.report(metrics, checkpoint=None)
            return
        records.append(record)
        metrics.update(record.stats)
        if client is not None:
            for key, value in record.stats.items():
                client.log_metric(cfg["mlflow_run_id"], f"{cfg['metric_prefix']}{key}", float(value), step=round_)
        # Local mode keeps a reference to the reported folder instead of copying it: it must outlive us.
        keep = cfg.get("local_checkpoints")
        tmp = Path(tempfile.mkdtemp(dir=keep) if keep else tempfile.mkdtemp())
        save_weights(module, tmp / "model.safetensors")
        _save_records(tmp, records, round_ + 1, next_mask)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)

    def rescore(net: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
        return partition_scores(net, data.images[idx], config.partition, seed=seed, index=idx, device=device)

    truth = cfg.get("truth")
    probe = make_probe(truth, config.identify, device) if (rank == 0 and truth is not None) else None
    share = (lambda obj: obj) if world == 1 else (lambda obj: _share_from_rank_zero(obj, rank))
    run_enhancement(ddp, data, cfg["seed_mask"], cfg["scores"], config.enhance, seed=seed, device=device,
                    rank=rank, world_size=world, share=share, module=module, rescore=rescore, probe=probe,
                    on_round=on_round, start=start)


@dataclass
class EnhanceResult:
    model_path: Path
    records: list[RoundRecord]


def enhance_with_ray_train(
    spec: ModelSpec,
    data: ImageSet,
    config: AdvrBDConfig,
    *,
    init_weights: str | os.PathLike,
    scores: np.ndarray,
    seed_mask: np.ndarray,
    seed: int,
    scaling: Scaling,
    storage_path: str | os.PathLike,
    name: str,
    out: str | os.PathLike,
    truth: GroundTruth | None = None,
    mlflow_uri: str | None = None,
    mlflow_run_id: str | None = None,
    metric_prefix: str = "",
    resume: bool = True,
    trace_dir: str | os.PathLike | None = None,
) -> EnhanceResult:
    """Algorithm 2 on Ray Train; the enhanced model lands in ``out/model.safetensors``.

    ``truth`` (ground truth, for per-round metrics only) and the MLflow run are used by rank 0.
    """
    import ray

    storage = Path(storage_path).resolve()
    if not resume:
        shutil.rmtree(storage / name, ignore_errors=True)
    distributed = scaling.num_workers > 0
    cfg: dict[str, Any] = {
        # The validated object itself: advrbd+ keeps its class (and defaults) through pickling.
        "spec": dict(spec), "defense": config, "seed": seed,
        "threads": scaling.cpus_per_worker, "use_gpu": scaling.use_gpu, "init_weights": str(init_weights),
        "scores": scores, "seed_mask": seed_mask, "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id,
        "metric_prefix": metric_prefix, "trace_dir": str(trace_dir) if trace_dir else None,
        "data": ray.put(data) if distributed else data,
        "truth": (ray.put(truth) if distributed else truth) if truth is not None else None,
    }
    model_path, records, _ = fit_trainer(
        _enhance_worker, cfg, scaling=scaling, storage_path=storage, name=name, out=out,
        read=lambda directory: load_records(directory)[0],
    )
    return EnhanceResult(model_path, records)
