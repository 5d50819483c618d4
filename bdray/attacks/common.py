"""Helpers the attack families share: per-sample randomness, cover selection, generated patterns.

Every per-sample draw derives from ``(attack seed, salt, dataset index)``: a batch gives the same
pixels as one-by-one calls, and a planned (lazy) poisoning reproduces a materialized one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

# Salts keep the streams of one attack apart (the poison trigger, the cover trigger, the plan).
SALT_TRIGGER = 1
SALT_COVER = 2
SALT_PLAN = 3


def sample_rngs(seed: int, index: torch.Tensor | None, n: int, salt: int) -> list[np.random.Generator]:
    """One generator per sample, seeded by (seed, salt, index); no index means index 0 for all.

    Without an index every sample gets the same draw, so batched and single calls still agree.
    """
    positions = [0] * n if index is None else [int(i) for i in index.reshape(-1).tolist()]
    if len(positions) != n:
        raise ValueError(f"index has {len(positions)} entries for {n} images")
    return [np.random.default_rng([seed, salt, p]) for p in positions]


def per_sample(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Run ``fn`` on each (1, C, H, W) slice and stack the results.

    Convolutions may pick batch-size dependent kernels whose float sums differ in the last bit;
    running a network one sample at a time makes a batched trigger equal one-by-one calls exactly.
    """
    if len(images) == 0:
        return fn(images)
    return torch.cat([fn(images[i : i + 1]) for i in range(len(images))])


def draw_cover(
    labels: np.ndarray, seed: int, poison: np.ndarray, rate: float, allowed: np.ndarray | None = None
) -> np.ndarray:
    """Seeded, sorted cover indices: ``round(rate * N)`` samples outside ``poison`` (and inside ``allowed``)."""
    n = round(rate * len(labels))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    free = np.ones(len(labels), dtype=bool)
    free[poison] = False
    if allowed is not None:
        free &= allowed
    candidates = np.flatnonzero(free)
    if n > len(candidates):
        raise ValueError(f"attack.cover_rate {rate} asks for {n} cover samples but only {len(candidates)} are free")
    return np.sort(np.random.default_rng([seed, SALT_PLAN]).choice(candidates, size=n, replace=False)).astype(
        np.int64
    )


def watermark_mask(size: int) -> np.ndarray:
    """A ring around a filled centre dot on a (size, size) grid: a watermark-like stamp outline."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    return ((r <= 1.0) & (r >= 0.6) | (r <= 0.3)).astype(np.float32)


def logo_pattern(size: int, channels: int, seed: int) -> np.ndarray:
    """A seeded high-contrast (C, size, size) pattern in {0, 1}; stands in for downloadable logos.

    Neighbouring pixels alternate on a checker base so the pattern has edges at any seed; the seed
    flips a quarter of the cells, giving each seed its own pattern.
    """
    checker = (np.indices((size, size)).sum(0) % 2).astype(np.float32)
    flips = np.random.default_rng([seed, 0x10C0]).random((channels, size, size)) < 0.25
    return np.abs(checker[None] - flips).astype(np.float32)


@contextlib.contextmanager
def torch_seed(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator inside the block and restore it afterwards.

    Module constructors draw their initial weights from the global generator; this keeps an
    attack's networks reproducible without disturbing the caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state as contiguous CPU tensors under ``prefix.``: safetensors-ready."""
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = f"{prefix}."
    return {k[len(start) :]: v for k, v in state.items() if k.startswith(start)}


class NotFittedError(RuntimeError):
    """An attack with a trained part was used before ``fit`` or ``load_state_dict``."""


def require_fitted(fitted: bool, name: str) -> None:
    if not fitted:
        raise NotFittedError(
            f"attack '{name}' has a trained part: call fit(clean_train_set, seed=...) or load_state_dict() first"
        )
