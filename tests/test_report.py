"""Sweep reports over a field whose grid mixes numbers and None (e.g. defense.trainable_blocks)."""

from __future__ import annotations

from bdray.report import _param_value, aggregate, plot, to_markdown


def test_a_swept_none_among_numbers_is_tabled_and_plotted_as_a_category() -> None:
    # MLflow hands params back as text: "None" for an unset field.
    records = [
        {
            "params": {"defense.trainable_blocks": _param_value(k), "seed": float(seed)},
            "metrics": {"auroc": 0.9 + 0.01 * i},
        }
        for i, k in enumerate(["None", "1", "3", "2"])
        for seed in (0, 1)
    ]
    rows = aggregate(["defense.trainable_blocks", "seed"], records, ("auroc",))
    assert [r["defense.trainable_blocks"] for r in rows] == [1.0, 2.0, 3.0, "None"]
    assert all(r["n"] == 2 for r in rows)
    assert "| None | 2 |" in to_markdown(rows, ["defense.trainable_blocks"], ("auroc",))
    fig = plot(rows, "defense.trainable_blocks", "auroc", ["defense.trainable_blocks"])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["1", "2", "3", "None"]
