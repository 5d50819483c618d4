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
from bdray.train import TrainRecipe, fit, predict_proba


def seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000, help="inputs scored per timing")
    parser.add_argument("--clean", type=int, default=500, help="defender's clean images (fitting, not timed)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--width", type=int, default=16, help="compact CNN width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strip-n", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pair = get_dataset("synthetic", num_classes=10, image_size=args.image_size, train_size=2000,
                       test_size=args.inputs + args.clean, seed=0)
    spec = ModelSpec(name="compact_cnn", in_channels=1, num_classes=10, image_size=args.image_size,
                     kwargs={"width": args.width})
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
    scorers: dict[str, Callable[[np.ndarray], object]] = {name: d.score for name, d in detectors.items()}
    scorers["filter"] = screen
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
    print(f"{'':12s}{'ms / input':>12s}{'x forward of M':>16s}")
    print(f"{'forward M':12s}{forward_ms:12.4f}{1.0:16.2f}")
    for name in scorers:
        print(f"{name:12s}{per_input_ms[name]:12.4f}{ratios[name]:16.2f}")
    print(json.dumps({
        "bench": "detector_cost", "value": round(ratios["badexpert"], 3), "goal": 3.3, "better": "lower",
        **{k: round(v, 3) for k, v in ratios.items() if k != "badexpert"},
        "filter_throughput_vs_M": round(1 / ratios["filter"], 3), "filter_goal": 0.30,
        "forward_ms_per_input": round(forward_ms, 5), "inputs": len(images), "threads": args.threads,
        "strip_n": args.strip_n,
    }))


if __name__ == "__main__":
    main()
