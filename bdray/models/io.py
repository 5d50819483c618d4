"""Model weights in and out, without ever unpickling code.

A suspect model comes from the attacker, so a checkpoint is either safetensors or a torch file
read with ``weights_only=True``; anything that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bdray.atomic import atomic_directory, atomic_write  # noqa: F401  (re-exported)


class UnsafeCheckpointError(ValueError):
    """The checkpoint holds something other than plain tensors (e.g. pickled code)."""


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or a torch checkpoint (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"checkpoint {path}: not a valid safetensors file ({exc})") from None
        return _strip_ddp_prefix(obj)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint {path} was refused: it holds objects beyond plain tensors, which would run "
            f"code when unpickled. Save a state_dict (or safetensors) instead. ({str(exc).splitlines()[0]})"
        ) from None
    except Exception as exc:
        raise ValueError(f"checkpoint {path}: cannot be read as a torch state_dict ({exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnsafeCheckpointError(f"checkpoint {path}: expected a dict of tensors (a state_dict)")
    return _strip_ddp_prefix(obj)


def _strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel/DDP checkpoints prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into ``model``; a backbone-only state_dict (no normalization) also fits."""
    state = load_state_dict(path)
    own = model.state_dict()
    if not any(k.startswith("backbone.") for k in state) and any(k.startswith("backbone.") for k in own):
        state = {f"backbone.{k}": v for k, v in state.items()}
        state.setdefault("mean", own["mean"])
        state.setdefault("std", own["std"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit the configured model: {str(exc)[:400]}") from None
    return model
