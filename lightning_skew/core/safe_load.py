"""Reading files that could have been written by anyone: no code from the file ever runs while it loads.

``torch.load(weights_only=True)`` builds tensors, containers and primitive values only; a pickle that names any
other callable (``os.system`` in a crafted ``__reduce__``) is refused before anything is called. The few other
types this project's files hold are admitted by name (:data:`SAFE_TYPES`). Where a library reads a file with plain
``pickle`` (``torch.distributed.checkpoint``'s ``.metadata``), :func:`restricted_load` admits only the classes
named for that file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["SAFE_TYPES", "UnsafeFileError", "load_data", "restricted_load"]


class UnsafeFileError(pickle.UnpicklingError):
    """A file names code to run (or a type that is not admitted) while it loads; it was not loaded."""


#: Types beyond tensors and primitives that this project's own files hold (a ``ShardedTensor``'s metadata is not
#: among them: sharded tensors travel through ``torch.distributed.checkpoint``).
SAFE_TYPES: list[Any] = [Path, type(Path())]


def _refusal(path: str | os.PathLike, what: str, detail: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path}: refused to load this {what}: it names something to call while loading that is not plain data "
        f"({detail}). A file written by lightning-skew never does; this one was changed or made elsewhere, and "
        "loading it could run code. Use a file you wrote, or re-create it.")


def load_data(path: str | os.PathLike | io.BytesIO, what: str = "file", map_location: Any = "cpu",
              name: str | os.PathLike | None = None) -> Any:
    """``torch.load`` of ``path`` with ``weights_only=True`` (and :data:`SAFE_TYPES` admitted).

    Args:
        path: the file (or a buffer).
        what: what the file is, for the error ("checkpoint", "sharding plan").
        map_location: as ``torch.load`` takes it.
        name: the name the error gives it (default ``path``).

    Raises:
        UnsafeFileError: the file names a callable or type that is not admitted (nothing was run), naming the file.
    """
    try:
        with torch.serialization.safe_globals(SAFE_TYPES):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" not in message:
            raise
        named = re.search(r"GLOBAL (\S+)", message)
        detail = f"{named.group(1)} is not admitted" if named else message.splitlines()[-1][:300]
        raise _refusal(path if name is None else name, what, detail) from None


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, allowed: Callable[[str, str], Any | None]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not admitted")
        return found


def restricted_load(path: str | os.PathLike, allowed: Iterable[tuple[str, str]] | Callable[[str, str], Any | None],
                    what: str = "file") -> Any:
    """Unpickle ``path`` admitting only the globals ``allowed``: ``(module, name)`` pairs, or a function of
    ``(module, name)`` that returns the object to admit or ``None``.

    Raises:
        UnsafeFileError: a global outside ``allowed`` (nothing of it was called), naming the file and the global.
    """
    if not callable(allowed):
        names = set(allowed)

        def allowed(module: str, name: str) -> Any | None:  # noqa: F811 - the pairs as a function
            if (module, name) not in names:
                return None
            return getattr(__import__(module, fromlist=[name]), name)

    with open(path, "rb") as file:
        try:
            return _AllowListUnpickler(file, allowed).load()
        except pickle.UnpicklingError as error:
            if "is not admitted" in str(error):
                raise _refusal(path, what, str(error)) from None
            raise
