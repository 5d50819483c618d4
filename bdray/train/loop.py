"""One training loop for every stage: the backdoored model, the expert, the auxiliary model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bdray.data.base import ImageSet
from bdray.models.blocks import freeze_prefix, prefix_eval
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


def epoch_order(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The global sample order of one epoch: the same on every worker, and after a restart."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def worker_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Indices of this worker's part of each global batch (DDP splits every global batch evenly).

    ``batch_size`` is the global batch: a 2-worker run and a 1-worker run see the same samples per
    step, so their averaged gradients agree.
    """
    order = epoch_order(n, seed=seed, epoch=epoch)
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        if len(batch) < world_size:  # a worker with no samples would stall the all-reduce
            break
        yield batch[rank::world_size]


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss_sum / max(self.seen, 1), "train_acc": self.correct / max(self.seen, 1)}


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    recipe: TrainRecipe,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over ``batches`` of (uint8 images, labels already mapped); shared by every trainer."""
    stats = EpochStats()
    model.train()
    # A frozen prefix runs as at inference: its BatchNorm statistics stay M's (DDP wraps the model).
    prefix_eval(getattr(model, "module", model), recipe.trainable_blocks)
    device = torch.device(device)
    for step, (images, labels) in enumerate(batches):
        if on_step is not None:
            on_step(step)
        x = augment_batch(to_float(images), recipe.augment, generator).to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        stats.loss_sum += loss.item() * len(y)
        stats.correct += int((logits.argmax(1) == y).sum())
        stats.seen += len(y)
    return stats


def augment_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + rank + 1)


def fit(
    model: nn.Module,
    data: ImageSet,
    recipe: TrainRecipe,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    on_epoch: EpochCallback | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``data`` following ``recipe`` in this process; returns the model.

    Sample order and augmentation derive from (seed, epoch), so a run is reproducible bit for bit
    on the CPU and matches a 1-worker Ray Train run of the same recipe.
    """
    images = torch.from_numpy(data.images)
    labels = (torch.from_numpy(data.labels) + recipe.label_shift) % data.num_classes
    model.to(device)
    flags = [p.requires_grad for p in model.parameters()]
    optimizer = recipe.make_optimizer(freeze_prefix(model, recipe.trainable_blocks))
    scheduler = recipe.make_scheduler(optimizer, -(-len(data) // recipe.batch_size))
    try:
        for epoch in range(recipe.epochs):
            batches = ((images[i], labels[i])
                       for i in worker_batches(len(data), recipe.batch_size, seed=seed, epoch=epoch))
            stats = train_epoch(model, optimizer, scheduler, batches, recipe,
                                generator=augment_generator(seed, epoch), device=device)
            if on_epoch is not None:
                on_epoch(epoch, stats.as_dict())
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):  # the model leaves as it came
            p.requires_grad_(flag)
    return model


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: np.ndarray | torch.Tensor, *, batch_size: int = 1000, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Softmax outputs (N, C) of ``model`` in eval mode, for uint8 or float images."""
    model.to(device).eval()

    def rows(s: int) -> torch.Tensor:
        chunk = images[s : s + batch_size]
        # Stage artifacts are read-only memory maps, which torch will not wrap: copy one batch at a time.
        return torch.from_numpy(np.array(chunk)) if isinstance(chunk, np.ndarray) else chunk

    out = [F.softmax(model(to_float(rows(s)).to(device)).float(), dim=1).cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def finetune_copy(
    model: nn.Module, data: ImageSet, recipe: TrainRecipe, *, seed: int, on_epoch: EpochCallback | None = None
) -> nn.Module:
    """Finetune a deep copy of ``model``; the original stays untouched."""
    return fit(copy.deepcopy(model), data, recipe, seed=seed, on_epoch=on_epoch)
