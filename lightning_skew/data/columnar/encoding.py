"""Categorical values to embedding rows: a frequency-thresholded vocabulary or hashing, one ID or many."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib.stride_tricks import sliding_window_view

from lightning_skew.data.columnar.spec import SparseFeature

__all__ = ["MISSING_ROW", "OUT_OF_VOCABULARY_ROW", "FeatureEncoder", "Vocabulary", "VocabularyCounter",
           "hash_strings", "tokens_of"]

MISSING_ROW = 0
OUT_OF_VOCABULARY_ROW = 1
_FIRST_VOCABULARY_ROW = 2

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ALL_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)
# Vocabulary counts are merged once this many chunk counts have gathered.
_MERGE_EVERY = 32


def _splitmix_finish(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_strings(strings: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string's UTF-8 bytes (``uint64 [n]``; a null hashes as the empty string).

    The bytes are taken 8 at a time and mixed in with splitmix64's finaliser, all strings at once with numpy:
    the cost is a few array operations per 8 bytes of the longest string, over the strings still that long.
    """
    if pa.types.is_large_string(strings.type):
        strings = strings.cast(pa.string())
    buffers = strings.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[strings.offset: strings.offset + len(strings) + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, dtype=np.uint8)
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    if strings.null_count:
        lengths = np.where(np.asarray(strings.is_null()), 0, lengths)
    # 8-byte windows of a zero-padded copy: window i is data[i : i + 8].
    words = sliding_window_view(np.concatenate([data, np.zeros(8, dtype=np.uint8)]), 8)
    with np.errstate(over="ignore"):
        hashes = lengths.astype(np.uint64) * _GOLDEN
        for offset in range(0, int(lengths.max(initial=0)), 8):
            live = np.flatnonzero(lengths > offset) if offset else np.arange(len(lengths))
            word = np.ascontiguousarray(words[starts[live] + offset]).view(np.uint64).reshape(-1)
            remaining = np.minimum(lengths[live] - offset, 8).astype(np.uint64)
            mask = np.where(remaining >= 8, _ALL_BITS, (np.uint64(1) << (remaining * np.uint64(8))) - np.uint64(1))
            hashes[live] = _splitmix_finish((hashes[live] ^ (word & mask)) + _GOLDEN)
    return hashes


def _as_strings(array: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_string(array.type):
        return array
    if pa.types.is_large_string(array.type) or pa.types.is_integer(array.type) or pa.types.is_boolean(array.type):
        return array.cast(pa.string())
    if pa.types.is_floating(array.type):
        raise TypeError(f"a categorical column holds floating-point values ({array.type}); write them as integers "
                        "or strings, or use the column as a dense feature")
    return array.cast(pa.string())


def tokens_of(column: pa.ChunkedArray | pa.Array, feature: SparseFeature) -> tuple[pa.Array, np.ndarray | None]:
    """The values of a column as strings, and for multi-hot features the number of values of each input.

    Single IDs: one string (or null) per input and ``None``. Multi-hot (a ``delimiter``, or a list column):
    the inputs' tokens one after the other, empty tokens and missing codes left out, and their counts.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    is_list = pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
    if not is_list and feature.delimiter is None:
        if pa.types.is_dictionary(array.type) and pa.types.is_string(array.type.value_type):
            return array, None  # kept as a dictionary: its distinct values are encoded once
        return _as_strings(array), None
    if not is_list:
        array = pc.split_pattern(_as_strings(array), feature.delimiter)
    tokens = _as_strings(pc.list_flatten(array))
    parents = np.asarray(pc.list_parent_indices(array), dtype=np.int64)
    kept = np.asarray(pc.fill_null(pc.invert(_missing_mask(tokens, feature)), False))
    lengths = np.bincount(parents[kept], minlength=len(array)).astype(np.int32)
    return tokens.filter(pa.array(kept)), lengths


def _missing_mask(strings: pa.Array, feature: SparseFeature) -> pa.Array:
    """True where a value is missing: null, empty, or one of the feature's missing codes."""
    missing = pc.fill_null(pc.equal(strings, ""), True)
    if feature.missing_values:
        missing = pc.or_(missing, pc.is_in(strings, value_set=pa.array(feature.missing_values, pa.string())))
    return missing


class Vocabulary:
    """The kept values of one feature and their rows: ``2..``, most frequent first (ties by value).

    Row 0 is the missing value and row 1 every value outside the vocabulary. Lookups go through 64-bit hashes of
    the values (sorted, searched with numpy); two kept values with one hash are an error at build time.

    Args:
        feature: The feature's name.
        values: The kept values, most frequent first.
        counts: How often each was seen in the training rows.

    Example::

        vocabulary = Vocabulary("genre", ["Drama", "Comedy"], [40, 30])
        vocabulary.rows_of(pa.array(["Comedy", "Western"]))  # array([3, 1])
    """

    def __init__(self, feature: str, values: Sequence[str] | pa.Array, counts: Sequence[int] | np.ndarray) -> None:
        self.feature = feature
        self.values = values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())
        self.counts = np.asarray(counts, dtype=np.int64)
        hashes = hash_strings(self.values)
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]
        self._rows = (order + _FIRST_VOCABULARY_ROW).astype(np.int64)
        same = np.flatnonzero(self._hashes[1:] == self._hashes[:-1])
        if len(same):
            a, b = self.values[int(order[same[0]])], self.values[int(order[same[0] + 1])]
            raise ValueError(f"feature {feature!r}: the values {a.as_py()!r} and {b.as_py()!r} share a 64-bit hash; "
                             "use the hash encoding for this feature")

    @property
    def num_embeddings(self) -> int:
        """Rows of the table: the kept values, the missing row and the out-of-vocabulary row."""
        return len(self.values) + _FIRST_VOCABULARY_ROW

    def rows_of(self, strings: pa.Array) -> np.ndarray:
        """Rows (``int64``) of values (not missing ones: the caller marks those)."""
        hashes = hash_strings(strings)
        if len(self._hashes) == 0:
            return np.full(len(hashes), OUT_OF_VOCABULARY_ROW, dtype=np.int64)
        position = np.minimum(np.searchsorted(self._hashes, hashes), len(self._hashes) - 1)
        return np.where(self._hashes[position] == hashes, self._rows[position], OUT_OF_VOCABULARY_ROW)

    def value_of(self, row: int) -> str | None:
        """The value a row stands for (``None`` for the missing and out-of-vocabulary rows)."""
        index = row - _FIRST_VOCABULARY_ROW
        return self.values[index].as_py() if 0 <= index < len(self.values) else None


class VocabularyCounter:
    """Counts the values of one feature over chunks (exact, by Arrow's hash tables), then builds its vocabulary.

    Memory: the distinct values and their counts, about 16 bytes plus the value's length each.
    """

    def __init__(self, feature: SparseFeature) -> None:
        self.feature = feature
        self._parts: list[pa.Table] = []

    def update(self, column: pa.ChunkedArray | pa.Array) -> None:
        tokens, lengths = tokens_of(column, self.feature)
        if pa.types.is_dictionary(tokens.type):
            indices = np.asarray(pc.drop_null(tokens.indices), dtype=np.int64)
            counts = np.bincount(indices, minlength=len(tokens.dictionary))
            seen = (counts > 0) & ~np.asarray(_missing_mask(tokens.dictionary, self.feature))
            part = pa.table({"value": tokens.dictionary.filter(pa.array(seen)), "count": counts[seen]})
        else:
            if lengths is None:
                tokens = tokens.filter(pc.invert(_missing_mask(tokens, self.feature)))
            counts = pc.value_counts(tokens)
            part = pa.table({"value": counts.field(0), "count": counts.field(1).cast(pa.int64())})
        self._parts.append(part)
        if len(self._parts) >= _MERGE_EVERY:
            self._parts = [self._merged()]

    def _merged(self) -> pa.Table:
        if not self._parts:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        table = pa.concat_tables(self._parts)
        if len(self._parts) == 1:
            return table
        summed = table.group_by("value").aggregate([("count", "sum")])
        return pa.table({"value": summed["value"], "count": summed["count_sum"]})

    def build(self) -> Vocabulary:
        """The values seen at least ``min_frequency`` times, capped at ``num_embeddings`` rows, most frequent first."""
        table = self._merged()
        table = table.filter(pc.greater_equal(table["count"], self.feature.min_frequency))
        table = table.sort_by([("count", "descending"), ("value", "ascending")])
        if self.feature.num_embeddings is not None:
            table = table.slice(0, max(self.feature.num_embeddings - _FIRST_VOCABULARY_ROW, 0))
        return Vocabulary(self.feature.column, table["value"].combine_chunks(),
                          table["count"].to_numpy())


class FeatureEncoder:
    """One sparse feature's values to rows: through its vocabulary or by hashing; missing values to row 0.

    Args:
        feature: The feature (its encoding, table size, delimiter and missing codes).
        vocabulary: Its vocabulary, for the vocabulary encoding.

    Example::

        encoder = FeatureEncoder(SparseFeature("site_id", encoding="hash", num_embeddings=1000))
        values, lengths = encoder(pa.array(["1fbe01fe", "", None]))  # lengths is None: one ID each
    """

    def __init__(self, feature: SparseFeature, vocabulary: Vocabulary | None = None) -> None:
        if feature.encoding == "vocabulary" and vocabulary is None:
            raise ValueError(f"feature {feature.column!r}: the vocabulary encoding needs its vocabulary")
        self.feature, self.vocabulary = feature, vocabulary

    @property
    def num_embeddings(self) -> int:
        if self.vocabulary is not None:
            return self.vocabulary.num_embeddings
        return int(self.feature.num_embeddings)  # type: ignore[arg-type]

    def _rows(self, strings: pa.Array) -> np.ndarray:
        # Distinct values are encoded once per chunk: skewed data repeats a few values many times.
        encoded = strings if pa.types.is_dictionary(strings.type) else pc.dictionary_encode(strings)
        distinct = encoded.dictionary
        if self.vocabulary is not None:
            rows = self.vocabulary.rows_of(distinct)
        else:
            buckets = np.uint64(self.num_embeddings - 1)
            rows = (hash_strings(distinct) % buckets).astype(np.int64) + 1
        rows = np.where(np.asarray(_missing_mask(distinct, self.feature)), MISSING_ROW, rows)
        indices = encoded.indices
        if indices.null_count:
            return np.where(np.asarray(indices.is_null()), MISSING_ROW,
                            rows[np.asarray(pc.fill_null(indices, 0), dtype=np.int64)])
        return rows[np.asarray(indices, dtype=np.int64)] if len(rows) else np.zeros(len(indices), np.int64)

    def __call__(self, column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """``(rows int64, lengths int32 or None)``: one row per input (``None``), or per token with the counts."""
        tokens, lengths = tokens_of(column, self.feature)
        return self._rows(tokens), lengths
