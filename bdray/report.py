"""Read a sweep back from MLflow and compare its trials: a table (markdown + CSV) and plots.

Trials are the runs tagged ``bdray.trial``; the swept fields come from the sweep's parent run.
Runs that differ only in ``seed`` are aggregated (mean, standard deviation, count), so a report
shows each metric against the swept parameter with its spread over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_METRICS = ("auroc", "auroc_noisy", "tpr_at_fpr", "model_ca", "model_asr", "expert_ca", "expert_asr",
                   "defended_ca", "defended_asr")


def _param_value(text: str) -> Any:
    try:
        return float(text) if any(c in text for c in ".eE") or text.lstrip("-").isdigit() else text
    except ValueError:
        return text


def _display_param(path: str, params: dict[str, str]) -> str:
    # A whole section swept (e.g. ``attack``) is shown by the component's name.
    return f"{path}.name" if path not in params and f"{path}.name" in params else path


def collect(experiment: str, uri: str, *, parent_run_id: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """The swept fields and one record per finished trial run (params as values, metrics)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named '{experiment}' at {uri}")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`bdray.sweep_key` != ''",
                                 order_by=["attributes.start_time DESC"])
    if parent_run_id is not None:
        parents = [p for p in parents if p.info.run_id == parent_run_id]
    if not parents:
        raise ValueError(f"experiment '{experiment}' holds no sweep (no run tagged bdray.sweep_key)")
    parent = parents[0]
    swept = json.loads(parent.data.tags.get("bdray.swept", "[]"))
    runs = client.search_runs([exp.experiment_id], max_results=5000, filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FINISHED'"))
    records = []
    seen = set()
    for run in runs:
        key = run.data.tags.get("bdray.trial_key")
        if run.data.tags.get("bdray.trial") != "1" or key in seen:
            continue
        seen.add(key)
        fields = [_display_param(p, run.data.params) for p in swept]
        records.append({
            "params": {f: _param_value(run.data.params.get(f, "")) for f in fields},
            "metrics": dict(run.data.metrics), "run_id": run.info.run_id,
        })
    fields = [_display_param(p, records[0]["params"] if records else {}) for p in swept]
    if records:
        fields = list(records[0]["params"])
    return fields, records


def aggregate(fields: list[str], records: list[dict[str, Any]], metrics: tuple[str, ...] = DEFAULT_METRICS,
              over: str = "seed") -> list[dict[str, Any]]:
    """Group records by every field except ``over``; mean, std and count of each metric per group."""
    keys = [f for f in fields if f != over]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r["params"].get(k) for k in keys)].append(r)
    rows = []
    for group_key, members in groups.items():
        row: dict[str, Any] = dict(zip(keys, group_key, strict=True))
        row["n"] = len(members)
        for m in metrics:
            values = np.array([r["metrics"][m] for r in members if m in r["metrics"]], dtype=float)
            row[f"{m}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    rows.sort(key=lambda r: tuple(_order(r[k]) for k in keys))
    return rows


def _order(value: Any) -> tuple[int, Any]:
    """Numbers first, in order, then anything else (e.g. ``None`` for an unset field) by its text."""
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def to_markdown(rows: list[dict[str, Any]], keys: list[str], metrics: tuple[str, ...]) -> str:
    head = [*keys, "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys] + [str(r["n"])]
        for m in metrics:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            cells.append(f"{mean:.4f} ± {std:.4f}" if r["n"] > 1 else f"{mean:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def plot(rows: list[dict[str, Any]], x: str, metric: str, keys: list[str]):
    """``metric`` against ``x``, one line per combination of the other fields, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in keys if k != x]
    lines: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        lines[tuple(r[k] for k in others)].append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    # A swept field with a non-numeric value among numbers (None: the paper's setting) is drawn as categories.
    values = sorted({r[x] for r in rows}, key=_order)
    categorical = any(not isinstance(v, (int, float)) for v in values)
    where = {v: i for i, v in enumerate(values)} if categorical else None
    for label, members in sorted(lines.items(), key=lambda kv: str(kv[0])):
        members = sorted(members, key=lambda r: _order(r[x]))
        ax.errorbar([where[r[x]] if where else r[x] for r in members], [r[f"{metric}_mean"] for r in members],
                    yerr=[r[f"{metric}_std"] for r in members], marker="o", capsize=3,
                    label=", ".join(f"{k}={v}" for k, v in zip(others, label, strict=True)) or metric)
    xs = [r[x] for r in rows if isinstance(r[x], (int, float))]
    if categorical:
        ax.set_xticks(range(len(values)), [f"{v:g}" if isinstance(v, float) else str(v) for v in values])
    elif xs and min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")
    ax.set(xlabel=x, ylabel=metric, title=f"{metric} vs {x} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(experiment: str, uri: str, out: str | Path, *, metrics: tuple[str, ...] = DEFAULT_METRICS,
                 x: str | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Write report.md, report.csv and one plot per metric into ``out``; returns what was written."""
    from bdray.atomic import atomic_write

    fields, records = collect(experiment, uri, parent_run_id=parent_run_id)
    if not records:
        raise ValueError(f"experiment '{experiment}' has no finished trial runs yet")
    rows = aggregate(fields, records, metrics)
    keys = [f for f in fields if f != "seed"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["params"].get("seed") for r in records if "seed" in r["params"]})
    md = (f"# Sweep report: {experiment}\n\n{len(records)} finished trials"
          + (f", seeds {', '.join(f'{s:g}' for s in seeds)} aggregated (mean ± std)" if seeds else "")
          + f"; MLflow {uri}\n\n" + to_markdown(rows, keys, metrics))
    numeric = [k for k in keys if all(isinstance(r[k], float) for r in rows)]
    x = x or (numeric[0] if numeric else None)
    plots = []
    if x is not None:
        if x not in keys:
            raise ValueError(f"--x {x}: not a swept field (swept: {', '.join(keys)})")
        for metric in metrics:
            fig = plot(rows, x, metric, keys)
            path = out / f"{metric}_vs_{x.replace('.', '_')}.png"
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
            plots.append(path.name)
        md += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md))
    atomic_write(out / "report.csv", lambda tmp: Path(tmp).write_text(to_csv(rows)))
    return {"rows": rows, "trials": len(records), "plots": plots, "markdown": md}
