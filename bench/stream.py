"""Streaming poisoned shards: bdray's Ray Data pipeline against a plain single-process loop, and memory at 10x data.

Both arms read the same planned shard directory (clean source shards + a 1% BadNet plan) and do the
same work per batch with the same kernels (``decode_images`` + ``poison_rows``) ending in torch uint8
batches of 256; only the engine differs:

- plain: ``pyarrow.parquet.ParquetFile.iter_batches`` over the shards, one process;
- bdray: ``to_ray_dataset(...).iter_torch_batches(...)`` on a local Ray with 2 CPUs.

On the JPEG 10x set a third arm runs two plain loops at once over disjoint halves of the files: the
ceiling any engine could reach on these cores with the same per-row work (reported as ``ceiling``).

Two data sets, each at 1x and 10x rows: 224x224 RGB JPEG shards of 1,024 rows (16 MB files; the
realistic case: decoding is real work that Ray spreads over the cores) and raw 28x28 pixels
(decoding is a memcpy, so Ray's per-task overhead dominates). Each arm runs in a fresh child
process whose whole process tree (Ray's GCS, raylet and workers included) is sampled from /proc
every 0.2 s for peak RSS and PSS; PSS splits shared pages (Ray's object store, shared libraries)
between the processes mapping them, so its sum is the tree's real footprint, while summed RSS
counts such pages once per process. Each arm iterates ``--epochs`` epochs (3); its rate is the
median of the epochs after the first (the steady state a training job sees; epoch 1 also pays
Ray's worker start-up and is reported apart). This machine's own speed drifts by 20% from minute
to minute and from process to process (one plain loop, same files: 1,203 to 1,799 images/s in one
hour), so a ratio of two arms measured once each swings as much: the arms run in ``--rounds``
interleaved rounds (3; plain then Ray, then Ray then plain, ...), each round gives a ratio, and the
figure is the median round's, with the spread beside it.

    python bench/stream.py                       # JPEG 2,048 -> 20,480 rows and raw 60,000 -> 600,000 rows
    python bench/stream.py --jpeg-rows 512 --rows-per-shard 256 --raw-rows 6000   # a quick look

Ends with one JSON line: {"bench": "stream", "value": Ray/plain images/s (JPEG, 10x, median round), "goal": 1.5, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

BATCH = 256


# -- the two arms (each runs in a child process) ------------------------------------------------------


def run_plain(path: str, epochs: int, part: tuple[int, int] = (0, 1)) -> dict:
    import pyarrow.parquet as pq
    import torch

    from bdray.data.shards import decode_images, load_attack, open_shards, poison_rows, read_plan

    manifest = open_shards(path, verify="fast")
    attack, plan, source = load_attack(manifest), read_plan(manifest), manifest.source
    # the same read granularity as to_ray_dataset's map_batches default, then consumer batches of 256
    read_rows = 4096 if source.image_format == "raw" else BATCH
    out = []
    for _ in range(epochs):
        started, n, first = time.perf_counter(), 0, None
        for file in manifest.image_files()[part[0] :: part[1]]:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=read_rows, columns=["image", "label", "index"]):
                images = decode_images(batch.column("image"), source.image_format, source.image_shape)
                images, labels, _, _ = poison_rows(images, batch.column("label").to_numpy(),
                                                   batch.column("index").to_numpy(), plan, attack)
                for start in range(0, len(labels), BATCH):
                    x = torch.from_numpy(images[start : start + BATCH])
                    y = torch.from_numpy(labels[start : start + BATCH])
                    n += min(len(x), len(y))
                    first = first or time.perf_counter() - started
        out.append({"images": n, "seconds": time.perf_counter() - started, "first_batch_s": first})
    return {"epochs": out}


def run_ray(path: str, epochs: int) -> dict:
    import ray
    import torch

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    init_s = time.perf_counter() - started
    ray.data.DataContext.get_current().enable_progress_bars = False
    from bdray.data.stream import to_ray_dataset

    # built once and iterated every epoch, as a Ray Train job does with its ``get_dataset_shard``
    # (and as the plain arm opens the manifest once)
    ds = to_ray_dataset(path)
    out = []
    for _ in range(epochs):
        started, n, first = time.perf_counter(), 0, None
        for batch in ds.iter_torch_batches(batch_size=BATCH, dtypes={"image": torch.uint8, "label": torch.int64}):
            n += len(batch["label"])
            first = first or time.perf_counter() - started
        out.append({"images": n, "seconds": time.perf_counter() - started, "first_batch_s": first})
    ray.shutdown()
    return {"epochs": out, "ray_init_s": init_s}


# -- measuring a child's process tree ----------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the command name is in parentheses and may hold spaces: split after the last ')'
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _tree(root: int) -> Iterator[int]:
    tree, stack = _children(), [root]
    while stack:
        pid = stack.pop()
        yield pid
        stack.extend(tree.get(pid, []))


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, process count) of ``root`` and its descendants, in bytes."""
    rss = pss = count = 0
    for pid in _tree(root):
        rss += _kib(f"/proc/{pid}/status", "VmRSS:") * 1024
        pss += _kib(f"/proc/{pid}/smaps_rollup", "Pss:") * 1024
        count += 1
    return rss, pss, count


def _spawn(arm: str, path: Path, epochs: int, part: str = "0/1") -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, __file__, "--arm", arm, "--path", str(path), "--epochs", str(epochs),
                             "--part", part], stdout=subprocess.PIPE, env=env, text=True)


def _result(child: subprocess.Popen, stdout: str, what: str) -> dict:
    if child.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {child.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def ceiling(path: Path, epochs: int, workers: int = 2) -> dict:
    """``workers`` plain loops over disjoint file sets at once: what any engine could reach here.

    No framework cost at all (no scheduler, no object store, no batch hand-off to a consumer): the
    throughput two cores give the same per-row work. Per epoch: all images over the slowest loop's time.
    """
    children = [_spawn("plain", path, epochs, f"{i}/{workers}") for i in range(workers)]
    results = [_result(child, child.communicate()[0], f"plain part on {path}") for child in children]
    epochs_out = [{"images": sum(r["epochs"][e]["images"] for r in results),
                   "seconds": max(r["epochs"][e]["seconds"] for r in results)} for e in range(epochs)]
    return {"epochs": epochs_out, "workers": workers}


def measure(arm: str, path: Path, epochs: int) -> dict:
    """Run one arm in a child process; return its result plus the tree's peak memory."""
    child = _spawn(arm, path, epochs)
    peak = {"rss": 0, "pss": 0, "processes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, pss, count = tree_memory(child.pid)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            peak["processes"] = max(peak["processes"], count)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    done.set()
    sampler.join()
    result = _result(child, stdout, f"{arm} on {path}")
    return {**result, "peak_rss": peak["rss"], "peak_pss": peak["pss"], "processes": peak["processes"]}


# -- data ---------------------------------------------------------------------------------------------


def make_sets(root: Path, case: str, rows: int, scale: int, rows_per_shard: int | None = None) -> dict[int, Path]:
    """A planned 1% BadNet set of ``rows`` and ``rows * scale`` samples; chunks are written as they are made."""
    from bdray.attacks import build_attack
    from bdray.data import get_dataset
    from bdray.data.shards import write_poisoned, write_source

    if case == "jpeg":
        shape, fmt, per_shard = (3, 224, 224), "jpeg", 1024
    else:
        shape, fmt, per_shard = (1, 28, 28), "raw", 4096
    per_shard = rows_per_shard or per_shard
    chunk = min(rows, 2000)

    def chunks(total: int):
        # distinct images at every scale: each chunk is a fresh draw of the generator
        for i in range(-(-total // chunk)):
            n = min(chunk, total - i * chunk)
            yield get_dataset("synthetic", channels=shape[0], image_size=shape[1], train_size=n, test_size=1,
                              noise=10, seed=i).train

    sets = {}
    for factor in (1, scale):
        source, planned = root / f"{case}-{factor}x-source", root / f"{case}-{factor}x"
        started = time.perf_counter()
        write_source(source, chunks(rows * factor), format=fmt, rows_per_shard=per_shard)
        attack = build_attack({"name": "badnet", "poison_rate": 0.01, "patch_size": 3 if case == "raw" else 16},
                              image_shape=shape, num_classes=10)
        write_poisoned(planned, source, attack, 0, mode="planned")
        size = sum(p.stat().st_size for p in source.glob("*.parquet"))
        print(f"  wrote {case} {rows * factor} rows ({size / 2**20:.0f} MiB in {len(list(source.glob('*.parquet')))} "
              f"shards) in {time.perf_counter() - started:.0f}s", flush=True)
        sets[factor] = planned
    return sets


def steady_rate(run: dict) -> float:
    """images/s of the epochs after the first (their median); the only epoch when there is one."""
    rates = [e["images"] / e["seconds"] for e in run["epochs"]]
    return median(rates[1:] or rates)


def epoch_rate(run: dict, epoch: int | None = None) -> float:
    """images/s of one epoch, or the run's steady rate (:func:`steady_rate`) when ``epoch`` is None."""
    return run["rate"] if epoch is None else run["epochs"][epoch]["images"] / run["epochs"][epoch]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpeg-rows", type=int, default=2048, help="1x JPEG rows (2 shards of 1,024)")
    parser.add_argument("--raw-rows", type=int, default=60000)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the arms at each size")
    parser.add_argument("--cases", default="jpeg,raw")
    parser.add_argument("--rows-per-shard", type=int, default=None,
                        help="rows per shard (default: 1,024 for JPEG, 4,096 for raw, write_source's default)")
    parser.add_argument("--workdir", default=None, help="where to write the shards (default: a temp dir)")
    parser.add_argument("--arm", choices=["plain", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--part", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # child process: one arm, one JSON line
        if args.arm == "ray":
            result = run_ray(args.path, args.epochs)
        else:
            index, count = (int(x) for x in args.part.split("/"))
            result = run_plain(args.path, args.epochs, (index, count))
        print(json.dumps(result), flush=True)
        return

    # results[case][factor][arm] = one entry per round
    results: dict[str, dict[int, dict[str, list[dict]]]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for case in args.cases.split(","):
            rows = args.jpeg_rows if case == "jpeg" else args.raw_rows
            sets = make_sets(Path(tmp), case, rows, args.scale, args.rows_per_shard)
            for factor, path in sets.items():
                runs = results.setdefault(case, {}).setdefault(factor, {"plain": [], "ray": [], "ceiling": []})
                for round_ in range(args.rounds):
                    # alternate the order, so a drift of the machine's speed within a round favours neither arm
                    for arm in ("plain", "ray") if round_ % 2 == 0 else ("ray", "plain"):
                        load = os.getloadavg()[0]
                        r = measure(arm, path, args.epochs)
                        r["rate"] = steady_rate(r)
                        runs[arm].append({**r, "load_before": load})
                        print(f"  {case:4s} {factor:>2d}x round {round_ + 1} {arm:5s}: "
                              + ", ".join(f"{e['images'] / e['seconds']:6.0f}" for e in r["epochs"])
                              + f" img/s by epoch; peak tree PSS {r['peak_pss'] / 2**30:.2f} GiB"
                              f" ({r['processes']} processes); load {load:.1f}", flush=True)
                    if case == "jpeg" and factor == args.scale:
                        r = ceiling(path, args.epochs)
                        r["rate"] = steady_rate(r)
                        runs["ceiling"].append(r)
                        print(f"  {case:4s} {factor:>2d}x round {round_ + 1} 2 plain loops at once (the ceiling): "
                              + ", ".join(f"{e['images'] / e['seconds']:6.0f}" for e in r["epochs"]), flush=True)
                    ratio = runs["ray"][-1]["rate"] / runs["plain"][-1]["rate"]
                    print(f"  {case:4s} {factor:>2d}x round {round_ + 1}: Ray/plain {ratio:.2f}", flush=True)

    def ratios(case: str, factor: int, arm: str = "ray", epoch: int | None = None) -> list[float]:
        runs = results[case][factor]
        return [epoch_rate(a, epoch) / epoch_rate(p, epoch) for a, p in zip(runs[arm], runs["plain"], strict=False)]

    def growth(case: str, arm: str, key: str) -> float:
        big, small = results[case][args.scale][arm], results[case][1][arm]
        return median([r[key] for r in big]) / median([r[key] for r in small])

    summary: dict = {}
    for case in args.cases.split(","):
        big = ratios(case, args.scale)
        summary[case] = {
            "speedup_1x": round(median(ratios(case, 1)), 3),
            f"speedup_{args.scale}x": round(median(big), 3),
            f"speedup_{args.scale}x_rounds": [round(x, 3) for x in big],
            f"speedup_{args.scale}x_epoch1": round(median(ratios(case, args.scale, epoch=0)), 3),
            "ray_memory_growth_pss": round(growth(case, "ray", "peak_pss"), 3),
            "ray_memory_growth_rss": round(growth(case, "ray", "peak_rss"), 3),
            "plain_memory_growth_pss": round(growth(case, "plain", "peak_pss"), 3),
            "ray_peak_pss_gib": round(max(r["peak_pss"] for r in results[case][args.scale]["ray"]) / 2**30, 2),
            "plain_peak_pss_gib": round(max(r["peak_pss"] for r in results[case][args.scale]["plain"]) / 2**30, 2),
            **({"ceiling_2_plain_loops": round(median(ratios(case, args.scale, arm="ceiling")), 3),
                "ceiling_rounds": [round(x, 3) for x in ratios(case, args.scale, arm="ceiling")]}
               if results[case][args.scale]["ceiling"] else {}),
            "images_per_s": {f"{factor}x_{arm}": [round(r["rate"]) for r in runs]
                             for factor, by_arm in results[case].items() for arm, runs in by_arm.items() if runs},
        }
    head = "jpeg" if "jpeg" in summary else next(iter(summary))
    print(json.dumps({
        "bench": "stream", "value": summary[head][f"speedup_{args.scale}x"], "goal": 1.5, "better": "higher",
        "rounds": summary[head][f"speedup_{args.scale}x_rounds"], "ceiling": summary[head].get("ceiling_2_plain_loops"),
        "memory_growth": summary[head]["ray_memory_growth_pss"], "memory_goal": 1.2, "case": head,
        "data_growth": args.scale, "epochs": args.epochs, "cpus": os.cpu_count(), "cases": summary,
    }))


if __name__ == "__main__":
    main()
