"""`bdray results`: the comparison tables from one results file, every number from the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bdray.cli import main
from bdray.config import ConfigError
from bdray.results import load_results, report_sections, run_results, to_markdown, validate_results

ROOT = Path(__file__).resolve().parents[1]


def _results_file(tmp_path: Path, tables: dict) -> Path:
    path = tmp_path / "results.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "results-test", "storage": str(tmp_path / "store"), "out": "report.md", "tables": tables},
            sort_keys=False,
        )
    )
    return path


DETECTION = {
    "kind": "detection",
    "base": str(ROOT / "configs" / "smoke.yaml"),
    "overrides": ["train.epochs=6"],
    "attacks": {
        "badnet": {"name": "badnet", "poison_rate": 0.1, "patch_size": 4, "pattern": "white"},
        "blend": {"name": "blend", "poison_rate": 0.1, "alpha": 0.2},
    },
    "detectors": {"strip": {"name": "strip", "n": 20}, "scale_up": {"name": "scale_up"}},
    "eval_subset": {"strip": 150},
    "repairs": {"finetune": {"name": "finetune", "recipe": {"epochs": 1, "batch_size": 64, "lr": 0.01}}},
}
POISONED = {
    "kind": "poisoned_training",
    "base": str(ROOT / "configs" / "advrbd_smoke.yaml"),
    "attacks": {"badnet": {"name": "badnet", "poison_rate": 0.05, "patch_size": 3, "pattern": "white"}},
    "defenses": {
        "advrbd": {
            "name": "advrbd",
            "train": {"epochs": 3, "batch_size": 64},
            "partition": {"rate": 0.1, "eps": 0.3, "radius": 2, "steps": 2},
            "enhance": {"rounds": 2, "growth": 0.1, "batch_size": 64},
            "clean_train": {"epochs": 2, "batch_size": 64},
            "relearn": {"epochs": 1, "batch_size": 64},
        },
        "cutmix": {"name": "cutmix", "train": {"epochs": 2, "batch_size": 64}},
    },
}


def test_every_bad_field_is_named_before_anything_runs(tmp_path):
    tables = {
        "det": {
            **DETECTION,
            "attacks": {"blend": {"name": "blend", "alpha": 7}, "nope": {"name": "no_such_attack"}},
            "detectors": {"strip": {"name": "strip", "n": 0}, "x": {"name": "no_such_detector"}},
            "repairs": {"nad": {"name": "nad", "bogus": 1}},
        },
        "adv": {**POISONED, "defenses": {"abl": {"name": "abl", "gamma": -1}}},
    }
    with pytest.raises(ConfigError) as info:
        load_results(_results_file(tmp_path, tables))
    fields = [field for field, _ in info.value.errors]
    for expected in (
        "tables.det.attacks.blend.alpha",
        "tables.det.attacks.nope.name",
        "tables.det.detectors.strip.n",
        "tables.det.detectors.x.name",
        "tables.det.repairs.nad.bogus",
        "tables.adv.defenses.abl.gamma",
    ):
        assert expected in fields, (expected, fields)
    assert str(tmp_path / "results.yaml") in str(info.value)


def test_a_table_of_unknown_kind_or_a_missing_base_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="kind"):
        validate_results({"tables": {"t": {"kind": "nope", "base": "x.yaml", "attacks": {"a": {}}}}})
    with pytest.raises(ConfigError, match=r"tables\.t\.base \(missing\.yaml\).*does not exist"):
        validate_results({"tables": {"t": {**DETECTION, "base": "missing.yaml"}}}, base_dir=tmp_path)


def test_eval_subset_must_name_a_detector_column(tmp_path):
    with pytest.raises(ConfigError, match=r"tables\.det\.eval_subset\.nc: not a detector column"):
        load_results(_results_file(tmp_path, {"det": {**DETECTION, "eval_subset": {"nc": 500}}}))


def test_only_must_name_a_table(tmp_path):
    config = load_results(_results_file(tmp_path, {"det": DETECTION}))
    with pytest.raises(ConfigError, match="no table named 'nope'"):
        run_results(config, only=["nope"])


@pytest.mark.slow
def test_tables_from_one_run_logged_to_mlflow_and_resumable(tmp_path, ray_session, capsys):
    path = _results_file(tmp_path, {"det": DETECTION, "adv": POISONED})
    config = load_results(path)
    written = run_results(config, progress=lambda _m: None)
    results, meta = written["results"], written["meta"]
    det = results["det"]
    assert set(det) == {"badnet", "blend"}
    # STRIP is scored on a seeded draw of 150 clean and 150 triggered inputs, SCALE-UP on all of them.
    assert det["badnet"]["strip"]["num_eval_clean"] == det["badnet"]["strip"]["num_eval_triggered"] == 150
    assert det["badnet"]["scale_up"]["num_eval_clean"] == 300 < det["badnet"]["scale_up"]["num_eval_triggered"] + 150
    for row in det.values():
        assert set(row) == {"badexpert", "strip", "scale_up", "finetune"}
        for cell in (row["badexpert"], row["strip"], row["scale_up"]):
            assert 0.0 <= cell["auroc"] <= 1.0 and 0.0 <= cell["defended_asr"] <= 1.0
        # Detectors are calibrated on held-out clean data at the same target: the realised FPR on the
        # evaluation set stays near it (300 evaluation images: 1% is 3 of them).
        assert row["strip"]["fpr"] <= 0.05
    # The model learned the white patch, and STRIP's premise holds for a patch: superimposed clean
    # images do not dilute it, so triggered inputs keep low entropy.
    assert det["badnet"]["badexpert"]["model_asr"] > 0.8
    assert det["badnet"]["strip"]["auroc"] > 0.7
    adv = results["adv"]["badnet"]
    assert set(adv) == {"advrbd", "cutmix"}
    assert 0.0 <= adv["advrbd"]["id_recall"] <= 1.0 and "relearn_asr" in adv["advrbd"]
    assert "final_asr" in adv["cutmix"] and "relearn_asr" not in adv["cutmix"]

    text = Path(written["path"]).read_text()
    assert Path(written["path"]) == tmp_path / "report.md"
    for heading in ("det: AUROC (%)", "det: CA / ASR (%)", "adv: ACC / ASR (%)", "Identification"):
        assert heading in text
    row = next(line for line in text.splitlines() if line.startswith("| badnet |") and "/" not in line)
    assert f"{100 * det['badnet']['strip']['auroc']:.1f}" in row.split("|")[5]
    assert meta["computed"] == 2 + 2 * 3 + 2 and meta["reused"] == 0

    # Every number is in the parent MLflow run; each row's own run is its child.
    client = MlflowClient(config.tracking_uri())
    parent = client.get_run(meta["mlflow_run_id"])
    assert parent.data.metrics["det.badnet.strip.auroc"] == pytest.approx(det["badnet"]["strip"]["auroc"])
    assert parent.data.metrics["adv.badnet.cutmix.final_asr"] == pytest.approx(adv["cutmix"]["final_asr"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in children} == {"det/badnet", "det/blend", "adv/badnet/advrbd", "adv/badnet/cutmix"}
    logged = json.loads(Path(client.download_artifacts(parent.info.run_id, "results.json", str(tmp_path))).read_text())
    assert logged["results"]["det"]["badnet"]["strip"]["auroc"] == pytest.approx(det["badnet"]["strip"]["auroc"])

    # The same command again finds every cell in the stage store: nothing recomputed, the same numbers.
    assert main(["results", str(path), "--only", "det", "--out", str(tmp_path / "again.md")]) == 0
    again = (tmp_path / "again.md").read_text()
    assert "0 cells computed by this run, 8 found" in again
    # Written to a fresh file, `--only det` holds det's section alone, with the same numbers.
    table = lambda report: report_sections(report)["det"].split("### ", 1)[1]  # noqa: E731
    assert set(report_sections(again)) == {"det"} and table(again) == table(text)
    # Into an existing report, it replaces det's section and keeps adv's as it was.
    assert main(["results", str(path), "--only", "det", "--out", str(written["path"])]) == 0
    merged = report_sections(Path(written["path"]).read_text())
    assert list(merged) == ["det", "adv"] and merged["adv"] == report_sections(text)["adv"]
    assert "0 cells computed by this run" in merged["det"] and table(merged["det"]) == table(text)


def test_report_marks_rows_where_the_attack_did_not_implant(tmp_path):
    config = load_results(_results_file(tmp_path, {"det": {**DETECTION, "repairs": {}}}))
    cell = {"auroc": 0.9, "defended_ca": 0.8, "defended_asr": 0.1}
    results = {"det": {
        "badnet": {"badexpert": {**cell, "model_ca": 0.9, "model_asr": 0.95}, "strip": cell,
                   "scale_up": {**cell, "auroc": 0.7}},
        "blend": {"badexpert": {**cell, "model_ca": 0.9, "model_asr": 0.2, "auroc": 0.5}, "strip": cell,
                  "scale_up": {**cell, "auroc": 0.1}},
    }}
    meta = {"command": "bdray results x", "date": "d", "git_commit": "c", "seconds": 60, "computed": 1, "reused": 0,
            "mlflow_run_id": "r", "experiment": "e"}
    text = to_markdown(config, results, meta)
    assert "| blend † |" in text and "| badnet |" in text
    # The average covers the implanted row only: 90.0 for BaDExpert and 70.0 for SCALE-UP, not 70.0 / 40.0.
    average = next(line for line in text.splitlines() if line.startswith("| **average** |"))
    assert [c.strip() for c in average.split("|")[2:-1]] == ["90.0", "95.0", "90.0", "90.0", "70.0"]


def test_free_form_labels_become_valid_metric_names() -> None:
    from mlflow.utils.validation import _validate_metric_name

    from bdray.results import metric_name

    name = metric_name("badexpert_adap.l1=10 l2=0.5 (no B' term).badexpert.auroc")
    assert name == "badexpert_adap.l1_10 l2_0.5 _no B_ term_.badexpert.auroc"
    _validate_metric_name(name)  # raises on a name MLflow refuses


def test_a_partial_run_replaces_its_own_section_and_keeps_the_others(tmp_path):
    config = load_results(_results_file(tmp_path, {"det": {**DETECTION, "repairs": {}}, "adv": POISONED}))
    cell = {"auroc": 0.9, "defended_ca": 0.8, "defended_asr": 0.1, "model_ca": 0.9, "model_asr": 0.95}
    meta = {"command": "bdray results x --only det", "date": "d1", "git_commit": "c", "seconds": 60, "computed": 1,
            "reused": 0, "mlflow_run_id": "run1", "experiment": "e"}
    first = to_markdown(config, {"det": {"badnet": {"badexpert": cell, "strip": cell, "scale_up": cell}}}, meta)
    assert list(report_sections(first)) == ["det"] and "Not yet run: adv." in first
    # A stale section of a table the results file no longer has is dropped; det's is replaced.
    stale = first + "\n<!-- bdray results table: gone -->\n## gone\n"
    again = to_markdown(
        config, {"det": {"badnet": {"badexpert": {**cell, "auroc": 0.5}, "strip": cell, "scale_up": cell}}},
        {**meta, "mlflow_run_id": "run2"}, previous=stale,
    )
    sections = report_sections(again)
    assert list(sections) == ["det"] and "run2" in sections["det"] and "run1" not in again
    assert "| badnet | 90.0 | 95.0 | 50.0 |" in sections["det"]
