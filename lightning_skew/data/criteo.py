"""Readers for the real Criteo click logs (Kaggle / Terabyte TSV, TorchRec npy) and their DataModule.

Two on-disk layouts are read:

* **TSV**, as Criteo publishes it (Kaggle ``train.txt``, Terabyte ``day_0`` ... ``day_23``, plain or
  gzip): one example per line, ``label \\t I1..I13 \\t C1..C26``. The label is ``0`` or ``1``; the 13
  integer features are decimal and may be negative; the 26 categorical features are hexadecimal
  hashes (8 digits in the published data). An empty field is a missing value.
* **npy**, as TorchRec's ``BinaryCriteoUtils.tsv_to_npys`` / ``scripts/npy_preproc_criteo.py`` write
  it: per day ``day_{i}_dense.npy`` ([N, 13]), ``day_{i}_sparse.npy`` ([N, 26]) and
  ``day_{i}_labels.npy`` ([N, 1]).

Feature transforms (the pure functions below, tested on their own):

* dense (TSV, or integer npy): missing -> 0, negatives clamped to 0, then ``log(1 + x)``
  (:func:`transform_dense`). Float npy dense is taken as is: TorchRec already wrote
  ``log(x - min + 2)`` there, and applying a second transform would change the data's meaning.
* categorical by hashing: ``int(hex, 16) % num_embeddings[i]``; a missing value is the value 0 before
  hashing, as the DLRM reference preprocessing does, so it lands on row 0 (:func:`hash_categorical`).
* categorical by vocabulary (:func:`build_vocabulary`, a separate pass): values seen at least
  ``min_frequency`` times get rows ``1..V`` (most frequent first), every other value (rare, unseen or
  missing) gets row 0.

Streaming and sharding (both readers, :class:`GlobalBatchSharding`): the rows of all files, in order,
are cut into global batches of ``world_size * batch_size`` rows; rank ``r`` reads rows
``[r * B, (r + 1) * B)`` of each global batch, and DataLoader worker ``w`` of ``n`` yields the global
batches ``j`` with ``j % n == w``, so the DataLoader's round-robin keeps the order. Only complete
global batches are emitted, so every rank yields the same number of batches.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import IO

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm.auto import tqdm

from lightning_skew.data.base import Batch, RecDataModule
from lightning_skew.data.features import (
    CRITEO_KAGGLE_CARDINALITIES,
    CRITEO_NUM_DENSE,
    CRITEO_NUM_SPARSE,
    CRITEO_SPARSE_NAMES,
    capped_cardinalities,
)

__all__ = [
    "CriteoDataModule",
    "CriteoNpyDataset",
    "CriteoTsvDataset",
    "CriteoVocabulary",
    "GlobalBatchSharding",
    "ParsedLines",
    "build_vocabulary",
    "hash_categorical",
    "make_batch",
    "open_criteo_file",
    "parse_tsv_lines",
    "resolve_npy_days",
    "resolve_tsv_paths",
    "transform_dense",
]

log = logging.getLogger(__name__)

TSV_NUM_FIELDS = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_SPARSE
# Criteo's own column names, used in error messages so that they match the dataset's README.
TSV_FIELD_NAMES: list[str] = (
    ["label"] + [f"I{i + 1}" for i in range(CRITEO_NUM_DENSE)] + [f"C{i + 1}" for i in range(CRITEO_NUM_SPARSE)]
)
# 16 hex digits fill a uint64; 16 decimal characters ('-' and 15 digits) fit an int64.
MAX_FIELD_BYTES = 16
VOCABULARY_FORMAT_VERSION = 1

_INVALID = 255
_DEC_DIGITS = np.full(256, _INVALID, dtype=np.uint8)
_DEC_DIGITS[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10)
_HEX_DIGITS = np.full(256, _INVALID, dtype=np.uint8)
_HEX_DIGITS[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
_HEX_DIGITS[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)
_TAB, _NEWLINE, _MINUS, _ZERO = ord("\t"), ord("\n"), ord("-"), ord("0")
_IS_SEPARATOR = np.zeros(256, dtype=bool)
_IS_SEPARATOR[[_TAB, _NEWLINE]] = True


# --------------------------------------------------------------------------------------------------
# Pure parsing and transforms
# --------------------------------------------------------------------------------------------------


@dataclass
class ParsedLines:
    """Raw values of a block of TSV lines; the malformed lines are left out of the arrays.

    Attributes:
        labels: ``float32 [n]``, 0 or 1.
        dense: ``int64 [n, 13]``, as written (may be negative); missing -> 0.
        categorical: ``uint64 [n, 26]``, the hexadecimal values; missing -> 0.
        categorical_missing: ``bool [n, 26]``, where a categorical field was empty.
        malformed: ``(index in the input, reason)`` of every line left out, in input order.
    """

    labels: np.ndarray
    dense: np.ndarray
    categorical: np.ndarray
    categorical_missing: np.ndarray
    malformed: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def _right_aligned_fields(data: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Fields ``data[end - length : end]`` as a ``[..., width]`` byte matrix, right-aligned, padded with '0'.

    Right alignment gives every digit a fixed place value, so a field's value is one dot product.
    """
    width = int(min(max(int(lengths.max(initial=0)), 1), MAX_FIELD_BYTES + 1))
    # Window i of the front-padded buffer is data[i - width : i]: gathering whole windows copies
    # `width` bytes per field at once, about 3x faster than indexing every byte.
    windows = sliding_window_view(np.concatenate([np.zeros(width, dtype=np.uint8), data]), width)
    chars = windows[ends]
    chars[np.arange(-width, 0) < -lengths[..., None]] = _ZERO
    return chars


def _digits_value(chars: np.ndarray, table: np.ndarray, base: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Value and validity of right-aligned digit fields (see :func:`_right_aligned_fields`)."""
    digits = table[chars]
    width = chars.shape[-1]
    # Reductions over a short last axis are slow in numpy; matrix-vector products are not.
    num_invalid = (digits == _INVALID).view(np.uint8) @ np.ones(width, dtype=np.uint8)
    # Place values modulo 2**64: only a too-long (already invalid) field reaches a wrapped one.
    place = np.array([base ** (width - 1 - k) % (1 << 64) for k in range(width)], dtype=np.uint64)
    value = digits.astype(np.uint64) @ place
    return value.astype(dtype), num_invalid == 0


def parse_tsv_lines(lines: Sequence[bytes]) -> ParsedLines:
    """Parse Criteo TSV lines (bytes, with or without their line ending) into raw arrays.

    All lines are parsed at once with numpy: the fields are cut from one buffer into fixed-width,
    right-aligned byte matrices and converted with digit lookup tables, so the cost per line is a
    share of a few numpy operations rather than 40 Python ``int()`` calls.

    A line is malformed when it does not have exactly 40 tab-separated fields, its label is not ``0``
    or ``1``, an integer field is not an optionally negative decimal, a categorical field is not
    hexadecimal, or a field is longer than 16 characters. Malformed lines are reported in
    :attr:`ParsedLines.malformed` (never raised here) so the caller decides whether to raise or skip.
    """
    if not lines:
        return _empty_parsed()
    buffer = b"".join(lines)
    if buffer.count(b"\n") != len(lines) or b"\r" in buffer:
        # Rare: the file's last line without a newline, or Windows line endings.
        lines = [line.rstrip(b"\r\n") + b"\n" for line in lines]
        buffer = b"".join(lines)
    data = np.frombuffer(buffer, dtype=np.uint8)
    separators = np.flatnonzero(_IS_SEPARATOR[data])
    line_ends = np.flatnonzero(data[separators] == _NEWLINE)
    if len(line_ends) != len(lines):  # a "line" with a newline inside it
        return _parse_line_by_line(lines)
    fields_per_line = np.diff(line_ends, prepend=-1)
    good_rows = np.flatnonzero(fields_per_line == TSV_NUM_FIELDS)
    malformed: dict[int, str] = {
        int(i): f"expected {TSV_NUM_FIELDS} tab-separated fields, found {int(fields_per_line[i])}"
        for i in np.flatnonzero(fields_per_line != TSV_NUM_FIELDS)
    }
    if malformed:
        data = np.frombuffer(b"".join(lines[i] for i in good_rows), dtype=np.uint8)
        separators = np.flatnonzero(_IS_SEPARATOR[data])
    num_rows = len(good_rows)
    if num_rows == 0:
        return _empty_parsed(sorted(malformed.items()))

    ends = separators.reshape(num_rows, TSV_NUM_FIELDS)
    starts = np.empty_like(separators)
    starts[0] = 0
    starts[1:] = separators[:-1] + 1
    starts = starts.reshape(num_rows, TSV_NUM_FIELDS)
    lengths = ends - starts
    too_long = lengths > MAX_FIELD_BYTES

    label_chars = data[starts[:, 0]]
    label_valid = (lengths[:, 0] == 1) & ((label_chars == _ZERO) | (label_chars == _ZERO + 1))

    dense_columns = slice(1, 1 + CRITEO_NUM_DENSE)
    dense_chars = _right_aligned_fields(data, ends[:, dense_columns], lengths[:, dense_columns])
    first_chars = data[np.minimum(starts[:, dense_columns], len(data) - 1)]
    negative = (first_chars == _MINUS) & (lengths[:, dense_columns] > 0)
    # The sign becomes a '0' digit: a place value of zero in front of the number.
    rows, columns = np.nonzero(negative)
    sign_places = np.maximum(dense_chars.shape[-1] - lengths[:, dense_columns][rows, columns], 0)
    dense_chars[rows, columns, sign_places] = _ZERO
    dense, dense_valid = _digits_value(dense_chars, _DEC_DIGITS, 10, np.int64)
    dense_valid &= ~(negative & (lengths[:, dense_columns] == 1)) & ~too_long[:, dense_columns]
    dense = np.where(negative, -dense, dense)

    cat_columns = slice(1 + CRITEO_NUM_DENSE, TSV_NUM_FIELDS)
    cat_chars = _right_aligned_fields(data, ends[:, cat_columns], lengths[:, cat_columns])
    categorical, cat_valid = _digits_value(cat_chars, _HEX_DIGITS, 16, np.uint64)
    cat_valid &= ~too_long[:, cat_columns]

    field_valid = np.concatenate([label_valid[:, None], dense_valid, cat_valid], axis=1)
    row_valid = field_valid.all(axis=1)
    for row in np.flatnonzero(~row_valid):
        column = int(np.argmin(field_valid[row]))
        start, length = int(starts[row, column]), int(lengths[row, column])
        malformed[int(good_rows[row])] = _field_error(column, bytes(data[start : start + length]))
    return ParsedLines(
        labels=(label_chars[row_valid] - _ZERO).astype(np.float32),
        dense=dense[row_valid],
        categorical=categorical[row_valid],
        categorical_missing=(lengths[:, cat_columns] == 0)[row_valid],
        malformed=sorted(malformed.items()),
    )


def _field_error(column: int, text: bytes) -> str:
    shown = text if len(text) <= 24 else text[:24] + b"..."
    name = TSV_FIELD_NAMES[column]
    if len(text) > MAX_FIELD_BYTES and column > 0:
        return f"field {name} is longer than {MAX_FIELD_BYTES} characters: {shown!r}"
    if column == 0:
        return f"label must be 0 or 1, got {shown!r}"
    if column <= CRITEO_NUM_DENSE:
        return f"integer feature {name} is not a decimal integer: {shown!r}"
    return f"categorical feature {name} is not hexadecimal: {shown!r}"


def _parse_line_by_line(lines: Sequence[bytes]) -> ParsedLines:
    parsed = [parse_tsv_lines([line.replace(b"\n", b" ") + b"\n"]) for line in lines]
    good = [p for p in parsed if len(p)]
    malformed = [(i, p.malformed[0][1]) for i, p in enumerate(parsed) if p.malformed]
    if not good:
        return _empty_parsed(malformed)
    return ParsedLines(
        labels=np.concatenate([p.labels for p in good]),
        dense=np.concatenate([p.dense for p in good]),
        categorical=np.concatenate([p.categorical for p in good]),
        categorical_missing=np.concatenate([p.categorical_missing for p in good]),
        malformed=malformed,
    )


def _empty_parsed(malformed: list[tuple[int, str]] | None = None) -> ParsedLines:
    return ParsedLines(
        labels=np.zeros(0, dtype=np.float32),
        dense=np.zeros((0, CRITEO_NUM_DENSE), dtype=np.int64),
        categorical=np.zeros((0, CRITEO_NUM_SPARSE), dtype=np.uint64),
        categorical_missing=np.zeros((0, CRITEO_NUM_SPARSE), dtype=bool),
        malformed=malformed or [],
    )


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """Criteo's dense transform: negatives clamped to 0, then ``log(1 + x)``, as ``float32``.

    Missing values are already 0 in the parsed arrays, so they map to ``log(1) = 0``.
    """
    return np.log1p(np.maximum(raw, 0).astype(np.float64)).astype(np.float32)


def hash_categorical(raw: np.ndarray, num_embeddings_per_feature: Sequence[int]) -> np.ndarray:
    """Rows by hashing: ``raw % num_embeddings[i]`` per column, as ``int64``.

    ``raw`` is ``[n, 26]`` of non-negative integers (the parsed hexadecimal values, where a missing
    value is 0 and so hashes to row 0).
    """
    sizes = np.asarray(num_embeddings_per_feature, dtype=np.uint64)
    return (raw.astype(np.uint64, copy=False) % sizes).astype(np.int64)


def make_batch(
    dense: np.ndarray, ids: np.ndarray, labels: np.ndarray, keys: Sequence[str] = CRITEO_SPARSE_NAMES
) -> Batch:
    """A torchrec :class:`Batch` with one ID per example and feature (``ids`` is ``[n, len(keys)]``)."""
    num_rows = ids.shape[0]
    values = torch.from_numpy(np.ascontiguousarray(ids.T, dtype=np.int64).reshape(-1))
    sparse = KeyedJaggedTensor(
        keys=list(keys),
        values=values,
        lengths=torch.ones(num_rows * len(keys), dtype=torch.int32),
        stride=num_rows,
    )
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=sparse,
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32).reshape(-1)),
    )


# --------------------------------------------------------------------------------------------------
# Files and paths
# --------------------------------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"


def open_criteo_file(path: str) -> IO[bytes]:
    """Open a Criteo TSV file for reading bytes, gunzipping it when it is gzip (``.gz`` or magic bytes)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if path.endswith(".gz") or magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


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


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


class CriteoVocabulary:
    """Frequency-thresholded vocabulary of the 26 categorical features, built by :func:`build_vocabulary`.

    Feature ``i`` maps each of its ``V_i`` kept values to a row in ``1..V_i`` (most frequent first, ties
    by value); row 0 holds every other value: rare, unseen or missing. Its table has ``V_i + 1`` rows.

    Stored as one ``.npz`` file: per feature ``keys_{i}`` (the kept values, sorted, ``uint64``) and
    ``rows_{i}`` (their rows, ``int64``), and ``metadata``, a JSON string with ``format_version``,
    ``source_files`` (absolute paths), ``min_frequency``, ``num_lines``, ``num_malformed_lines`` and
    ``num_embeddings_per_feature``. Memory: 16 bytes per kept value when loaded (about 540 MB for all
    Criteo Kaggle values), loaded on first lookup.

    Args:
        path: The ``.npz`` file written by :func:`build_vocabulary`.

    Example::

        vocabulary = CriteoVocabulary("criteo_vocab.npz")
        vocabulary.num_embeddings_per_feature  # [V_0 + 1, ..., V_25 + 1]
        rows = vocabulary.lookup(parsed.categorical, parsed.categorical_missing)
    """

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"vocabulary file {path!r} does not exist; write it first with "
                "lightning_skew.data.criteo.build_vocabulary(paths, min_frequency, output_path)"
            )
        self.path = path
        with np.load(path, allow_pickle=False) as archive:
            self.metadata: dict = json.loads(str(archive["metadata"]))
        if self.metadata.get("format_version") != VOCABULARY_FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported vocabulary format {self.metadata.get('format_version')!r}")
        self._tables: list[tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        """Rows per table: kept values plus row 0."""
        return list(self.metadata["num_embeddings_per_feature"])

    @property
    def min_frequency(self) -> int:
        return int(self.metadata["min_frequency"])

    @property
    def source_files(self) -> list[str]:
        return list(self.metadata["source_files"])

    def _load(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._tables is None:
            with np.load(self.path, allow_pickle=False) as archive:
                self._tables = [
                    (archive[f"keys_{i}"], archive[f"rows_{i}"]) for i in range(CRITEO_NUM_SPARSE)
                ]
        return self._tables

    def lookup(self, raw: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
        """Rows (``int64 [n, 26]``) of raw categorical values; ``missing`` marks empty fields (row 0)."""
        raw = raw.astype(np.uint64, copy=False)
        ids = np.zeros(raw.shape, dtype=np.int64)
        for i, (keys, rows) in enumerate(self._load()):
            if len(keys) == 0:
                continue
            column = raw[:, i]
            index = np.minimum(np.searchsorted(keys, column), len(keys) - 1)
            found = keys[index] == column
            if missing is not None:
                found &= ~missing[:, i]
            ids[:, i] = np.where(found, rows[index], 0)
        return ids


def _merge_counts(
    keys: np.ndarray, counts: np.ndarray, new_keys: np.ndarray, new_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    merged, inverse = np.unique(np.concatenate([keys, new_keys]), return_inverse=True)
    return merged, np.bincount(inverse, weights=np.concatenate([counts, new_counts])).astype(np.int64)


def build_vocabulary(
    paths: Sequence[str] | str,
    min_frequency: int,
    output_path: str,
    skip_malformed: bool = False,
    lines_per_chunk: int = 1 << 18,
    progress: bool = True,
) -> CriteoVocabulary:
    """Count the categorical values of Criteo TSV files and write a :class:`CriteoVocabulary`.

    One sequential pass over ``paths`` (files, directories or globs, plain or gzip) with bounded
    memory for the lines (``lines_per_chunk`` at a time); the counts themselves take 16 bytes per
    distinct value and feature (plus a transient copy while merging), so the Kaggle data (~34M
    distinct values) fits in a few GB but the full Terabyte data does not: build it from a subset
    of days, or with a higher threshold on a machine with the memory.

    Args:
        paths: The TSV files whose values are counted (usually the training files only).
        min_frequency: A value is kept (gets its own row) when seen at least this many times.
        output_path: Where the ``.npz`` is written (atomically, through a temporary file).
        skip_malformed: Skip and count malformed lines instead of raising.
        lines_per_chunk: Lines parsed at once.
        progress: Show a progress bar of the lines read (on stderr).

    Returns:
        The vocabulary, read back from ``output_path``.
    """
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    files = resolve_tsv_paths(paths, "build_vocabulary")
    keys = [np.zeros(0, dtype=np.uint64) for _ in range(CRITEO_NUM_SPARSE)]
    counts = [np.zeros(0, dtype=np.int64) for _ in range(CRITEO_NUM_SPARSE)]
    num_lines = num_malformed = 0
    stream = _LineStream(files)
    bar = tqdm(desc="build_vocabulary", unit=" lines", unit_scale=True, disable=not progress)
    while True:
        lines = stream.take(lines_per_chunk)
        if not lines:
            break
        parsed = parse_tsv_lines(lines)
        num_malformed += _handle_malformed(parsed, stream.locate, skip_malformed)
        num_lines += len(lines)
        bar.update(len(lines))
        for i in range(CRITEO_NUM_SPARSE):
            present = parsed.categorical[~parsed.categorical_missing[:, i], i]
            chunk_keys, chunk_counts = np.unique(present, return_counts=True)
            keys[i], counts[i] = _merge_counts(keys[i], counts[i], chunk_keys, chunk_counts)

    bar.close()
    arrays: dict[str, np.ndarray] = {}
    sizes: list[int] = []
    for i in range(CRITEO_NUM_SPARSE):
        kept = counts[i] >= min_frequency
        kept_keys, kept_counts = keys[i][kept], counts[i][kept]
        # Most frequent first (hot rows at the top of the table); keys are sorted, so ties go by value.
        order = np.argsort(-kept_counts, kind="stable")
        rows = np.empty(len(kept_keys), dtype=np.int64)
        rows[order] = np.arange(1, len(kept_keys) + 1)
        arrays[f"keys_{i}"], arrays[f"rows_{i}"] = kept_keys, rows
        sizes.append(len(kept_keys) + 1)
    metadata = {
        "format_version": VOCABULARY_FORMAT_VERSION,
        "source_files": [os.path.abspath(f) for f in files],
        "min_frequency": min_frequency,
        "num_lines": num_lines,
        "num_malformed_lines": num_malformed,
        "num_embeddings_per_feature": sizes,
    }
    arrays["metadata"] = np.array(json.dumps(metadata))
    temporary = f"{output_path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as out:
        np.savez(out, **arrays)
    os.replace(temporary, output_path)
    if num_malformed:
        log.warning("build_vocabulary skipped %d malformed lines of %d", num_malformed, num_lines)
    return CriteoVocabulary(output_path)


# --------------------------------------------------------------------------------------------------
# Sharding and streaming
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalBatchSharding:
    """Which rows of a stream a rank and DataLoader worker read (see the module docstring).

    Attributes:
        batch_size: Rows per rank and batch (``B``).
        rank: This process's rank (``r``).
        world_size: Number of ranks (``W``).
        worker_id: This DataLoader worker (0 without workers).
        num_workers: Number of DataLoader workers (1 without workers).
    """

    batch_size: int
    rank: int = 0
    world_size: int = 1
    worker_id: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if not 0 <= self.worker_id < self.num_workers:
            raise ValueError(f"worker_id must be in [0, {self.num_workers}), got {self.worker_id}")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def owns(self, global_batch: int) -> bool:
        """Whether this worker yields global batch ``global_batch``."""
        return global_batch % self.num_workers == self.worker_id

    def rows(self, global_batch: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's rows of ``global_batch`` in the whole stream."""
        start = global_batch * self.global_batch_size + self.rank * self.batch_size
        return start, start + self.batch_size

    def with_current_worker(self) -> GlobalBatchSharding:
        """This sharding for the DataLoader worker the caller runs in (unchanged outside workers)."""
        info = get_worker_info()
        if info is None:
            return self
        return GlobalBatchSharding(self.batch_size, self.rank, self.world_size, info.id, info.num_workers)


class _LineStream:
    """Lines of several files read in order, knowing the file and 1-based line number of each."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)
        self._file_index = -1
        self._handle: IO[bytes] | None = None
        self._line_number = 0  # lines read so far from the current file
        # (file, first line number, count) of the lines returned by the last take().
        self._segments: list[tuple[str, int, int]] = []

    def _next_file(self) -> bool:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._file_index += 1
        if self._file_index >= len(self.files):
            return False
        self._handle = open_criteo_file(self.files[self._file_index])
        self._line_number = 0
        return True

    def _read(self, count: int, keep: bool) -> tuple[list[bytes], int]:
        lines: list[bytes] = []
        done = 0
        if keep:
            self._segments = []
        while done < count:
            if self._handle is None and not self._next_file():
                break
            assert self._handle is not None
            chunk = list(islice(self._handle, count - done))
            if keep and chunk:
                self._segments.append((self.files[self._file_index], self._line_number + 1, len(chunk)))
                lines.extend(chunk)
            self._line_number += len(chunk)
            done += len(chunk)
            if done < count and not self._next_file():
                break
        return lines, done

    def take(self, count: int) -> list[bytes]:
        """The next ``count`` lines (fewer at the end of the last file)."""
        return self._read(count, keep=True)[0]

    def skip(self, count: int) -> int:
        """Pass over ``count`` lines without keeping them; returns how many there were."""
        return self._read(count, keep=False)[1]

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


def _handle_malformed(parsed: ParsedLines, locate, skip_malformed: bool) -> int:
    """Raise for the first malformed line, or return how many there were when skipping."""
    if parsed.malformed and not skip_malformed:
        index, reason = parsed.malformed[0]
        file, line_number = locate(index)
        raise ValueError(
            f"{file}, line {line_number}: malformed Criteo line: {reason} "
            "(pass skip_malformed=True to skip such lines)"
        )
    return len(parsed.malformed)


def _check_table_sizes(num_embeddings_per_feature: Sequence[int]) -> list[int]:
    sizes = [int(n) for n in num_embeddings_per_feature]
    if len(sizes) != CRITEO_NUM_SPARSE:
        raise ValueError(
            f"num_embeddings_per_feature: expected {CRITEO_NUM_SPARSE} table sizes (one per Criteo "
            f"categorical feature), got {len(sizes)}"
        )
    if min(sizes) < 1:
        raise ValueError(f"num_embeddings_per_feature: every table needs at least 1 row, got {sizes}")
    return sizes


class _CategoricalEncoder:
    """Raw categorical values to rows: by hashing, or by vocabulary with rows past the table size -> 0."""

    def __init__(self, num_embeddings_per_feature: Sequence[int], vocabulary: CriteoVocabulary | None) -> None:
        self.num_embeddings_per_feature = _check_table_sizes(num_embeddings_per_feature)
        self.vocabulary = vocabulary

    def __call__(self, raw: np.ndarray, missing: np.ndarray | None) -> np.ndarray:
        if self.vocabulary is None:
            return hash_categorical(raw, self.num_embeddings_per_feature)
        ids = self.vocabulary.lookup(raw, missing)
        # Rows are in frequency order, so a cap keeps the most frequent values.
        return np.where(ids < np.asarray(self.num_embeddings_per_feature), ids, 0)


class CriteoTsvDataset(IterableDataset):
    """Streams Criteo TSV files (plain or gzip) as torchrec Batches, sharded by rank and worker.

    Memory is bounded by one global batch of lines; a file is never loaded whole. Each worker scans
    every line of the stream but parses only its own rank's lines of its own global batches. See the
    module docstring for the exact sharding; no shuffling is done (Criteo days are in time order).

    With ``skip_malformed=True`` a malformed line is dropped from its batch (which is then smaller:
    sharding counts raw lines so that it does not depend on content) and counted in
    :attr:`num_malformed_lines`; a warning with the count is logged at the end of each pass.

    .. note::
        Under DataLoader workers the count lives in the worker processes: read it from their log
        lines; the attribute is exact only with ``num_workers=0``.

    Args:
        paths: TSV files, directories or globs, read in this order.
        batch_size: Examples per batch on this rank.
        num_embeddings_per_feature: Rows of each of the 26 tables (IDs are below these).
        vocabulary: Map values through this vocabulary instead of hashing; ``None`` hashes.
        rank: This process's rank.
        world_size: Number of ranks.
        skip_malformed: Skip and count malformed lines instead of raising ``ValueError``.

    Example::

        dataset = CriteoTsvDataset(["day_0.gz"], batch_size=2048, num_embeddings_per_feature=[10**5] * 26)
        loader = DataLoader(dataset, batch_size=None, num_workers=2)
        batch = next(iter(loader))  # Batch(dense_features [2048, 13], sparse_features, labels)
    """

    def __init__(
        self,
        paths: Sequence[str] | str,
        batch_size: int,
        num_embeddings_per_feature: Sequence[int] = CRITEO_KAGGLE_CARDINALITIES,
        vocabulary: CriteoVocabulary | None = None,
        rank: int = 0,
        world_size: int = 1,
        skip_malformed: bool = False,
    ) -> None:
        self.files = resolve_tsv_paths(paths)
        self.sharding = GlobalBatchSharding(batch_size, rank, world_size)
        self.encode = _CategoricalEncoder(num_embeddings_per_feature, vocabulary)
        self.skip_malformed = skip_malformed
        self.num_malformed_lines = 0

    def __iter__(self) -> Iterator[Batch]:
        sharding = self.sharding.with_current_worker()
        batch_size, rank, world_size = sharding.batch_size, sharding.rank, sharding.world_size
        stream = _LineStream(self.files)
        self.num_malformed_lines = 0
        global_batch = 0
        try:
            while True:
                if not sharding.owns(global_batch):
                    if stream.skip(sharding.global_batch_size) < sharding.global_batch_size:
                        return
                    global_batch += 1
                    continue
                if stream.skip(rank * batch_size) < rank * batch_size:
                    return
                lines = stream.take(batch_size)
                rest = (world_size - rank - 1) * batch_size
                # Only a complete global batch is parsed and yielded, so every rank stops together.
                if len(lines) < batch_size or stream.skip(rest) < rest:
                    return
                parsed = parse_tsv_lines(lines)
                self.num_malformed_lines += _handle_malformed(parsed, stream.locate, self.skip_malformed)
                ids = self.encode(parsed.categorical, parsed.categorical_missing)
                yield make_batch(transform_dense(parsed.dense), ids, parsed.labels)
                global_batch += 1
        finally:
            stream.close()
            if self.num_malformed_lines:
                log.warning(
                    "Criteo TSV (rank %d, worker %d): skipped %d malformed lines in this pass",
                    rank, sharding.worker_id, self.num_malformed_lines,
                )


class CriteoNpyDataset(IterableDataset):
    """Reads TorchRec's preprocessed Criteo npy days (memory-mapped) as torchrec Batches.

    The layout is the one ``torchrec.datasets.criteo.BinaryCriteoUtils.tsv_to_npys`` writes: per day
    ``day_{i}_dense.npy`` (``float32 [N, 13]``, already ``log(x - min + 2)``: used as is),
    ``day_{i}_sparse.npy`` (integer ``[N, 26]``, raw hexadecimal values: taken modulo the table
    size, or through the vocabulary) and ``day_{i}_labels.npy`` (``[N, 1]`` or ``[N]``). An integer
    dense array is taken to be raw counts and gets :func:`transform_dense`. ``int32`` sparse values
    (TorchRec's shuffle script) are read as ``uint32`` so that they hash like the TSV's values.
    Sharding is the same as :class:`CriteoTsvDataset`'s, over the rows of all days in order.

    Args:
        days: ``(dense, sparse, labels)`` paths per day, or anything :func:`resolve_npy_days` takes.
        batch_size: Examples per batch on this rank.
        num_embeddings_per_feature: Rows of each of the 26 tables (IDs are below these).
        vocabulary: Map values through this vocabulary instead of hashing; ``None`` hashes.
        rank: This process's rank.
        world_size: Number of ranks.

    Example::

        dataset = CriteoNpyDataset(["/data/criteo_npy/day_0"], batch_size=2048)
        batch = next(iter(DataLoader(dataset, batch_size=None)))
    """

    def __init__(
        self,
        days: Sequence[str] | Sequence[tuple[str, str, str]] | str,
        batch_size: int,
        num_embeddings_per_feature: Sequence[int] = CRITEO_KAGGLE_CARDINALITIES,
        vocabulary: CriteoVocabulary | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(days, str) or (days and isinstance(days[0], str)):
            days = resolve_npy_days(days)  # type: ignore[arg-type]
        if not days:
            raise ValueError("CriteoNpyDataset: expected at least one npy day, got an empty list")
        self.days = [tuple(day) for day in days]
        self.sharding = GlobalBatchSharding(batch_size, rank, world_size)
        self.encode = _CategoricalEncoder(num_embeddings_per_feature, vocabulary)
        self.num_rows_per_day: list[int] = []
        for dense_path, sparse_path, labels_path in self.days:
            dense, sparse, labels = (np.load(p, mmap_mode="r") for p in (dense_path, sparse_path, labels_path))
            if dense.ndim != 2 or dense.shape[1] != CRITEO_NUM_DENSE:
                raise ValueError(f"{dense_path}: expected shape [N, {CRITEO_NUM_DENSE}], got {dense.shape}")
            if sparse.shape != (len(dense), CRITEO_NUM_SPARSE):
                raise ValueError(f"{sparse_path}: expected shape [{len(dense)}, 26], got {sparse.shape}")
            if labels.shape not in ((len(dense),), (len(dense), 1)):
                raise ValueError(f"{labels_path}: expected shape [{len(dense)}] or [N, 1], got {labels.shape}")
            self.num_rows_per_day.append(len(dense))

    def __len__(self) -> int:
        """Batches this rank yields in one pass (over all workers together)."""
        return sum(self.num_rows_per_day) // self.sharding.global_batch_size

    def _rows(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        pieces, offset = [], 0
        for array in arrays:
            lo, hi = max(start - offset, 0), min(stop - offset, len(array))
            if lo < hi:
                pieces.append(np.array(array[lo:hi]))  # a copy: tensors need writable memory
            offset += len(array)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __iter__(self) -> Iterator[Batch]:
        sharding = self.sharding.with_current_worker()
        dense_arrays, sparse_arrays, labels_arrays = (
            [np.load(day[k], mmap_mode="r") for day in self.days] for k in range(3)
        )
        for global_batch in range(len(self)):
            if not sharding.owns(global_batch):
                continue
            start, stop = sharding.rows(global_batch)
            dense = self._rows(dense_arrays, start, stop)
            if not np.issubdtype(dense.dtype, np.floating):
                dense = transform_dense(dense)
            sparse = self._rows(sparse_arrays, start, stop)
            if sparse.dtype == np.int32:
                sparse = sparse.view(np.uint32)
            ids = self.encode(sparse.astype(np.uint64), None)
            labels = self._rows(labels_arrays, start, stop).reshape(-1)
            yield make_batch(dense, ids, labels)


# --------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------

_FORMATS = ("tsv", "npy")


class CriteoDataModule(RecDataModule):
    """Criteo Kaggle / Terabyte data (TSV or TorchRec npy) as torchrec Batches, sharded across ranks.

    A thin wrapper: :meth:`setup` reads the rank and world size (from the trainer when attached, else
    ``torch.distributed`` when initialized, else 0 / 1), checks the paths of the stage and builds a
    :class:`CriteoTsvDataset` or :class:`CriteoNpyDataset` per split; each loader is a
    ``DataLoader(dataset, batch_size=None)``. Every rank yields the same number of batches.

    .. note::
        ``batch_size`` is per rank: a global batch has ``world_size * batch_size`` examples.

    Args:
        train_paths: Training files: TSV files, directories or globs; for ``npy``, day prefixes
            (``/data/day_0``), day files or directories (see :func:`resolve_npy_days`).
        val_paths: Validation files, as ``train_paths``. ``None``: no validation loader.
        test_paths: Test files, as ``train_paths``. ``None``: no test loader.
        format: ``"tsv"`` (Criteo's text files, plain or gzip) or ``"npy"`` (TorchRec's layout).
        num_embeddings_per_feature: Rows per table (26 sizes) for hashing; ``None`` uses
            ``CRITEO_KAGGLE_CARDINALITIES``. Must be ``None`` with a vocabulary, whose sizes are used.
        max_rows_per_table: Cap every table at this many rows (hashing: modulo the cap; vocabulary:
            values whose row is past the cap go to row 0, which keeps the most frequent ones).
        vocabulary_path: A ``.npz`` written by :func:`build_vocabulary`; ``None`` hashes.
        batch_size: Examples per batch on each rank.
        num_workers: DataLoader workers per rank (each scans the whole stream, parses its share).
        skip_malformed: Skip and count malformed TSV lines instead of raising ``ValueError``.
        pin_memory: Pin batches in the DataLoader (for GPU training).

    Example::

        datamodule = CriteoDataModule(train_paths=["/data/criteo/day_0.gz"], batch_size=4096,
                                      max_rows_per_table=1_000_000)
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
    """

    def __init__(
        self,
        train_paths: list[str] | None = None,
        val_paths: list[str] | None = None,
        test_paths: list[str] | None = None,
        format: str = "tsv",
        num_embeddings_per_feature: list[int] | None = None,
        max_rows_per_table: int | None = None,
        vocabulary_path: str | None = None,
        batch_size: int = 2048,
        num_workers: int = 0,
        skip_malformed: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        self.paths = {"train": train_paths, "val": val_paths, "test": test_paths}
        self.format = format
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_malformed = skip_malformed
        self.pin_memory = pin_memory
        self.vocabulary: CriteoVocabulary | None = None
        if vocabulary_path is not None:
            if num_embeddings_per_feature is not None:
                raise ValueError(
                    "num_embeddings_per_feature must be None with vocabulary_path: the table sizes are "
                    "the vocabulary's (use max_rows_per_table to cap them)"
                )
            self.vocabulary = CriteoVocabulary(vocabulary_path)
            sizes = self.vocabulary.num_embeddings_per_feature
        elif num_embeddings_per_feature is None:
            sizes = CRITEO_KAGGLE_CARDINALITIES
        else:
            sizes = num_embeddings_per_feature
        self._num_embeddings = capped_cardinalities(_check_table_sizes(sizes), max_rows_per_table)
        self.datasets: dict[str, IterableDataset] = {}
        self.rank, self.world_size = 0, 1

    @property
    def dense_in_features(self) -> int:
        return CRITEO_NUM_DENSE

    @property
    def sparse_feature_names(self) -> list[str]:
        return list(CRITEO_SPARSE_NAMES)

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return list(self._num_embeddings)

    def _make_dataset(self, split: str) -> IterableDataset:
        paths = self.paths[split]
        assert paths is not None
        if self.format == "npy":
            return CriteoNpyDataset(
                resolve_npy_days(paths, f"{split}_paths"), self.batch_size, self._num_embeddings,
                self.vocabulary, self.rank, self.world_size,
            )
        return CriteoTsvDataset(
            resolve_tsv_paths(paths, f"{split}_paths"), self.batch_size, self._num_embeddings,
            self.vocabulary, self.rank, self.world_size, self.skip_malformed,
        )

    def setup(self, stage: str) -> None:
        self.rank, self.world_size = self.rank_and_world_size()
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}[stage]
        if stage == "fit" and self.paths["train"] is None:
            raise ValueError("CriteoDataModule: train_paths is required to fit")
        if stage in ("validate", "test") and self.paths[splits[0]] is None:
            raise ValueError(f"CriteoDataModule: {splits[0]}_paths is required to {stage}")
        for split in splits:
            if self.paths[split] is not None:
                self.datasets[split] = self._make_dataset(split)
        if self.vocabulary is not None and stage == "fit" and self.format == "tsv":
            train_files = [os.path.abspath(f) for f in self.datasets["train"].files]  # type: ignore[attr-defined]
            if train_files != self.vocabulary.source_files:
                rank_zero_warn(
                    f"the vocabulary {self.vocabulary.path} was built from {self.vocabulary.source_files}, "
                    f"not from the training files {train_files}"
                )

    def _loader(self, split: str) -> DataLoader | list:
        if split not in self.datasets:
            if self.paths[split] is None:
                return []
            raise RuntimeError(f"CriteoDataModule: call setup() before the {split} dataloader")
        return DataLoader(
            self.datasets[split], batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")  # type: ignore[return-value]

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")
