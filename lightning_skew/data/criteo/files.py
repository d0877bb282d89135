"""Criteo files: opening them (plain or gzip), resolving the paths given, and reading their lines in order."""

from __future__ import annotations

import glob
import gzip
import os
import re
import zlib
from collections.abc import Callable, Sequence
from itertools import islice
from typing import IO, TypeVar

_GZIP_MAGIC = b"\x1f\x8b"


def open_criteo_file(path: str) -> IO[bytes]:
    """Open a Criteo TSV file for reading bytes, gunzipping it when it is gzip (``.gz`` or magic bytes)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if path.endswith(".gz") or magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


# What reading a truncated or damaged gzip file raises (EOFError: the stream ends before its end marker).
DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error)
T = TypeVar("T")


def damaged_file_error(path: str, error: BaseException) -> ValueError:
    """An error naming ``path`` and the last line that could be read before ``error`` (the file is read again to
    find it: only on this error path)."""
    lines = 0
    try:
        with open_criteo_file(path) as handle:
            for _ in handle:
                lines += 1
    except DAMAGED:
        pass
    return ValueError(f"{path}: the file ends early or is damaged after line {lines} ({type(error).__name__}: "
                      f"{error}); a truncated copy or download? Copy it again")


def _natural_key(text: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _expand(path: str) -> list[str]:
    if os.path.isdir(path):
        names = [n for n in os.listdir(path) if not n.startswith(".")]
        return sorted((os.path.join(path, n) for n in names), key=_natural_key)
    if glob.has_magic(path):
        return sorted(glob.glob(path), key=_natural_key)
    return [path]


def resolve_tsv_paths(paths: Sequence[str] | str, what: str = "paths") -> list[str]:
    """Files named by ``paths`` (files, directories or globs), in order; raises if none or one is missing.

    A directory stands for every non-hidden file in it except ``.npy``/``.npz`` files, in natural
    order (``day_2`` before ``day_10``).
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError(f"{what}: expected at least one Criteo TSV file, got an empty list")
    files: list[str] = []
    for path in paths:
        expanded = _expand(path)
        if os.path.isdir(path):
            expanded = [p for p in expanded if os.path.isfile(p) and not p.endswith((".npy", ".npz"))]
        if not expanded:
            raise FileNotFoundError(f"{what}: {path!r} matches no file")
        for file in expanded:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{what}: Criteo file {file!r} does not exist")
        files.extend(expanded)
    return files


_NPY_PARTS = ("dense", "sparse", "labels")
_NPY_SUFFIX = re.compile(r"_(dense|sparse|labels)(_contig)?\.npy$")


def resolve_npy_days(paths: Sequence[str] | str, what: str = "paths") -> list[tuple[str, str, str]]:
    """``(dense, sparse, labels)`` npy files of each day named by ``paths``, in order.

    An entry may be a day's prefix (``/data/day_0``), any of its three files
    (``/data/day_0_dense.npy``), a directory (every ``day_*_dense.npy`` in it, in day order) or a glob
    over dense files. Raises if nothing is named or a file is missing.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError(f"{what}: expected at least one TorchRec npy day, got an empty list")
    days: list[tuple[str, str, str]] = []
    for path in paths:
        if os.path.isdir(path):
            entries = sorted(glob.glob(os.path.join(path, "day_*_dense.npy")), key=_natural_key)
        elif glob.has_magic(path):
            entries = sorted(glob.glob(path), key=_natural_key)
        else:
            entries = [path]
        if not entries:
            raise FileNotFoundError(f"{what}: {path!r} names no day_*_dense.npy file")
        for entry in entries:
            prefix = _NPY_SUFFIX.sub("", entry)
            files = tuple(f"{prefix}_{part}.npy" for part in _NPY_PARTS)
            for file in files:
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"{what}: TorchRec npy file {file!r} does not exist")
            days.append(files)  # type: ignore[arg-type]
    return days


def check_has_lines(files: Sequence[str], what: str = "paths") -> None:
    """Raise a clear error for a file that holds no line (an empty or truncated download): reading nothing from
    it would train zero steps or validate on nothing without a word. Reads one line of each file."""
    for file in files:
        with open_criteo_file(file) as handle:
            try:
                first = handle.readline()
            except DAMAGED as error:
                raise damaged_file_error(file, error) from None
            if first.startswith(b"\xef\xbb\xbf"):
                raise ValueError(f"{what}: Criteo file {file!r} starts with a UTF-8 byte order mark (BOM), which "
                                 "Criteo's TSV format does not have; remove it (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//'`)")
            if not first:
                raise ValueError(
                    f"{what}: Criteo file {file!r} holds no lines (an empty or truncated download?); "
                    f"replace it or leave it out of {what}"
                )


class _LineStream:
    """Lines of several files read in order, knowing the file and 1-based line number of each.

    Lines can be looked at before they are taken (:meth:`peek`), so a reader learns where the stream ends
    before it decides how to cut the lines it holds into batches.
    """

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)
        self._file_index = -1
        self._handle: IO[bytes] | None = None
        self._line_number = 0  # lines read so far from the current file
        self._buffer: list[bytes] = []  # lines read from the files, not yet taken or skipped
        self._origins: list[tuple[str, int, int]] = []  # (file, first line number, count) covering the buffer
        # (file, first line number, count) of the lines returned by the last take().
        self._segments: list[tuple[str, int, int]] = []

    def _next_file(self) -> bool:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._file_index + 1 >= len(self.files):
            self._file_index = len(self.files)
            return False
        self._file_index += 1
        self._handle = open_criteo_file(self.files[self._file_index])
        self._line_number = 0
        return True

    def _fill(self, count: int) -> None:
        """Read from the files until the buffer holds ``count`` lines or the last file ends."""
        while len(self._buffer) < count:
            if self._handle is None and not self._next_file():
                return
            assert self._handle is not None
            chunk = self._read(lambda handle: list(islice(handle, count - len(self._buffer))))
            if chunk:
                self._origins.append((self.files[self._file_index], self._line_number + 1, len(chunk)))
                self._buffer.extend(chunk)
                self._line_number += len(chunk)
            if len(self._buffer) < count and not self._next_file():
                return

    def _read(self, read: Callable[[IO[bytes]], T]) -> T:
        assert self._handle is not None
        try:
            return read(self._handle)
        except DAMAGED as error:
            raise damaged_file_error(self.files[self._file_index], error) from None

    def _pop(self, count: int) -> tuple[list[bytes], list[tuple[str, int, int]]]:
        self._fill(count)
        lines = self._buffer[:count]
        del self._buffer[:count]
        segments, left = [], len(lines)
        while left:
            file, first, size = self._origins[0]
            if size <= left:
                segments.append(self._origins.pop(0))
                left -= size
            else:
                segments.append((file, first, left))
                self._origins[0] = (file, first + left, size - left)
                left = 0
        return lines, segments

    def peek(self, count: int) -> int:
        """How many lines are left, counting at most ``count`` (they stay to be taken or skipped)."""
        self._fill(count)
        return min(count, len(self._buffer))

    def take(self, count: int) -> list[bytes]:
        """The next ``count`` lines (fewer at the end of the last file)."""
        lines, self._segments = self._pop(count)
        return lines

    def skip(self, count: int) -> int:
        """Pass over ``count`` lines without keeping or parsing them, in bounded memory (a resumed pass may skip
        millions); returns how many there were."""
        skipped = len(self._pop(min(count, len(self._buffer)))[0])
        while skipped < count:
            if self._handle is None and not self._next_file():
                break
            assert self._handle is not None
            wanted = count - skipped
            read = self._read(lambda handle: sum(1 for _ in islice(handle, wanted)))  # noqa: B023 - called at once
            self._line_number += read
            skipped += read
            if skipped < count and not self._next_file():
                break
        return skipped

    def locate(self, index: int) -> tuple[str, int]:
        """File and 1-based line number of line ``index`` of the last :meth:`take`."""
        for file, first, count in self._segments:
            if index < count:
                return file, first + index
            index -= count
        raise IndexError(index)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
