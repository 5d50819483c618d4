"""Per-input cost of each detector's ``score`` relative to one forward pass of the suspect model M.

All detectors are fitted first (not timed), then each ``score`` over the same batch is timed right
after a plain forward pass of M over that batch (``predict_proba``), with the same thread count, so
machine noise hits both sides of every ratio alike; the reported ratio is the median over repeats.
BaDExpert needs three forward passes (M, B, M'), so its goal is 3.3x; STRIP with N = 100 costs
about 100x by design. B and M' are copies of M here: their cost does not depend on their weights.

    python bench/detector_cost.py                                   # compact CNN, 28x28, 2000 inputs, 1 thread
    python bench/detector_cost.py --threads 2 --strip-n 50 --repeats 5

The deployable filter (``bdray.detect.Filter``: M, B and M' on one batch, labels and verdicts out) is
timed the same way; its throughput against M alone is ``filter_throughput_vs_M`` (goal >= 0.30).
So is the filter over shared-prefix experts (``defense.trainable_blocks = k``: B and M' keep M's first
blocks, which run once per batch): ``filter_shared`` (x forward of M), its throughput against M and
against the plain filter, and its FLOPs against M's (``filter_shared_flops_vs_M``: 1 + 2 x the last
k blocks' share of M's FLOPs, where three full passes cost 3).

    python bench/detector_cost.py --trainable-blocks 1                # only the heads differ

Ends with one JSON line: {"bench": "detector_cost", "value": BaDExpert's ratio, "goal": 3.3, ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from bdray.data import get_dataset
from bdray.defenses import BaDExpert, BaDExpertConfig, Detector, defense_class
from bdray.detect import Filter
from bdray.models import ModelSpec
from bdray.models.blocks import num_blocks, shared_pass_cost
from bdray.train import TrainRecipe, fit, predict_proba


def seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000, help="inputs scored per timing")
    parser.add_argument("--clean", type=int, default=500, help="defender's clean images (fitting, not timed)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--width", type=int, default=16, help="compact CNN width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strip-n", type=int, default=100)
    parser.add_argument("--trainable-blocks", type=int, default=2,
                        help="k of the shared-prefix filter: B and M' differ from M in their last k blocks")
    parser.add_argument("--train-size", type=int, default=2000, help="images M is trained on (not timed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pair = get_dataset("synthetic", num_classes=10, image_size=args.image_size, train_size=args.train_size,
                       test_size=args.inputs + args.clean, seed=0)
    spec = ModelSpec(name="compact_cnn", in_channels=1, num_classes=10, image_size=args.image_size,
                     kwargs={"width": args.width})
    blocks = num_blocks(spec.build())
    if not 1 <= args.trainable_blocks < blocks:
        parser.error(f"--trainable-blocks must be in 1..{blocks - 1}: the compact CNN has {blocks} blocks, "
                     f"and k = {blocks} leaves no prefix to share")
    torch.manual_seed(0)
    # One short epoch so predictions (and AC's clusters) look like a trained model's.
    model = fit(spec.build(), pair.train, TrainRecipe(epochs=1, batch_size=128, lr=0.05), seed=0).eval()
    clean = pair.test.subset(np.arange(args.clean))
    images = pair.test.images[args.clean :]

    badexpert = BaDExpert(BaDExpertConfig(name="badexpert"))
    badexpert.set_models(model, copy.deepcopy(model), copy.deepcopy(model))
    detectors: dict[str, Detector] = {"badexpert": badexpert}
    settings = {"strip": {"n": args.strip_n}, "scale_up": {}, "ac": {}, "frequency": {}}
    for name, extra in settings.items():
        cls = defense_class(name)
        detectors[name] = cls(cls.Config.model_validate({"name": name, **extra})).fit(model, clean, seed=0)

    # The deployable filter (bdray.detect): M, B and M' in one pass per batch, labels + verdicts out.
    screen = Filter(model, copy.deepcopy(model), copy.deepcopy(model), gamma=0.5, threshold=0.0,
                    image_shape=images.shape[1:], device="cpu", batch_size=1000)
    # The same with shared-prefix experts: copies of M share every block, the filter checks and runs the
    # first (n - k) blocks once. Costs do not depend on the weights, so copies time what trained ones would.
    k = args.trainable_blocks
    shared = Filter(model, copy.deepcopy(model), copy.deepcopy(model), gamma=0.5, threshold=0.0,
                    image_shape=images.shape[1:], device="cpu", batch_size=1000, trainable_blocks=k)
    assert shared.shared_blocks == blocks - k  # copies of M: the filter found the prefix identical
    scorers: dict[str, Callable[[np.ndarray], object]] = {name: d.score for name, d in detectors.items()}
    scorers["filter"] = screen
    scorers["filter_shared"] = shared
    forward = lambda: predict_proba(model, images)  # noqa: E731
    forward()  # warm-up: first-call allocations are not part of either side
    ratios: dict[str, float] = {}
    per_input_ms: dict[str, float] = {}
    base_ms = []
    for name, score in scorers.items():
        score(images[:50])
        rs, ds = [], []
        for _ in range(args.repeats):
            ref = seconds(forward)
            det = seconds(lambda f=score: f(images))
            rs.append(det / ref)
            ds.append(det)
            base_ms.append(ref)
        ratios[name] = statistics.median(rs)
        per_input_ms[name] = 1000 * statistics.median(ds) / len(images)

    forward_ms = 1000 * statistics.median(base_ms) / len(images)
    print(f"compact CNN width {args.width}, {args.image_size}x{args.image_size}, {len(images)} inputs, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'':14s}{'ms / input':>10s}{'x forward of M':>16s}")
    print(f"{'forward M':14s}{forward_ms:10.4f}{1.0:16.2f}")
    for name in scorers:
        print(f"{name:14s}{per_input_ms[name]:10.4f}{ratios[name]:16.2f}")
    flops = shared_pass_cost(model, k, images.shape[1:])
    print(f"filter_shared: the last {k} of {blocks} blocks differ; FLOPs {flops:.2f}x M's (3.00 unshared)")
    result = {
        "bench": "detector_cost", "value": round(ratios["badexpert"], 3), "goal": 3.3, "better": "lower",
        **{name: round(v, 3) for name, v in ratios.items() if name != "badexpert"},
        "filter_throughput_vs_M": round(1 / ratios["filter"], 3), "filter_goal": 0.30,
        "filter_shared_throughput_vs_M": round(1 / ratios["filter_shared"], 3),
        "filter_shared_speedup_vs_filter": round(ratios["filter"] / ratios["filter_shared"], 3),
        "filter_shared_flops_vs_M": round(flops, 3), "trainable_blocks": k, "blocks": blocks,
        "forward_ms_per_input": round(forward_ms, 5), "inputs": len(images), "threads": args.threads,
        "strip_n": args.strip_n,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
