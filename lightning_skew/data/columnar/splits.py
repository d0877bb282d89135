"""Time-ordered splits: the times where validation and test begin, from the distinct times of the training rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lightning_skew.data.criteo.vocabulary import _merge_counts

__all__ = ["SPLITS", "TimeBoundaries", "TimeCounts", "split_codes", "time_boundaries"]

SPLITS = ("train", "val", "test")


class TimeCounts:
    """How many rows have each distinct time: 16 bytes per distinct time (Avazu's hours: 240 of them).

    Example::

        counts = TimeCounts()
        counts.update(np.array([3.0, 1.0, 3.0]))
        counts.times, counts.counts  # (array([1., 3.]), array([1, 2]))
    """

    def __init__(self) -> None:
        self.times = np.zeros(0, dtype=np.float64)
        self.counts = np.zeros(0, dtype=np.int64)

    def update(self, times: np.ndarray) -> None:
        chunk_times, chunk_counts = np.unique(times.astype(np.float64, copy=False), return_counts=True)
        self.times, self.counts = _merge_counts(self.times, self.counts, chunk_times, chunk_counts)

    @property
    def num_rows(self) -> int:
        return int(self.counts.sum())


@dataclass(frozen=True)
class TimeBoundaries:
    """Where the held-out splits begin: rows with ``time >= test_start`` are test, else rows with
    ``time >= val_start`` are validation, the others training. ``None``: that split is not cut from time.

    Attributes:
        val_start: The first time of the validation split.
        test_start: The first time of the test split.
        num_rows: Rows of each split (``{"train": ..., "val": ..., "test": ...}``).
    """

    val_start: float | None
    test_start: float | None
    num_rows: dict[str, int]


def _start_of_last(times: np.ndarray, counts: np.ndarray, fraction: float) -> float:
    """The time at which the last ``fraction`` of the rows (in time order) begins; ties go to the later split."""
    total = int(counts.sum())
    position = min(math.ceil((1.0 - fraction) * total), total - 1)  # index of the first held-out row
    cumulative = np.cumsum(counts)
    return float(times[int(np.searchsorted(cumulative, position, side="right"))])


def time_boundaries(counts: TimeCounts, val_fraction: float, test_fraction: float, column: str) -> TimeBoundaries:
    """The boundaries that give the last ``test_fraction`` of the rows (by time) to test, the
    ``val_fraction`` before it to validation and the rest to training.

    All rows of one time fall in one split, so with coarse times (Avazu's hours) the shares are approximate.
    Raises ``ValueError`` when a split asked for would be empty, or training would.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1 (training needs rows), got "
                         f"{val_fraction} + {test_fraction}")
    times, totals = counts.times, counts.counts
    if len(times) == 0:
        raise ValueError(f"no rows to split by time column {column!r}")
    test_start = _start_of_last(times, totals, test_fraction) if test_fraction > 0 else None
    val_start = _start_of_last(times, totals, val_fraction + test_fraction) if val_fraction > 0 else None
    boundaries = TimeBoundaries(val_start, test_start, {})
    codes = split_codes(times, boundaries)
    num_rows = {split: int(totals[codes == i].sum()) for i, split in enumerate(SPLITS)}
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and num_rows[split] == 0:
            hint = (f"all rows share one {column!r} value, so no time split can hold any out: give {split}_paths (a "
                    "file of its own), or a finer time column" if len(times) == 1 else f"raise {split}_fraction")
            raise ValueError(f"the {split} split by {column!r} is empty: the last {fraction:.0%} of the rows share "
                             f"their time with earlier ones ({len(times)} distinct times); {hint}")
    if num_rows["train"] == 0:
        hint = (f"all rows share one {column!r} value, so a time split cannot cut them: give val_paths / test_paths "
                "(files of their own), or a finer time column" if len(times) == 1 else
                "lower val_fraction / test_fraction")
        raise ValueError(f"the training split by {column!r} is empty: every row shares the time where the held-out "
                         f"splits begin ({len(times)} distinct times); {hint}")
    return TimeBoundaries(val_start, test_start, num_rows)


def split_codes(times: np.ndarray, boundaries: TimeBoundaries) -> np.ndarray:
    """Per row, the index in :data:`SPLITS` of its split (0 train, 1 val, 2 test), as ``int8``."""
    codes = np.zeros(len(times), dtype=np.int8)
    if boundaries.val_start is not None:
        codes[times >= boundaries.val_start] = 1
    if boundaries.test_start is not None:
        codes[times >= boundaries.test_start] = 2
    return codes
