"""``ckpt_path="last"`` that resumes from the newest complete checkpoint, as a property of the strategy.

Lightning's ``"last"`` looks only for ``last*.ckpt`` and, finding none, warns and starts afresh: after a kill during
the very first save of ``last.ckpt`` (which leaves only its hidden staging folder), or with ``save_last`` off, a
resumed run would train again from step 0. :func:`resolve_last_for` gives the newest complete checkpoint of the
Trainer's checkpoint folders instead (see :func:`~lightning_skew.torchrec.atomic.resolve_last`); the strategies
(:class:`~lightning_skew.TorchRecStrategy` and its subclasses) apply it to every ``trainer.fit`` / ``validate`` /
``test`` / ``predict`` call through their launcher, and the ``lightning-skew`` command calls it for any strategy.
A ``last.ckpt`` that is there but incomplete falls back when the strategy loads it
(:func:`~lightning_skew.torchrec.atomic.resolve_for_loading`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from lightning_skew.torchrec.atomic import resolve_last

__all__ = ["checkpoint_folders", "resolve_last_for", "resolving_last"]


def checkpoint_folders(trainer: Any) -> list[Path]:
    """The folders the Trainer's ``ModelCheckpoint`` callbacks write to: each one's ``dirpath``, or, where it gives
    none and the Trainer has no logger, ``<default_root_dir>/checkpoints`` (where Lightning puts them then; with a
    logger each run gets a new version folder, so an earlier run's checkpoints are not this run's)."""
    folders = []
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is not None:
            folders.append(Path(callback.dirpath))
        elif not trainer.loggers:
            folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return folders


def resolve_last_for(trainer: Any, ckpt_path: Any) -> Any:
    """``ckpt_path`` as the Trainer should load it: for ``"last"`` where no ``last*.ckpt`` is there, the newest
    complete checkpoint of :func:`checkpoint_folders` (with a warning naming what was skipped); else unchanged."""
    if ckpt_path != "last" or trainer is None:
        return ckpt_path
    chosen = resolve_last(checkpoint_folders(trainer))
    return ckpt_path if chosen is None else str(chosen)


class _ResolvesLast:
    """Resolves a ``ckpt_path="last"`` argument of the launched Trainer function before it runs."""

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        try:
            bound = inspect.signature(function).bind_partial(*args, **kwargs)
        except (TypeError, ValueError):
            bound = None
        if bound is not None and bound.arguments.get("ckpt_path") == "last":
            bound.arguments["ckpt_path"] = resolve_last_for(trainer, "last")
            args, kwargs = bound.args, bound.kwargs
        return super().launch(function, *args, trainer=trainer, **kwargs)


class _Direct(_Launcher):
    """Runs the Trainer function in this process, as Lightning does for a strategy without a launcher."""

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    def kill(self, signum: Any) -> None:
        pass


class _InProcess(_ResolvesLast, _Direct):
    pass


class _SubprocessScriptResolvingLast(_ResolvesLast, _SubprocessScriptLauncher):
    pass


class _MultiProcessingResolvingLast(_ResolvesLast, _MultiProcessingLauncher):
    pass


# Module-level classes, so that a launcher pickled into spawned processes is found again.
_RESOLVING = {_SubprocessScriptLauncher: _SubprocessScriptResolvingLast,
              _MultiProcessingLauncher: _MultiProcessingResolvingLast}


def resolving_last(launcher: _Launcher | None) -> _Launcher | None:
    """``launcher`` (or an in-process one for ``None``) that resolves ``ckpt_path="last"`` with
    :func:`resolve_last_for`; a launcher of another kind is returned as it is.

    Lightning picks the checkpoint of ``"last"`` in its private checkpoint connector, before any strategy hook runs;
    the launcher is the one part of a strategy that sees the Trainer function's arguments first (Lightning calls
    ``strategy.launcher.launch(trainer._fit_impl, ..., ckpt_path, trainer=trainer)``). The launcher keeps its class
    (Lightning tests ``isinstance(launcher, _SubprocessScriptLauncher)`` to stop child processes): it is copied into
    an instance of a subclass of it that resolves the argument and then launches as before.
    """
    if launcher is None:
        return _InProcess()
    resolving = _RESOLVING.get(type(launcher))
    if resolving is None:
        return launcher
    copy = object.__new__(resolving)  # the same state, in the subclass
    copy.__dict__.update(vars(launcher))
    return copy
