"""The Criteo datasets (TSV and TorchRec npy), sharded by rank and DataLoader worker."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from lightning_skew.data.base import Batch
from lightning_skew.data.criteo.files import _LineStream, check_has_lines, resolve_npy_days, resolve_tsv_paths
from lightning_skew.data.criteo.parse import (
    _handle_malformed,
    hash_categorical,
    make_batch,
    parse_tsv_lines,
    transform_dense,
)
from lightning_skew.data.criteo.vocabulary import CriteoVocabulary
from lightning_skew.data.features import CRITEO_KAGGLE_CARDINALITIES, CRITEO_NUM_DENSE, CRITEO_NUM_SPARSE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlobalBatchSharding:
    """Which rows of a stream a rank and DataLoader worker read (see :mod:`lightning_skew.data.criteo`).

    The rows of the stream, in order, are cut into global batches of ``W * B`` rows; rank ``r`` reads rows
    ``[r * n // W, (r + 1) * n // W)`` of a global batch of ``n`` rows (``[r * B, (r + 1) * B)`` of a full
    one), and worker ``w`` of ``k`` yields the global batches ``j`` with ``j % k == w``. The last global
    batch may be partial: it is split as evenly over the ranks as the rule says (shares differ by at most one
    row), so every rank yields the same number of batches and no rank waits. A partial batch of fewer rows than
    ranks rides with the full batch before it (whose shares become ``B`` or ``B + 1``), so that no rank gets an
    empty batch. With ``drop_last`` the partial rows are dropped instead (the readers count them).

    A pass resumed mid-epoch starts at global batch ``s`` (``first_batch``): batches before it are passed over,
    and worker ``w`` yields the batches ``j >= s`` with ``(j - s) % k == w``, so that the DataLoader's round robin
    (worker 0 first) still hands them on in order.

    Attributes:
        batch_size: Rows per rank and batch (``B``).
        rank: This process's rank (``r``).
        world_size: Number of ranks (``W``).
        worker_id: This DataLoader worker (0 without workers).
        num_workers: Number of DataLoader workers (1 without workers).
        drop_last: Drop the rows past the last full global batch instead of reading them.
        first_batch: The first global batch yielded (``s``); the ones before it were trained before a resume.
    """

    batch_size: int
    rank: int = 0
    world_size: int = 1
    worker_id: int = 0
    num_workers: int = 1
    drop_last: bool = False
    first_batch: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if not 0 <= self.worker_id < self.num_workers:
            raise ValueError(f"worker_id must be in [0, {self.num_workers}), got {self.worker_id}")
        if self.first_batch < 0:
            raise ValueError(f"first_batch must be at least 0, got {self.first_batch}")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def lookahead(self) -> int:
        """Rows a reader must see ahead (or learn that the stream ends) to size the next global batch."""
        return self.global_batch_size + self.world_size

    def owns(self, global_batch: Any) -> Any:
        """Whether this worker yields global batch ``global_batch`` (an int, or elementwise for an array)."""
        first = self.first_batch
        return (global_batch >= first) & ((global_batch - first) % self.num_workers == self.worker_id)

    def batches_owned(self, num_batches: int) -> int:
        """Global batches this worker yields out of the pass's first ``num_batches``."""
        return len(range(self.first_batch + self.worker_id, num_batches, self.num_workers))

    def next_global_batch(self, remaining: int) -> int:
        """Rows of the next global batch when ``remaining`` rows are left (counting at most :attr:`lookahead`);
        0 when no batch is left, the rest (if any) being dropped.

        Raises ``ValueError`` when fewer rows than ranks are left of a stream that had no full global batch.
        """
        full, ranks = self.global_batch_size, self.world_size
        if remaining >= full:
            tail = remaining - full
            # A tail too small to give every rank a row rides with this last full batch.
            return full if tail == 0 or tail >= ranks or self.drop_last else remaining
        if remaining == 0 or self.drop_last:
            return 0
        if remaining < ranks:
            raise ValueError(f"{remaining} inputs cannot be split over {ranks} ranks (every rank needs at least "
                             "one in each step): use fewer ranks or more data")
        return remaining

    def plan(self, num_rows: int) -> list[int]:
        """Rows of every global batch of a stream of ``num_rows`` rows, in order."""
        sizes: list[int] = []
        left = num_rows
        while rows := self.next_global_batch(min(left, self.lookahead)):
            sizes.append(rows)
            left -= rows
        return sizes

    def rank_rows(self, rows: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's share of a global batch of ``rows`` rows."""
        return self.rank * rows // self.world_size, (self.rank + 1) * rows // self.world_size

    def with_current_worker(self, first_batch: int = 0) -> GlobalBatchSharding:
        """This sharding for the DataLoader worker the caller runs in (unchanged outside workers), for a pass that
        starts at global batch ``first_batch``."""
        info = get_worker_info()
        if info is None:
            return replace(self, first_batch=first_batch)
        return replace(self, worker_id=info.id, num_workers=info.num_workers, first_batch=first_batch)


def _no_batch_error(what: str, num_rows: int, sharding: GlobalBatchSharding) -> ValueError:
    return ValueError(
        f"{what}: {num_rows} inputs make no complete global batch of {sharding.global_batch_size} "
        f"({sharding.batch_size} x {sharding.world_size} ranks) and drop_last=True drops them all: "
        "lower batch_size or set drop_last=False"
    )


def _check_table_sizes(num_embeddings_per_feature: Sequence[int]) -> list[int]:
    sizes = [int(n) for n in num_embeddings_per_feature]
    if len(sizes) != CRITEO_NUM_SPARSE:
        raise ValueError(
            f"num_embeddings_per_feature: expected {CRITEO_NUM_SPARSE} table sizes (one per Criteo "
            f"categorical feature, C1 .. C26), got {len(sizes)}"
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
            return hash_categorical(raw, self.num_embeddings_per_feature, missing)
        ids = self.vocabulary.lookup(raw, missing)
        # Rows are in frequency order, so a cap keeps the most frequent values.
        return np.where(ids < np.asarray(self.num_embeddings_per_feature), ids, 0)


class CriteoTsvDataset(IterableDataset):
    """Streams Criteo TSV files (plain or gzip) as torchrec Batches, sharded by rank and worker.

    Memory is bounded by one global batch of lines (plus one line per rank of look-ahead); a file is never
    loaded whole. Each worker scans every line of the stream but parses only its own rank's lines of its own
    global batches. Every line is read: the last global batch may be partial and is split over the ranks (see
    :class:`GlobalBatchSharding`), unless ``drop_last`` drops it. No shuffling is done (Criteo days are in
    time order).

    With ``skip_malformed=True`` a malformed line is dropped from its batch (which is then smaller:
    sharding counts raw lines so that it does not depend on content) and counted in
    :attr:`num_malformed_lines`; a warning with the count is logged at the end of each pass. After a pass,
    :attr:`num_lines` is the number of lines in the stream (as :func:`build_vocabulary` counts them) and
    :attr:`num_dropped_lines` the lines ``drop_last`` left out (logged as well).

    .. note::
        Under DataLoader workers the counts live in the worker processes: read them from their log
        lines; the attributes are exact only with ``num_workers=0``.

    .. note::
        Set :attr:`skip_first` to ``s`` and the next pass (in every worker) starts at global batch ``s``: a run
        resumed mid-epoch trained the batches before it. Their lines are read but not parsed.

    Args:
        paths: TSV files, directories or globs, read in this order. A file without any line is an error.
        batch_size: Examples per batch on this rank.
        num_embeddings_per_feature: Rows of each of the 26 tables (IDs are below these).
        vocabulary: Map values through this vocabulary instead of hashing; ``None`` hashes.
        rank: This process's rank.
        world_size: Number of ranks.
        skip_malformed: Skip and count malformed lines instead of raising ``ValueError``.
        drop_last: Drop the lines past the last full global batch (for training); ``False`` reads them as a
            last, smaller batch on every rank.
        what: How errors name these paths (the DataModule passes ``"train_paths"``, ...).

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
        drop_last: bool = False,
        what: str = "paths",
    ) -> None:
        self.files = resolve_tsv_paths(paths, what)
        check_has_lines(self.files, what)
        self.what = what
        self.sharding = GlobalBatchSharding(batch_size, rank, world_size, drop_last=drop_last)
        self.encode = _CategoricalEncoder(num_embeddings_per_feature, vocabulary)
        self.skip_malformed = skip_malformed
        self.num_malformed_lines = 0
        self.num_lines = 0
        self.num_dropped_lines = 0
        self.skip_first = 0  # global batches the first pass leaves out (a run resumed mid-epoch trained them)

    def __iter__(self) -> Iterator[Batch]:
        # Persistent workers keep their own copy, so each copy skips on its first pass only, as the main one does.
        skip, self.skip_first = self.skip_first, 0
        sharding = self.sharding.with_current_worker(skip)
        stream = _LineStream(self.files)
        self.num_malformed_lines = self.num_lines = self.num_dropped_lines = 0
        global_batch = 0
        try:
            if skip:
                # Every global batch before the last is full: all but the last skipped batch go at once, in bounded
                # memory and unparsed; the loop passes over that one (which may be the last, partial one).
                global_batch = skip - 1
                self.num_lines = stream.skip(global_batch * sharding.global_batch_size)
                if self.num_lines < global_batch * sharding.global_batch_size:
                    raise self._shorter_than_checkpoint(skip, sharding)
            while True:
                remaining = stream.peek(sharding.lookahead)
                try:
                    rows = sharding.next_global_batch(remaining)
                except ValueError as error:
                    if skip:  # too few lines for the ranks, left by the skip: not the stream the checkpoint read
                        self.num_lines += remaining
                        raise self._shorter_than_checkpoint(skip, sharding) from None
                    raise ValueError(f"{self.what} ({', '.join(self.files)}): {error}") from None
                if rows == 0:
                    self.num_dropped_lines = stream.skip(remaining)
                    self.num_lines += self.num_dropped_lines
                    break
                self.num_lines += rows
                if not sharding.owns(global_batch):
                    stream.skip(rows)
                    global_batch += 1
                    continue
                start, stop = sharding.rank_rows(rows)
                lines = stream.take(rows)[start:stop]
                parsed = parse_tsv_lines(lines)
                self.num_malformed_lines += _handle_malformed(
                    parsed, lambda index, first=start: stream.locate(first + index), self.skip_malformed
                )
                ids = self.encode(parsed.categorical, parsed.categorical_missing)
                yield make_batch(transform_dense(parsed.dense), ids, parsed.labels)
                global_batch += 1
            if global_batch < skip:
                raise self._shorter_than_checkpoint(skip, sharding)
            if global_batch == 0:
                raise _no_batch_error(f"{self.what} ({', '.join(self.files)})", self.num_lines, sharding)
        finally:
            stream.close()
            _log_pass("Criteo TSV", sharding, self.num_malformed_lines, self.num_dropped_lines)

    def _shorter_than_checkpoint(self, skip: int, sharding: GlobalBatchSharding) -> ValueError:
        return ValueError(
            f"{self.what} ({', '.join(self.files)}): the checkpoint was taken after {skip} global batches of "
            f"{sharding.global_batch_size} lines in this epoch, but the files hold only {self.num_lines} lines: did "
            "they change since? Resume from a checkpoint taken at the end of an epoch, or start afresh")


def _log_pass(reader: str, sharding: GlobalBatchSharding, malformed: int, dropped: int) -> None:
    if malformed:
        log.warning("%s (rank %d, worker %d): skipped %d malformed lines in this pass",
                    reader, sharding.rank, sharding.worker_id, malformed)
    if dropped and sharding.rank == 0 and sharding.worker_id == 0:  # every rank and worker drops the same rows
        log.warning("%s: drop_last dropped the last %d inputs of this pass (a partial global batch)", reader, dropped)


class CriteoNpyDataset(IterableDataset):
    """Reads TorchRec's preprocessed Criteo npy days (memory-mapped) as torchrec Batches.

    The layout is the one ``torchrec.datasets.criteo.BinaryCriteoUtils.tsv_to_npys`` writes: per day
    ``day_{i}_dense.npy`` (``float32 [N, 13]``, already ``log(x - min + 2)``: used as is),
    ``day_{i}_sparse.npy`` (integer ``[N, 26]``, raw hexadecimal values: taken modulo the table
    size, or through the vocabulary) and ``day_{i}_labels.npy`` (``[N, 1]`` or ``[N]``). An integer
    dense array is taken to be raw counts and gets :func:`transform_dense`. ``int32`` sparse values
    (TorchRec's shuffle script) are read as ``uint32`` so that they hash like the TSV's values.
    Sharding is the same as :class:`CriteoTsvDataset`'s, over the rows of all days in order, the last partial
    global batch included unless ``drop_last``; the length is known, so the dataset has one.

    Args:
        days: ``(dense, sparse, labels)`` paths per day, or anything :func:`resolve_npy_days` takes. A day
            without any row is an error.
        batch_size: Examples per batch on this rank.
        num_embeddings_per_feature: Rows of each of the 26 tables (IDs are below these).
        vocabulary: Map values through this vocabulary instead of hashing; ``None`` hashes.
        rank: This process's rank.
        world_size: Number of ranks.
        drop_last: Drop the rows past the last full global batch (for training).
        what: How errors name these paths.

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
        drop_last: bool = False,
        what: str = "paths",
    ) -> None:
        if isinstance(days, str) or (days and isinstance(days[0], str)):
            days = resolve_npy_days(days, what)  # type: ignore[arg-type]
        if not days:
            raise ValueError(f"{what}: expected at least one npy day, got an empty list")
        self.days = [tuple(day) for day in days]
        self.sharding = GlobalBatchSharding(batch_size, rank, world_size, drop_last=drop_last)
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
            if len(dense) == 0:
                raise ValueError(f"{what}: TorchRec npy day {dense_path!r} holds no rows; replace it or leave it "
                                 f"out of {what}")
            self.num_rows_per_day.append(len(dense))
        num_rows = sum(self.num_rows_per_day)
        try:
            #: Rows of each global batch, in order.
            self.global_batch_rows = self.sharding.plan(num_rows)
        except ValueError as error:
            raise ValueError(f"{what} ({len(self.days)} npy days): {error}") from None
        if not self.global_batch_rows:
            raise _no_batch_error(f"{what} ({len(self.days)} npy days)", num_rows, self.sharding)
        self.num_dropped_rows = num_rows - sum(self.global_batch_rows)
        self.skip_first = 0  # global batches the first pass leaves out (a run resumed mid-epoch trained them)

    def __len__(self) -> int:
        """Batches this rank yields in one pass (over all workers together)."""
        return len(self.global_batch_rows)

    def _rows(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        pieces, offset = [], 0
        for array in arrays:
            lo, hi = max(start - offset, 0), min(stop - offset, len(array))
            if lo < hi:
                pieces.append(np.array(array[lo:hi]))  # a copy: tensors need writable memory
            offset += len(array)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _non_finite(self, dense: np.ndarray, start: int) -> ValueError:
        """The error for a batch of stored dense values holding NaN or infinity, naming the day's file, row, column."""
        row, column = (int(i) for i in np.argwhere(~np.isfinite(dense))[0])
        index, day = start + row, 0
        while index >= self.num_rows_per_day[day]:
            index -= self.num_rows_per_day[day]
            day += 1
        return ValueError(f"{self.days[day][0]}, row {index + 1}, dense column {column + 1} (I{column + 1}): "
                          f"{dense[row, column]} is not finite; the model would train to NaN. Fix the preprocessing "
                          "that wrote it")

    def __iter__(self) -> Iterator[Batch]:
        skip, self.skip_first = self.skip_first, 0  # as CriteoTsvDataset's
        sharding = self.sharding.with_current_worker(skip)
        dense_arrays, sparse_arrays, labels_arrays = (
            [np.load(day[k], mmap_mode="r") for day in self.days] for k in range(3)
        )
        offset = 0
        for global_batch, rows in enumerate(self.global_batch_rows):
            first = offset
            offset += rows
            if not sharding.owns(global_batch):
                continue
            start, stop = (first + bound for bound in sharding.rank_rows(rows))
            dense = self._rows(dense_arrays, start, stop)
            if not np.issubdtype(dense.dtype, np.floating):
                dense = transform_dense(dense)
            elif not np.isfinite(dense).all():
                raise self._non_finite(dense, start)
            sparse = self._rows(sparse_arrays, start, stop)
            if sparse.dtype == np.int32:
                sparse = sparse.view(np.uint32)
            ids = self.encode(sparse.astype(np.uint64), None)
            labels = self._rows(labels_arrays, start, stop).reshape(-1)
            yield make_batch(dense, ids, labels)
        _log_pass("Criteo npy", sharding, 0, self.num_dropped_rows)
