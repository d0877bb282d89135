"""A view of a training loader that a strategy hands to Lightning's loop: the inner loader's length, sampler and
every other attribute, iterated its own way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["LoaderView"]


class LoaderView:
    """A loader that is ``loader`` for every attribute (length, sampler, ``worker_init_fn``, ...); subclasses
    change only how it iterates."""

    def __init__(self, loader: Any) -> None:
        self.__dict__["loader"] = loader

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.loader, name, value)  # e.g. Lightning's worker_init_fn belongs to the inner loader
