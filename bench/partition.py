"""AdvrBD's partition scoring (Algorithm 1): batched PGD against the paper's one-sample-at-a-time loop.

Both score with the same kernel (:func:`bdray.defenses.advrbd.partition_scores`), the same trained
model and the same per-sample masks and random starts; only the batch size differs, and the scores
of the samples both scored are checked to agree. Prints samples/s of each and ends with one JSON line.

    .venv/bin/python bench/partition.py                      # Fashion-MNIST, compact CNN, CPU or GPU
    .venv/bin/python bench/partition.py --model resnet18_cifar --batched 4096 --loop 200
    .venv/bin/python bench/partition.py --ray 2              # also time the Ray Data actor pool (2 replicas)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from bdray.data import DatasetNotFoundError, get_dataset
from bdray.defenses.advrbd import PartitionConfig, partition_scores, partition_scores_loop
from bdray.models import ModelSpec
from bdray.train import TrainRecipe, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="compact_cnn")
    parser.add_argument("--train", type=int, default=5000, help="images the model is trained on (1 epoch)")
    parser.add_argument("--batched", type=int, default=4000, help="images scored by the batched pass")
    parser.add_argument("--loop", type=int, default=300, help="images scored one at a time")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--radius", type=int, default=4)
    parser.add_argument("--ray", type=int, default=0, help="also score with a Ray Data pool of this many replicas")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pair = get_dataset("fashion_mnist")
        dataset = "fashion_mnist"
    except DatasetNotFoundError:
        pair = get_dataset("synthetic", train_size=args.train + args.batched, test_size=10)
        dataset = "synthetic"
    data = pair.train
    c, h, _ = data.image_shape
    spec = ModelSpec(name=args.model, in_channels=c, num_classes=data.num_classes, image_size=h,
                     mean=list(data.mean), std=list(data.std))
    torch.manual_seed(0)
    model = fit(spec.build(), data.subset(np.arange(args.train)), TrainRecipe(epochs=1), seed=0, device=device)
    images = data.images[args.train : args.train + args.batched]
    config = PartitionConfig(eps=args.eps, radius=args.radius, steps=args.steps, batch_size=args.batch_size)
    index = np.arange(len(images))

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    # Warm-up (allocator, cuDNN autotuning, thread pools) outside the timings.
    partition_scores(model, images[: args.batch_size], config, seed=0, device=device)
    partition_scores_loop(model, images[:5], config, seed=0, device=device)

    batched, t_batched = timed(lambda: partition_scores(model, images, config, seed=0, index=index, device=device))
    n_loop = min(args.loop, len(images))
    loop, t_loop = timed(lambda: partition_scores_loop(model, images[:n_loop], config, seed=0, index=index[:n_loop],
                                                       device=device))
    # bf16 autocast on GPU makes batch composition matter a little; on CPU the two agree to float error.
    agree = float(np.max(np.abs(batched[:n_loop] - loop) / np.maximum(np.abs(loop), 1e-3)))
    batched_rate, loop_rate = len(images) / t_batched, n_loop / t_loop
    ratio = batched_rate / loop_rate

    ray_rate = None
    if args.ray:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from bdray.defenses.advrbd_ray import score_with_ray_data

        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        use_gpu = device.type == "cuda"
        cpus = max(1, (os.cpu_count() or 2) // args.ray)
        score_with_ray_data(model, spec, images[:256], config, seed=0, num_actors=args.ray, cpus_per_actor=cpus,
                            use_gpu=use_gpu)
        _, t_ray = timed(lambda: score_with_ray_data(model, spec, images, config, seed=0, num_actors=args.ray,
                                                          cpus_per_actor=cpus, use_gpu=use_gpu))
        ray_rate = len(images) / t_ray
        ray.shutdown()

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"{dataset}, {args.model}, PGD {args.steps} steps, eps {args.eps}, radius {args.radius}, on {name}")
    print(f"  per-sample loop (paper):  {loop_rate:10.1f} samples/s  ({n_loop} samples, {t_loop:.2f}s)")
    print(f"  batched ({args.batch_size:5d}):         {batched_rate:10.1f} samples/s  ({len(images)} samples, "
          f"{t_batched:.2f}s)")
    if ray_rate is not None:
        print(f"  Ray Data, {args.ray} replica(s):    {ray_rate:10.1f} samples/s")
    print(f"  speed-up {ratio:.1f}x; largest relative score difference on shared samples {agree:.2e}")
    print(json.dumps({
        "bench": "partition", "value": round(ratio, 2), "goal": 20, "better": "higher", "unit": "x",
        "device": device.type, "device_name": name, "model": args.model, "dataset": dataset,
        "batched_samples_per_s": round(batched_rate, 1), "loop_samples_per_s": round(loop_rate, 1),
        "ray_samples_per_s": None if ray_rate is None else round(ray_rate, 1), "batch_size": args.batch_size,
        "steps": args.steps, "max_rel_diff": agree,
    }))


if __name__ == "__main__":
    main()
