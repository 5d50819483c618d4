"""Shared fixtures: one Ray session for the whole test run, and small configs on generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray of 2 logical CPUs, started once and shut down after the last test."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: CPU kernels reduce in a fixed order (bit-for-bit reruns),
    and on a shared 2-core machine more threads only add contention to tiny tensors."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def smoke_config(tmp_path: Path) -> dict:
    """configs/smoke.yaml as a dict, with its storage (stage cache + sqlite MLflow) under tmp_path."""
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw["storage"] = str(tmp_path / "store")
    return raw
