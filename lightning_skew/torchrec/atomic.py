"""Atomic checkpoint directories: written aside, sealed by a record of every file, swapped into place at once.

A save of ``<dir>/<name>`` (``last.ckpt``, ``epoch=0-step=5.ckpt``) writes a fresh hidden directory
``<dir>/.<name>.<token>`` (marked as a staging directory by a file inside it), records the size and CRC-32 of every
file in ``complete.json`` last, and only then puts it in place: a rename when ``<name>`` is new, an atomic exchange
of the two directories (Linux ``renameat2`` with ``RENAME_EXCHANGE``) when it replaces an earlier version, which is
deleted after. A reader sees the previous complete checkpoint or the new complete one, never a mix, and ``<name>``
never disappears. A checkpoint whose record is missing or whose files differ from it (in size or in content) is
refused, naming the file; ``last`` falls back to the newest complete checkpoint beside it, naming what it skipped,
and so does ``ckpt_path="last"`` where no ``last.ckpt`` was ever completed (:func:`resolve_last`). Staging
directories that an interrupted save left are removed by the next save of the same name; only directories that
carry the staging mark are touched, whatever their names.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["COMPLETE_FILE", "SAVE_HOOKS", "STAGING_MARK", "IncompleteCheckpointError", "complete_checkpoints",
           "file_checksum", "incomplete_reason", "publish", "remove", "resolve_for_loading", "resolve_last",
           "staging_dir", "unverified_reason"]

COMPLETE_FILE = "complete.json"
#: The file that marks a directory as a staging directory of this package (it holds the directory's own name).
STAGING_MARK = ".lightning-skew-staging"
_CHUNK = 8 << 20
_LAST = re.compile(r"^last(-v?\d+)?\.ckpt$")

#: Called with the stage of a save (``"tensors_written"``, ``"meta_written"``, ``"sealed"``, ``"published"``)
#: and the checkpoint path, on every rank that reaches it: tests kill a process at a chosen moment of a save.
#: ``"staged"`` is called with the staging directory, before anything is written into it.
SAVE_HOOKS: list[Callable[[str, Path], None]] = []


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint that an interrupted save left, or whose files changed since it was written."""


def reached(stage: str, path: Path) -> None:
    for hook in SAVE_HOOKS:
        hook(stage, path)


def staging_dir(path: Path) -> Path:
    """A fresh hidden directory beside ``path`` for the files of its next version, created and marked (rank zero
    calls it); the leftovers of interrupted saves of the same name go: only directories that carry the mark."""
    if path.parent.is_dir():
        for leftover in path.parent.glob(f".{glob_escape(path.name)}.*"):
            if _is_staging(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    directory = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}"
    directory.mkdir(parents=True)
    _mark(directory)
    return directory


def _mark(directory: Path) -> None:
    (directory / STAGING_MARK).write_text(directory.name)


def _is_staging(directory: Path) -> bool:
    """Whether ``directory`` is one this package made to stage a save (its mark names it: a copy under another
    name, or a folder of the user's, is not)."""
    mark = directory / STAGING_MARK
    try:
        return directory.is_dir() and not directory.is_symlink() and mark.read_text() == directory.name
    except OSError:
        return False


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


def file_checksum(path: Path) -> str:
    """The CRC-32 of a file's bytes, as 8 hex digits (zlib's: several GB/s; it finds corruption, not tampering)."""
    value = 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def seal(directory: Path) -> None:
    """Record every file's size and CRC-32 in ``complete.json``, written last and atomically (the staging mark is
    no part of the checkpoint)."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "crc32": file_checksum(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (COMPLETE_FILE, STAGING_MARK)}
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
    (path / STAGING_MARK).unlink(missing_ok=True)  # in place: no longer a staging directory
    if directory.exists():
        _mark(directory)  # the replaced version: if this process dies now, the next save removes it
        shutil.rmtree(directory, ignore_errors=True)


def _record(directory: Path) -> dict[str, dict[str, object]] | None:
    """The seal's files as ``{name: {"bytes": n[, "crc32": hex]}}`` (older seals hold sizes only); ``None``
    without a seal."""
    record = directory / COMPLETE_FILE
    if not record.is_file():
        return None
    files = json.loads(record.read_text())["files"]
    return {name: entry if isinstance(entry, dict) else {"bytes": entry} for name, entry in files.items()}


def _legacy(directory: Path) -> bool:
    # Written by lightning-skew before checkpoints were sealed: meta.pt, written last, was its marker.
    return directory.is_dir() and not (directory / COMPLETE_FILE).is_file() and (directory / "meta.pt").is_file()


def incomplete_reason(path: str | os.PathLike, contents: bool = True) -> str | None:
    """Why ``path`` is not a complete checkpoint (``None`` when it is): no seal, a file missing, of another size,
    or (with ``contents``: each file is read) of other contents than the seal records."""
    directory = Path(path)
    if not directory.is_dir():
        return "it does not exist" if not directory.exists() else "it is not a directory"
    try:
        files = _record(directory)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its {COMPLETE_FILE} is unreadable ({type(error).__name__})"
    if files is None:
        if _legacy(directory):
            return f"it has no {COMPLETE_FILE} (written before lightning-skew sealed its checkpoints), so it is unverified"
        return f"it has no {COMPLETE_FILE}: the save that wrote it was interrupted"
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            return f"its file {name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"its file {name} has {file.stat().st_size} bytes, {entry['bytes']} were written"
        if contents and "crc32" in entry and file_checksum(file) != entry["crc32"]:
            return (f"its file {name} is corrupt: its checksum (CRC-32 {file_checksum(file)}) differs from the one "
                    f"recorded when it was written ({entry['crc32']})")
    return None


def unverified_reason(path: str | os.PathLike) -> str | None:
    """Why a loadable checkpoint's contents could not be checked (no seal, or a seal of sizes only), else ``None``."""
    directory = Path(path)
    if _legacy(directory):
        return f"it has no {COMPLETE_FILE} (written before lightning-skew sealed its checkpoints)"
    files = _record(directory) if directory.is_dir() else None
    if files is not None and any("crc32" not in entry for entry in files.values()):
        return f"its {COMPLETE_FILE} records sizes only (written by an older lightning-skew)"
    return None


def _step(path: Path) -> tuple[int, float]:
    match = re.search(r"step=(\d+)", path.name)
    return (int(match.group(1)) if match else -1, path.stat().st_mtime)


def complete_checkpoints(directory: Path) -> list[Path]:
    """The sealed checkpoints in ``directory`` whose files are all there in their sizes, newest first (by step in
    the name, then time). Their contents are checked when one is loaded."""
    found = [p for p in directory.glob("*.ckpt") if incomplete_reason(p, contents=False) is None]
    return sorted(found, key=_step, reverse=True)


def resolve_for_loading(path: str | os.PathLike) -> Path:
    """``path`` when it is complete (its contents checked); for ``last`` the newest complete checkpoint beside it
    (with a warning that names what was skipped); else an :class:`IncompleteCheckpointError` naming it, why, and the
    complete ones. A checkpoint without a seal (older versions) loads with a warning that it is unverified."""
    path = Path(path)
    reason = incomplete_reason(path)
    if reason is None or _legacy(path):
        unverified = unverified_reason(path)
        if unverified:
            rank_zero_warn(f"{path} is loaded unverified: {unverified}; its contents cannot be checked")
        return path
    others = [p for p in complete_checkpoints(path.parent) if p != path]
    if _LAST.match(path.name):
        skipped = []
        for other in others:
            other_reason = incomplete_reason(other)
            if other_reason is None:
                rank_zero_warn(f"{path} is not a complete checkpoint ({reason}); resuming from the newest complete "
                               f"one, {other}, instead" + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
                return other
            skipped.append(f"{other.name}: {other_reason}")
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
        reason = None if path.is_file() else incomplete_reason(path, contents=False)
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
