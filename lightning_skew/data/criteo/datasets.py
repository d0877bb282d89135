"""The Criteo datasets (TSV and TorchRec npy), sharded by rank and DataLoader worker."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from lightning_skew.data.base import Batch
from lightning_skew.data.criteo.files import _LineStream, resolve_npy_days, resolve_tsv_paths
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
    every line of the stream but parses only its own rank's lines of its own global batches. See
    :mod:`lightning_skew.data.criteo` for the exact sharding; no shuffling is done (Criteo days are in time
    order).

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
