"""One training loop for every stage: the backdoored model, the expert, the auxiliary model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bdray.data.base import ImageSet
from bdray.train.recipe import Augment, TrainRecipe

EpochCallback = Callable[[int, dict[str, float]], None]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]; models normalize internally."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def augment_batch(x: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip, drawn per sample from ``generator``."""
    b, _, h, w = x.shape
    if augment.crop_padding:
        p = augment.crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b)[:, None, None, None]
        chans = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if augment.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def iterate_batches(
    n: int, batch_size: int, generator: torch.Generator | None, *, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if (drop_last and n > batch_size) else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def fit(
    model: nn.Module,
    data: ImageSet,
    recipe: TrainRecipe,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    on_epoch: EpochCallback | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``data`` following ``recipe``; returns the model.

    Shuffling and augmentation draw from a generator seeded with ``seed``, so one process on the
    CPU reproduces a run bit for bit.
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(data.images)
    labels = (torch.from_numpy(data.labels) + recipe.label_shift) % data.num_classes
    model.to(device).train()
    optimizer = recipe.make_optimizer(model.parameters())
    steps = -(-len(data) // recipe.batch_size)
    scheduler = recipe.make_scheduler(optimizer, steps)
    for epoch in range(recipe.epochs):
        total_loss, correct, seen = 0.0, 0, 0
        for idx in iterate_batches(len(data), recipe.batch_size, generator):
            x = augment_batch(to_float(images[idx]), recipe.augment, generator).to(device)
            y = labels[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        if on_epoch is not None:
            on_epoch(epoch, {"loss": total_loss / seen, "train_acc": correct / seen})
    return model


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: np.ndarray | torch.Tensor, *, batch_size: int = 1000, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Softmax outputs (N, C) of ``model`` in eval mode, for uint8 or float images."""
    model.to(device).eval()
    images = torch.as_tensor(images)
    out = [
        F.softmax(model(to_float(images[s : s + batch_size]).to(device)).float(), dim=1).cpu()
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def finetune_copy(
    model: nn.Module, data: ImageSet, recipe: TrainRecipe, *, seed: int, on_epoch: EpochCallback | None = None
) -> nn.Module:
    """Finetune a deep copy of ``model``; the original stays untouched."""
    return fit(copy.deepcopy(model), data, recipe, seed=seed, on_epoch=on_epoch)
