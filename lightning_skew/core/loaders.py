"""Views of a training loader that a strategy hands to Lightning's loop: the inner loader's length, sampler and
every other attribute, with each batch passed through a function of the strategy's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["LoaderView", "MappedLoader"]


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


class MappedLoader(LoaderView):
    """``loader`` with every batch replaced by ``transform(batch)`` as it is read (in the process that reads it,
    before Lightning moves the batch to the device)."""

    def __init__(self, loader: Any, transform: Callable[[Any], Any]) -> None:
        super().__init__(loader)
        self.__dict__["_transform"] = transform

    def __iter__(self) -> Iterator[Any]:
        transform = self._transform
        for batch in self.loader:
            yield transform(batch)
