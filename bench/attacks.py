"""The attack zoo on Fashion-MNIST: clean accuracy and ASR of every registered attack at its paper settings.

Trains one clean compact CNN, then per attack either a model from the same initialization on the
poisoned training set (data-poisoning attacks; attacks with a trained part are fitted on the clean
training set first) or a backdoored copy of the clean model via ``implant`` (post-training attacks:
FT, TrojanNN). CA is measured on the whole test split, ASR on the triggered test images whose label
the attack changes (``triggered_testset``). Each attack is one MLflow run under a parent run.

    python bench/attacks.py --train-subset 20000 --epochs 4 --storage .bdray/bench-attacks \\
        --out runs/bench-attacks                 # ~20 min on 2 shared cores; updates docs/attacks.md
    python bench/attacks.py --attacks badnet,sig --train-subset 5000 --epochs 2 --no-doc   # a quick look

Ends with one JSON line: {"bench": "attacks", "value": attacks with ASR >= 80% and CA drop <= 3 points,
"goal": number of attacks, "better": "higher", ...}.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdray.attacks import Attack, apply_plan, build_attack, list_attacks, triggered_testset
from bdray.attacks.posttrain import implant
from bdray.data import get_dataset
from bdray.data.base import ImageSet
from bdray.metrics import accuracy, attack_success_rate
from bdray.models import get_model
from bdray.train import Augment, TrainRecipe, fit, predict_proba

BEGIN, END = "<!-- bench:attacks:begin -->", "<!-- bench:attacks:end -->"
ASR_BAR, CA_DROP_BAR = 0.80, 3.0


def new_model(data: ImageSet, seed: int) -> torch.nn.Module:
    """The compact CNN with the initialization every model of this bench shares."""
    c, h, _ = data.image_shape
    torch.manual_seed(seed)
    return get_model("compact_cnn", in_channels=c, num_classes=data.num_classes, image_size=h,
                     mean=data.mean, std=data.std)


def predict(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    return predict_proba(model, images).argmax(1) if len(images) else np.zeros(0, np.int64)


def run_attack(name: str, train: ImageSet, test: ImageSet, clean_model: torch.nn.Module, recipe: TrainRecipe,
               finetune: TrainRecipe, seed: int) -> tuple[Attack, dict[str, Any]]:
    attack = build_attack({"name": name}, image_shape=train.image_shape, num_classes=train.num_classes)
    started = time.perf_counter()
    if attack.needs_fit:
        attack.fit(train, seed=seed)
    fitted = time.perf_counter()
    plan = attack.plan(train.labels, seed)
    if attack.post_training:
        model = implant(clean_model, train, attack, finetune, seed)
    else:
        poisoned = apply_plan(train, attack, plan)
        model = fit(new_model(train, seed), poisoned.data, recipe, seed=seed)
    trained = time.perf_counter()
    triggered, _ = triggered_testset(test, attack)
    row = {
        "attack": name,
        "poison_rate": attack.config.poison_rate,
        "num_poison": len(plan.poison_index),
        "num_cover": len(plan.cover_index),
        "clean_label": attack.clean_label,
        "post_training": attack.post_training,
        "ca": accuracy(predict(model, test.images), test.labels),
        "asr": attack_success_rate(predict(model, triggered.images), triggered.labels),
        # How often the clean model already sends triggered inputs to the target: the floor of ASR.
        "clean_model_asr": attack_success_rate(predict(clean_model, triggered.images), triggered.labels),
        "num_triggered": len(triggered),
        "fit_seconds": fitted - started,
        "seconds": time.perf_counter() - started,
        "train_seconds": trained - fitted,
    }
    return attack, row


def markdown(rows: list[dict[str, Any]], clean_ca: float, command: str) -> str:
    lines = [
        f"Clean model: CA {100 * clean_ca:.2f}%. Bar: ASR >= {100 * ASR_BAR:.0f}% with a CA drop <= {CA_DROP_BAR:g}"
        " points.",
        "",
        f"`{command}`",
        "",
        "| attack | poison rate | poisoned / cover | CA % | CA drop | ASR % | clean model's ASR % | bar | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['attack']} | | | | | | | error: {r['error']} | |")
            continue
        drop = 100 * (clean_ca - r["ca"])
        lines.append(
            f"| {r['attack']} | {100 * r['poison_rate']:g}% | {r['num_poison']} / {r['num_cover']} | "
            f"{100 * r['ca']:.2f} | {drop:+.2f} | {100 * r['asr']:.2f} | {100 * r['clean_model_asr']:.2f} | "
            f"{'yes' if r['ok'] else 'no'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def update_doc(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: markers {BEGIN} / {END} not found; add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="all", help="comma-separated names (default: every registered one)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of the post-training attacks")
    parser.add_argument("--train-subset", type=int, default=20000, help="training images (seeded subset; 0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=None, help="Fashion-MNIST root (default: the dataset's search path)")
    parser.add_argument("--storage", default=".bdray/bench-attacks", help="MLflow sqlite store lives here")
    parser.add_argument("--out", default="runs/bench-attacks", help="results.json and attacks.md go here")
    parser.add_argument("--doc", default="docs/attacks.md", help="markdown file whose table is replaced")
    parser.add_argument("--no-doc", action="store_true", help="leave --doc untouched")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    names = list_attacks() if args.attacks == "all" else [a.strip() for a in args.attacks.split(",") if a.strip()]
    pair = get_dataset("fashion_mnist", **({"root": args.root} if args.root else {}))
    train, test = pair.train, pair.test
    if args.train_subset and args.train_subset < len(train):
        train = train.subset(np.sort(np.random.default_rng(args.seed).permutation(len(train))[: args.train_subset]))
    # The quickstart's recipe; post-training attacks finetune at a tenth of its learning rate.
    recipe = TrainRecipe(epochs=args.epochs, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4,
                         schedule="cosine", augment=Augment(crop_padding=2))
    finetune = recipe.model_copy(update={"epochs": args.finetune_epochs, "lr": 0.005})

    from bdray.tracking import Tracker

    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(f"sqlite:///{storage / 'mlflow.db'}", "bench-attacks", artifact_root=storage / "artifacts")
    command = "python bench/attacks.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("train_subset", args.train_subset), ("epochs", args.epochs),
                                                   ("finetune_epochs", args.finetune_epochs), ("seed", args.seed),
                                                   ("threads", args.threads)))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tracker.run("attacks", tags={"bench": "attacks"}) as parent:
        parent.log_params({"train_subset": len(train), "recipe": recipe.model_dump(mode="json"),
                           "finetune": finetune.model_dump(mode="json"), "seed": args.seed})
        t0 = time.perf_counter()
        clean_model = fit(new_model(train, args.seed), train, recipe, seed=args.seed)
        clean_ca = accuracy(predict(clean_model, test.images), test.labels)
        parent.log_metrics({"clean_ca": clean_ca, "clean_seconds": time.perf_counter() - t0})
        print(f"clean model: CA {100 * clean_ca:.2f}% ({time.perf_counter() - t0:.0f}s)", flush=True)
        for name in names:
            with tracker.run(name, tags={"attack": name}, parent_run_id=parent.run_id) as run:
                try:
                    attack, row = run_attack(name, train, test, clean_model, recipe, finetune, args.seed)
                except Exception as exc:  # one broken attack must not cost the other results
                    traceback.print_exc()
                    rows.append({"attack": name, "error": f"{type(exc).__name__}: {exc}"})
                    run.set_tags({"error": rows[-1]["error"]})
                    continue
                row["ca_drop"] = 100 * (clean_ca - row["ca"])
                row["ok"] = row["asr"] >= ASR_BAR and row["ca_drop"] <= CA_DROP_BAR
                rows.append(row)
                run.log_params({"attack": attack.config.model_dump(mode="json"), "train_subset": len(train)})
                run.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, (int, float))})
            print(f"{name:15s} CA {100 * row['ca']:6.2f}  ASR {100 * row['asr']:6.2f}  "
                  f"({row['seconds']:.0f}s){'  ok' if row['ok'] else ''}", flush=True)
        table = markdown(rows, clean_ca, command)
        parent.log_text(table, "attacks.md")
        parent.log_metrics({"reaching_bar": sum(bool(r.get("ok")) for r in rows)})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attacks.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"clean_ca": clean_ca, "rows": rows}, indent=2))
    if not args.no_doc:
        update_doc(Path(args.doc), table)
    print(table)
    print(json.dumps({
        "bench": "attacks", "value": sum(bool(r.get("ok")) for r in rows), "goal": len(rows), "better": "higher",
        "clean_ca": round(clean_ca, 4), "train_subset": len(train), "epochs": args.epochs,
        "failed": [r["attack"] for r in rows if "error" in r],
        "below_bar": [r["attack"] for r in rows if "error" not in r and not r["ok"]],
        "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
