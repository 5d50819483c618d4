"""Name -> builder registries shared by datasets, attacks, models and defenses.

Each registry also accepts an import path ``pkg.module:Name`` so a user's own component plugs in
without touching bdray (the same shape torchvision's ``get_model`` and timm's ``create_model`` use).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders. Duplicate names raise; unknown names list what exists."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return _import_path(name, self.kind)
        raise KeyError(
            f"unknown {self.kind} '{name}'; expected one of: {', '.join(sorted(self._entries))}"
            " (or an import path 'package.module:Name')"
        )

    def names(self, include: str = "*", exclude: str | None = None) -> list[str]:
        return sorted(
            n for n in self._entries if fnmatch(n, include) and not (exclude and fnmatch(n, exclude))
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _import_path(path: str, kind: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KeyError(f"{kind} import path '{path}': cannot import module '{module_name}' ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise KeyError(f"{kind} import path '{path}': module '{module_name}' has no attribute '{attr}'") from None
