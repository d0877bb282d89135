"""Criteo TSV lines to raw arrays, and the raw arrays to features and torchrec Batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.data.base import Batch
from lightning_skew.data.features import (
    CRITEO_CATEGORICAL_COLUMNS,
    CRITEO_INTEGER_COLUMNS,
    CRITEO_NUM_DENSE,
    CRITEO_NUM_SPARSE,
)

TSV_NUM_FIELDS = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_SPARSE
# Criteo's own column names: the errors, the batches' feature keys and the tables speak the dataset's README.
TSV_FIELD_NAMES: list[str] = ["label"] + CRITEO_INTEGER_COLUMNS + CRITEO_CATEGORICAL_COLUMNS
# The row of every table that stands for a missing (empty) categorical field, hashed or by vocabulary.
MISSING_ROW = 0
# 16 hex digits fill a uint64; 16 decimal characters ('-' and 15 digits) fit an int64.
MAX_FIELD_BYTES = 16

_INVALID = 255
_DEC_DIGITS = np.full(256, _INVALID, dtype=np.uint8)
_DEC_DIGITS[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10)
_HEX_DIGITS = np.full(256, _INVALID, dtype=np.uint8)
_HEX_DIGITS[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
_HEX_DIGITS[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)
_TAB, _NEWLINE, _MINUS, _ZERO = ord("\t"), ord("\n"), ord("-"), ord("0")
_IS_SEPARATOR = np.zeros(256, dtype=bool)
_IS_SEPARATOR[[_TAB, _NEWLINE]] = True


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


def hash_categorical(raw: np.ndarray, num_embeddings_per_feature: Sequence[int],
                     missing: np.ndarray | None = None) -> np.ndarray:
    """Rows by hashing, as ``int64 [n, 26]``: a missing value on row 0 (:data:`MISSING_ROW`), every present value
    on ``1 + raw % (num_embeddings[i] - 1)``, so that no present value shares the missing row (a table of one row
    holds everything on row 0).

    ``raw`` is ``[n, 26]`` of non-negative integers (the parsed hexadecimal values); ``missing`` marks the empty
    fields (``None``: the value 0 stands for missing, as in TorchRec's npy files, where empty fields were written
    as 0).
    """
    sizes = np.asarray(num_embeddings_per_feature, dtype=np.uint64)
    raw = raw.astype(np.uint64, copy=False)
    present_rows = np.maximum(sizes, np.uint64(2)) - np.uint64(1)
    rows = (raw % present_rows).astype(np.int64) + 1
    if missing is None:
        missing = raw == 0
    return np.where(missing | (sizes == 1), MISSING_ROW, rows)


def make_batch(
    dense: np.ndarray, ids: np.ndarray, labels: np.ndarray, keys: Sequence[str] = CRITEO_CATEGORICAL_COLUMNS
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
