"""The pass before training: rows per split, time boundaries and vocabularies, read from the files."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_skew.data.columnar.decoding import PassCounts, RowDecoder, Rows
from lightning_skew.data.columnar.encoding import Vocabulary, VocabularyCounter
from lightning_skew.data.columnar.readers import ColumnarFile
from lightning_skew.data.columnar.splits import (
    SPLITS,
    TimeBoundaries,
    TimeCounts,
    split_codes,
    time_boundaries,
)

__all__ = ["Preparation", "prepare"]

log = logging.getLogger(__name__)


@dataclass
class Preparation:
    """What the preparation pass found.

    Attributes:
        num_rows: Rows of each split (``train``, ``val``, ``test``; 0 for a split without data).
        boundaries: Where validation and test begin in time, for a time-ordered split; else ``None``.
        vocabularies: Per vocabulary-encoded feature, its vocabulary (from the training rows only).
        counts: Rows the pass skipped or filled in (malformed, empty, unmatched in a join).
        seconds: Time the pass took.
    """

    num_rows: dict[str, int]
    boundaries: TimeBoundaries | None = None
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)
    counts: PassCounts = field(default_factory=PassCounts)
    seconds: float = 0.0


def _rows_of_file(file: ColumnarFile, decoder: RowDecoder, counts: PassCounts, what: str):
    """The decoded rows of one file; a file without any row is an error naming it."""
    num_rows = 0
    for rows in decoder.rows(file, counts):
        num_rows += len(rows)
        yield rows
    if num_rows == 0:
        raise ValueError(f"{file.path}: no rows ({what}); remove the file or give one with data")


def prepare(
    files: dict[str, Sequence[ColumnarFile]],
    decoder: RowDecoder,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
) -> Preparation:
    """Read what training needs to know before it starts.

    ``files`` maps each split to its files; with ``val_fraction`` / ``test_fraction`` (and the mapping's time
    column) the held-out splits are cut from the training files by time instead. One pass over the training
    files counts their rows (and times); a second one counts the vocabularies' values in the training rows when
    the split is by time. Held-out files are counted (CSV; Parquet from its metadata, unless malformed rows are
    skipped). Every row is decoded as the loaders will decode it, so the counts are exactly what they deliver,
    and bad values fail here, before training.
    """
    began = time.perf_counter()
    mapping = decoder.mapping
    counters = {f.column: VocabularyCounter(f) for f in mapping.vocabulary_features()}
    counts = PassCounts()
    num_rows = {split: 0 for split in SPLITS}
    boundaries = None

    def count_vocabulary(rows: Rows) -> None:
        for feature in counters.values():
            feature.update(rows.sparse[feature.feature.column])

    by_time = val_fraction > 0 or test_fraction > 0
    if by_time:
        column = mapping.time_column
        assert column is not None, "a time-ordered split needs the mapping's time column"
        times = TimeCounts()
        for file in files["train"]:
            for rows in _rows_of_file(file, decoder, counts, "training file"):
                times.update(rows.times)  # type: ignore[arg-type]
        boundaries = time_boundaries(times, val_fraction, test_fraction, column)
        num_rows.update(boundaries.num_rows)
        if counters:
            counts = PassCounts()  # the second pass finds the same: count it once
            for file in files["train"]:
                for rows in decoder.rows(file, counts):
                    count_vocabulary(rows.take(split_codes(rows.times, boundaries) == 0))  # type: ignore[arg-type]
    for split in SPLITS:
        if by_time and split == "train":
            continue
        for file in files.get(split, ()):
            if split == "train" and counters:
                for rows in _rows_of_file(file, decoder, counts, "training file"):
                    num_rows[split] += len(rows)
                    count_vocabulary(rows)
            elif file.num_rows() is not None and not decoder.skip_malformed:
                if file.num_rows() == 0:
                    raise ValueError(f"{file.path}: no rows ({split} file); remove the file or give one with data")
                num_rows[split] += int(file.num_rows())  # type: ignore[arg-type]
            else:
                num_rows[split] += sum(len(rows) for rows in _rows_of_file(file, decoder, counts, f"{split} file"))
    vocabularies = {name: counter.build() for name, counter in counters.items()}
    for name, vocabulary in vocabularies.items():
        if len(vocabulary.values) == 0:
            raise ValueError(f"feature {name!r}: no value in the training rows is seen min_frequency="
                             f"{counters[name].feature.min_frequency} times; lower it or use the hash encoding")
    seconds = time.perf_counter() - began
    log.info("columnar data prepared in %.1f s: %s rows; vocabularies %s", seconds, num_rows,
             {n: v.num_embeddings for n, v in vocabularies.items()})
    return Preparation(num_rows, boundaries, vocabularies, counts, seconds)
