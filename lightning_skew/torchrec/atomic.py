"""Atomic checkpoint directories: written aside, sealed by a record of every file, swapped into place at once.

A save of ``<dir>/<name>`` (``last.ckpt``, ``epoch=0-step=5.ckpt``) writes a fresh hidden directory
``<dir>/.<name>.<token>``, records the size of every file in ``complete.json`` last, and only then puts it in
place: a rename when ``<name>`` is new, an atomic exchange of the two directories (Linux ``renameat2`` with
``RENAME_EXCHANGE``) when it replaces an earlier version, which is deleted after. A reader sees the previous
complete checkpoint or the new complete one, never a mix, and ``<name>`` never disappears. A checkpoint whose
record is missing or whose files differ from it is refused; ``last`` falls back to the newest complete
checkpoint beside it, naming what it skipped, and so does ``ckpt_path="last"`` where no ``last.ckpt`` was ever
completed (:func:`resolve_last`). Hidden directories that an interrupted save left are removed by the next save of
the same name.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["COMPLETE_FILE", "SAVE_HOOKS", "IncompleteCheckpointError", "complete_checkpoints", "incomplete_reason",
           "publish", "remove", "resolve_for_loading", "resolve_last", "staging_dir"]

COMPLETE_FILE = "complete.json"
_LAST = re.compile(r"^last(-v?\d+)?\.ckpt$")

#: Called with the stage of a save (``"tensors_written"``, ``"meta_written"``, ``"sealed"``, ``"published"``)
#: and the checkpoint path, on every rank that reaches it: tests kill a process at a chosen moment of a save.
SAVE_HOOKS: list[Callable[[str, Path], None]] = []


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint that an interrupted save left, or whose files changed since it was written."""


def reached(stage: str, path: Path) -> None:
    for hook in SAVE_HOOKS:
        hook(stage, path)


def staging_dir(path: Path) -> Path:
    """A fresh hidden directory beside ``path`` for the files of its next version (rank zero calls it); the
    leftovers of interrupted saves of the same name go."""
    if path.parent.is_dir():
        for leftover in path.parent.glob(f".{glob_escape(path.name)}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}"


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (``renameat2(RENAME_EXCHANGE)``); ``False`` where the system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    except (OSError, AttributeError):
        return False
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, f"exchanging {a} and {b}: {os.strerror(error)}")


def seal(directory: Path) -> None:
    """Record every file's size in ``complete.json``, written last and atomically."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != COMPLETE_FILE}
    tmp = directory / (COMPLETE_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, directory / COMPLETE_FILE)


def publish(path: Path, directory: Path) -> None:
    """Seal ``directory`` and put it in place as ``path``; the version it replaces is deleted afterwards."""
    seal(directory)
    reached("sealed", path)
    if not path.exists():
        os.rename(directory, path)
    elif not exchange(directory, path):
        # No atomic exchange on this file system: for a moment between the two renames ``path`` is absent.
        aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, aside)
        os.rename(directory, path)
        directory = aside
    reached("published", path)
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)


def incomplete_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete checkpoint (``None`` when it is)."""
    directory = Path(path)
    if not directory.is_dir():
        return "it does not exist" if not directory.exists() else "it is not a directory"
    record = directory / COMPLETE_FILE
    if not record.is_file():
        if (directory / "meta.pt").is_file():
            return None  # written by lightning-skew before checkpoints were sealed: meta.pt last was its marker
        return f"it has no {COMPLETE_FILE}: the save that wrote it was interrupted"
    for name, size in json.loads(record.read_text())["files"].items():
        file = directory / name
        if not file.is_file():
            return f"its file {name} is missing"
        if file.stat().st_size != size:
            return f"its file {name} has {file.stat().st_size} bytes, {size} were written"
    return None


def _step(path: Path) -> tuple[int, float]:
    match = re.search(r"step=(\d+)", path.name)
    return (int(match.group(1)) if match else -1, path.stat().st_mtime)


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, newest first (by step in the name, then time)."""
    found = [p for p in directory.glob("*.ckpt") if incomplete_reason(p) is None]
    return sorted(found, key=_step, reverse=True)


def resolve_for_loading(path: str | os.PathLike) -> Path:
    """``path`` when it is complete; for ``last`` the newest complete checkpoint beside it (with a warning that
    names what was skipped); else an :class:`IncompleteCheckpointError` naming it and the complete ones."""
    path = Path(path)
    reason = incomplete_reason(path)
    if reason is None:
        return path
    others = [p for p in complete_checkpoints(path.parent) if p != path]
    if _LAST.match(path.name) and others:
        rank_zero_warn(f"{path} is not a complete checkpoint ({reason}); resuming from the newest complete one, "
                       f"{others[0]}, instead")
        return others[0]
    listed = ", ".join(str(p) for p in others[:5]) or "none"
    raise IncompleteCheckpointError(f"{path} is not a complete checkpoint: {reason}. Complete checkpoints beside "
                                    f"it: {listed}")


def resolve_last(directories: Iterable[str | os.PathLike]) -> Path | None:
    """What ``ckpt_path="last"`` should load from these checkpoint folders when Lightning would find nothing.

    Lightning's ``"last"`` looks only for ``last*.ckpt`` and, finding none, warns and starts afresh: after a kill
    during the very first save of ``last.ckpt`` (which leaves only its hidden staging folder), or with
    ``save_last`` off, a resumed run would silently train again from step 0. This gives the newest complete
    checkpoint in ``directories`` instead (by step, then time: sealed checkpoint folders, and checkpoint files,
    which Lightning writes atomically), with a warning naming what it skipped.

    Returns ``None`` when a ``last*.ckpt`` is there (Lightning takes it, and an incomplete one falls back when it
    is loaded, see :func:`resolve_for_loading`) or when there is no complete checkpoint at all.
    """
    folders = [Path(d) for d in directories if Path(d).is_dir()]
    if any(_LAST.match(p.name) for folder in folders for p in folder.glob("*.ckpt")):
        return None
    found, incomplete = [], []
    for path in (p for folder in folders for p in folder.glob("*.ckpt") if not p.name.startswith(".")):
        reason = None if path.is_file() else incomplete_reason(path)
        (found if reason is None else incomplete).append(path if reason is None else f"{path.name} ({reason})")
    if not found:
        return None
    chosen = max(found, key=_step)
    left = sorted(p.name for folder in folders for p in folder.glob(".last*.ckpt.*"))
    skipped = (f"the interrupted first save of last.ckpt left only {', '.join(left)}" if left
               else "none was saved: is save_last off?")
    skipped += f"; skipped as incomplete: {', '.join(incomplete)}" if incomplete else ""
    rank_zero_warn(f'ckpt_path="last": no last.ckpt in {", ".join(str(f) for f in folders)} ({skipped}); resuming '
                   f"from the newest complete checkpoint, {chosen}, instead")
    return chosen


def remove(path: str | os.PathLike) -> None:
    """Delete a checkpoint (a directory or a file)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
