"""Stage reuse in sweeps: wall time of an 8-point eta sweep with reuse against the same sweep without.

With reuse, the poisoned set, the backdoored model M, the auxiliary model M' and their predictions
are computed once and every eta trains and scores only its own expert B; without it, each trial
recomputes everything. Both arms run here, one after the other, each on a fresh storage folder.

    python bench/sweep_reuse.py                         # the quickstart experiment (Fashion-MNIST)
    python bench/sweep_reuse.py --base configs/smoke.yaml --points 4    # seconds, generated data

Ends with one JSON line: {"bench": "sweep_reuse", "value": with/without, "goal": 0.3, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from bdray.tune import load_sweep, run_sweep


def stage_counts(storage: Path) -> dict[str, int]:
    log = storage / "stages" / "executions.jsonl"
    return dict(Counter(json.loads(line)["stage"] for line in log.read_text().splitlines()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="configs/quickstart.yaml", help="experiment config swept over eta")
    parser.add_argument("--points", type=int, default=8, help="eta values, log-spaced over 5e-5..5e-3")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="sweep overrides, e.g. overrides.data.train_subset=20000")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    etas = [float(f"{v:.3g}") for v in np.geomspace(5e-5, 5e-3, args.points)]
    walls, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        # One Ray for both arms: its start-up is not what is measured.
        # +1 logical CPU for the waiting trial driver, as `bdray sweep` gives a local Ray.
        ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        for arm, reuse in (("with_reuse", True), ("without_reuse", False)):
            storage = Path(tmp) / arm
            sweep_file = Path(tmp) / f"{arm}.yaml"
            sweep_file.write_text(yaml.safe_dump({
                "name": f"bench-{arm}", "base": str(Path(args.base).resolve()),
                "overrides": {"storage": str(storage)},
                "space": {"defense.eta": {"grid": etas}}, "reuse_stages": reuse,
                "max_concurrent_trials": 1, "resources": {"cpu": 0.01},
            }))
            sweep = load_sweep(sweep_file, args.set)
            started = time.perf_counter()
            result = run_sweep(sweep, progress=lambda line: print(f"  {line}", flush=True))
            walls[arm] = time.perf_counter() - started
            counts[arm] = stage_counts(storage)
            aurocs = [round(t["metrics"]["auroc"], 4) for t in result["trials"]]
            print(f"{arm}: {walls[arm]:.0f}s, stage executions {counts[arm]}, AUROCs {aurocs}", flush=True)
        ray.shutdown()
    ratio = walls["with_reuse"] / walls["without_reuse"]
    print(json.dumps({
        "bench": "sweep_reuse", "value": round(ratio, 3), "goal": 0.3, "better": "lower",
        "with_reuse_s": round(walls["with_reuse"], 1), "without_reuse_s": round(walls["without_reuse"], 1),
        "points": args.points, "base": args.base, "overrides": args.set, "stage_executions": counts,
    }))


if __name__ == "__main__":
    main()
