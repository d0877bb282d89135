"""Raw chunks to typed rows: joins; labels, dense values and times read; malformed rows raised or counted."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_skew.data.columnar.readers import ColumnarFile, MalformedRow
from lightning_skew.data.columnar.spec import ColumnMapping, Join

__all__ = ["PassCounts", "RowDecoder", "Rows", "SideTable"]

log = logging.getLogger(__name__)


@dataclass
class Rows:
    """Decoded rows: labels, dense features and times as numbers; the sparse columns still raw (Arrow).

    Attributes:
        labels: ``float32 [n]``, 0 or 1.
        dense: ``float32 [n, num_dense]`` (``[n, 0]`` without dense features).
        times: ``float64 [n]``, or ``None`` without a time column.
        sparse: The sparse features' columns, ``n`` rows, in feature order.
    """

    labels: np.ndarray
    dense: np.ndarray
    times: np.ndarray | None
    sparse: pa.Table

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, mask: np.ndarray) -> Rows:
        """The rows where ``mask`` (bool) holds."""
        index = np.flatnonzero(mask)
        if len(index) == len(self):
            return self
        return Rows(self.labels[index], self.dense[index], None if self.times is None else self.times[index],
                    self.sparse.take(pa.array(index)))

    def slice(self, start: int, stop: int) -> Rows:
        return Rows(self.labels[start:stop], self.dense[start:stop],
                    None if self.times is None else self.times[start:stop], self.sparse.slice(start, stop - start))

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        times = None if parts[0].times is None else np.concatenate([p.times for p in parts])  # type: ignore[misc]
        return Rows(np.concatenate([p.labels for p in parts]), np.concatenate([p.dense for p in parts]), times,
                    pa.concat_tables([p.sparse for p in parts]))


@dataclass
class PassCounts:
    """What one pass over files left out or filled in, for the log line at its end (nothing is dropped silently).

    Attributes:
        malformed: Malformed rows skipped (``skip_malformed``): wrong field counts or unreadable values.
        empty: Rows whose every column read was empty (blank lines): skipped.
        non_finite: Dense values that were NaN or infinite, replaced by 0 (``non_finite="zero"``).
        unmatched: Per join, inputs whose key the side table lacks (their joined columns are missing).
        examples: A few skipped rows, ``"file, line N: reason"``.
    """

    malformed: int = 0
    empty: int = 0
    non_finite: int = 0
    unmatched: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def wants_example(self) -> bool:
        return len(self.examples) < 3

    def note(self, example: str) -> None:
        """Count one skipped malformed row (``example`` says where and why; the first few are kept)."""
        self.malformed += 1
        if self.wants_example:
            self.examples.append(example)

    def summary(self) -> str:
        parts = []
        if self.malformed:
            parts.append(f"skipped {self.malformed} malformed rows (e.g. {'; '.join(self.examples)})")
        if self.empty:
            parts.append(f"skipped {self.empty} empty rows (blank lines)")
        if self.non_finite:
            parts.append(f"replaced {self.non_finite} non-finite dense values (NaN, infinity) by 0")
        for path, count in self.unmatched.items():
            if count:
                parts.append(f"{count} inputs had no match in the side table {path}")
        return "; ".join(parts)


def _as_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_string(array.type):
        return array
    return array.cast(pa.string())


class SideTable:
    """A small table read whole into memory, joined to the data's rows on a key column.

    Args:
        join: What to read and join (:class:`~lightning_skew.data.columnar.Join`).
        path: The side table's file, resolved.
    """

    def __init__(self, join: Join, path: str) -> None:
        self.join, self.path = join, path
        file = ColumnarFile(path, join.file_format)
        file.require([join.key, *join.columns], "the join's key and columns")
        table = pa.concat_tables([t for _, t in file.chunks([join.key, *join.columns])])
        keys = _as_text(table[join.key])
        unique = pc.unique(keys)
        if len(unique) != len(keys):
            counts = pc.value_counts(keys)
            repeated = [str(v) for v, c in zip(counts.field(0).to_pylist(), counts.field(1).to_pylist(), strict=True)
                        if c > 1][:5]
            raise ValueError(f"{path}: the join key {join.key!r} repeats (e.g. {repeated}); a side table needs one "
                             "row per key")
        self.keys = keys
        self.values = table.select(join.columns)

    def apply(self, table: pa.Table) -> tuple[pa.Table, int]:
        """``table`` with the joined columns added, and how many of its rows found no match."""
        index = pc.index_in(_as_text(table[self.join.key]), value_set=self.keys)
        joined = self.values.take(index)
        for name in self.join.columns:
            table = table.append_column(name, joined[name])
        return table, index.null_count


class RowDecoder:
    """Turns the raw chunks of a file into :class:`Rows` (the one decoding that every pass shares).

    A row is malformed when its label is empty, unreadable as a number, not finite or (without a threshold) neither
    0 nor 1, a dense value is unreadable or (by default) NaN or infinite, or its time is empty or unreadable. A
    malformed row raises ``ValueError`` naming the file, line and column, or with ``skip_malformed`` is left out and
    counted in :class:`PassCounts`.

    Args:
        mapping: The column mapping.
        side_tables: The joins, read.
        skip_malformed: Skip and count malformed rows instead of raising.
        non_finite: What a NaN or infinite dense value does: ``"error"`` (a malformed row) or ``"zero"`` (read as 0,
            counted in :class:`PassCounts`).
    """

    def __init__(self, mapping: ColumnMapping, side_tables: Sequence[SideTable] = (), skip_malformed: bool = False,
                 non_finite: str = "error") -> None:
        check_non_finite(non_finite)
        self.mapping, self.side_tables, self.skip_malformed = mapping, list(side_tables), skip_malformed
        self.non_finite = non_finite
        self.file_columns = mapping.file_columns()
        # Single-ID columns are read as dictionaries (see ColumnarFile.chunks); delimited ones are split as text.
        self.dictionary_columns = [f.column for f in mapping.sparse if f.delimiter is None
                                   and f.column not in mapping.joined_columns]

    def rows(self, file: ColumnarFile, counts: PassCounts, use_threads: bool = True) -> Iterator[Rows]:
        """Every row of ``file``, decoded, chunk by chunk."""
        malformed: list[MalformedRow] | None = [] if self.skip_malformed else None
        for first_row, table in file.chunks(self.file_columns, malformed, use_threads, self.dictionary_columns):
            if malformed:
                _note_malformed(file, malformed, counts)
                malformed.clear()
            yield self.decode(table, file, first_row, counts)
        if malformed:
            _note_malformed(file, malformed, counts)

    def decode(self, table: pa.Table, file: ColumnarFile, first_row: int, counts: PassCounts) -> Rows:
        keep = np.ones(table.num_rows, dtype=bool)
        label = self.mapping.label
        for column in [label.column, *(f.column for f in self.mapping.dense), self.mapping.time_column]:
            if column is not None and pa.types.is_nested(table[column].type):
                raise ValueError(f"{file.path}, column {column!r}: holds {table[column].type} (several values per "
                                 "row) where one number per row is expected; map it as a sparse feature, or give "
                                 "a column of numbers")
        values, present, unreadable = _numbers(table[label.column])
        if file.kind == "csv" and not present.all():
            # A blank line reads as a row of empty values; only rows without a label can be one.
            candidates = np.flatnonzero(~present)
            empty = np.ones(len(candidates), dtype=bool)
            for name in table.column_names:
                empty &= _empty_mask(table[name].take(pa.array(candidates)))
            keep[candidates[empty]] = False
            counts.empty += int(empty.sum())
        for side in self.side_tables:
            table, unmatched = side.apply(table)
            counts.unmatched[side.path] = counts.unmatched.get(side.path, 0) + unmatched
        problems: list[tuple[np.ndarray, str, str]] = []  # (rows, column, reason), checked together below

        problems += [(~present, label.column, "the label is empty:"),
                     (unreadable, label.column, "the label is not a number:")]
        if label.threshold is not None:
            labels = (values >= label.threshold).astype(np.float32)
        else:
            problems.append((present & ~unreadable & np.isfinite(values) & (values != 0) & (values != 1),
                             label.column, "the label must be 0 or 1 (or give label.threshold), got"))
            labels = values.astype(np.float32)
        problems.append((present & ~unreadable & ~np.isfinite(values), label.column, "the label is not finite:"))
        dense = np.zeros((table.num_rows, len(self.mapping.dense)), dtype=np.float32)
        for j, feature in enumerate(self.mapping.dense):
            values, present, unreadable = _numbers(table[feature.column])
            problems.append((unreadable, feature.column, "not a number:"))
            non_finite = present & ~unreadable & ~np.isfinite(values)
            if self.non_finite == "error":
                problems.append((non_finite, feature.column, "a dense value must be finite (or pass "
                                 "non_finite='zero' to read NaN and infinity as 0), got"))
            elif non_finite.any():
                counts.non_finite += int(non_finite.sum())
            values = np.where(present & ~unreadable & ~non_finite, values, 0.0)
            if feature.transform == "log1p":
                values = np.log1p(np.maximum(values, 0.0))
            dense[:, j] = values
        times = None
        if self.mapping.time_column is not None:
            column = self.mapping.time_column
            times, present, unreadable = _numbers(table[column])
            problems += [(~present, column, "the time is empty:"), (unreadable, column, "the time is not a number:")]
        self._handle(problems, keep, table, file, first_row, counts)
        sparse = table.select([f.column for f in self.mapping.sparse])
        return Rows(labels, dense, times, sparse).take(keep)

    def _handle(self, problems: list[tuple[np.ndarray, str, str]], keep: np.ndarray, table: pa.Table,
                file: ColumnarFile, first_row: int, counts: PassCounts) -> None:
        """Raise for the first malformed row in file order, or leave every malformed row out and count it."""
        bad = np.zeros(len(keep), dtype=bool)
        for mask, _, _ in problems:
            bad |= mask
        bad &= keep
        if not bad.any():
            return

        def describe(row: int, where: str) -> str:
            mask, column, reason = next(p for p in problems if p[0][row])
            return f"{file.path}, {where}, column {column!r}: {reason} {table[column][row].as_py()!r}"

        rows = np.flatnonzero(bad)
        if not self.skip_malformed:
            row = int(rows[0])
            raise ValueError(describe(row, file.where(first_row + row)) +
                             " (pass skip_malformed=True to skip and count such rows)")
        for row in rows:
            # Locating a CSV line reads the file again: only for the few examples the log shows.
            where = file.where(first_row + int(row)) if counts.wants_example else f"row {first_row + int(row) + 1}"
            counts.note(describe(int(row), where))
        keep &= ~bad


NON_FINITE_POLICIES = ("error", "zero")


def check_non_finite(policy: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is one of :data:`NON_FINITE_POLICIES`."""
    if policy not in NON_FINITE_POLICIES:
        raise ValueError(f"non_finite must be one of {list(NON_FINITE_POLICIES)}, got {policy!r}")


def _note_malformed(file: ColumnarFile, rows: Sequence[MalformedRow], counts: PassCounts) -> None:
    for row in rows:
        where = f"line {row.line}" if row.line is not None else "a line"
        counts.note(f"{file.path}, {where}: expected {row.expected_columns} fields, found {row.actual_columns}")


def _empty_mask(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    if pa.types.is_dictionary(array.type):
        empty = np.asarray(pc.fill_null(pc.equal(array.dictionary, ""), True)) if len(array.dictionary) else \
            np.zeros(0, dtype=bool)
        indices = np.asarray(pc.fill_null(array.indices, 0), dtype=np.int64)
        mask = empty[indices] if len(empty) else np.ones(len(array), dtype=bool)
        return mask | np.asarray(array.is_null())
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return np.asarray(pc.fill_null(pc.equal(array, ""), True))
    return np.asarray(array.is_null())


def _numbers(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values float64, present, unreadable)``: absent (null or empty) values are 0 and not present."""
    array = column.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        array = pc.utf8_trim_whitespace(array)
        array = pc.if_else(pc.equal(array, ""), pa.scalar(None, array.type), array)
    present = ~np.asarray(array.is_null())
    try:
        numbers = pc.cast(array, pa.float64())
        unreadable = np.zeros(len(array), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        unreadable = _unreadable(array)
        numbers = pc.cast(pc.if_else(pa.array(unreadable), pa.scalar(None, array.type), array), pa.float64())
    values = np.asarray(pc.fill_null(numbers, 0.0), dtype=np.float64)
    return values, present, unreadable


def _unreadable(array: pa.Array) -> np.ndarray:
    """Which values do not cast to float64: halves are cast until the bad values are single (rare: errors only)."""
    bad = np.zeros(len(array), dtype=bool)
    pending = [(0, len(array))]
    while pending:
        start, stop = pending.pop()
        try:
            pc.cast(array.slice(start, stop - start), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            if stop - start == 1:
                bad[start] = True
            else:
                middle = (start + stop) // 2
                pending.extend([(middle, stop), (start, middle)])
    return bad
