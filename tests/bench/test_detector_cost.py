"""bench/detector_cost.py on tiny inputs: it runs end to end and its JSON line carries the shared-prefix
filter's figures beside the plain filter's (the numbers themselves are only meaningful at full size)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("detector_cost", ROOT / "bench" / "detector_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_run_reports_the_shared_prefix_filter(capsys: pytest.CaptureFixture) -> None:
    tiny = [
        "--inputs",
        "24",
        "--clean",
        "24",
        "--train-size",
        "64",
        "--image-size",
        "12",
        "--width",
        "4",
        "--repeats",
        "1",
        "--strip-n",
        "2",
        "--trainable-blocks",
        "1",
    ]
    result = load_bench().main(tiny)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result and line["bench"] == "detector_cost"
    for key in (
        "filter",
        "filter_throughput_vs_M",
        "filter_shared",
        "filter_shared_throughput_vs_M",
        "filter_shared_speedup_vs_filter",
    ):
        assert line[key] > 0, key
    assert line["trainable_blocks"] == 1 and line["blocks"] == 4
    assert 1.0 < line["filter_shared_flops_vs_M"] < 1.05  # only the linear heads run three times


def test_k_that_shares_nothing_is_refused_before_any_work(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        load_bench().main(["--trainable-blocks", "4"])
    assert "--trainable-blocks must be in 1..3" in capsys.readouterr().err
