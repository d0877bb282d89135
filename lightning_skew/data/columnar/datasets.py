"""One split of columnar files as torchrec Batches, sharded by rank and DataLoader worker."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.data.base import Batch
from lightning_skew.data.columnar.decoding import PassCounts, RowDecoder, Rows
from lightning_skew.data.columnar.encoding import FeatureEncoder
from lightning_skew.data.columnar.readers import ColumnarFile
from lightning_skew.data.columnar.splits import SPLITS, TimeBoundaries, split_codes
from lightning_skew.data.criteo.datasets import GlobalBatchSharding

__all__ = ["ColumnarDataset", "EncodedRows", "encode_rows", "rows_to_batch"]

log = logging.getLogger(__name__)


@dataclass
class EncodedRows:
    """Rows with their sparse features encoded: per feature the rows' IDs and (multi-hot) the IDs per input.

    Attributes:
        labels: ``float32 [n]``.
        dense: ``float32 [n, num_dense]``.
        keys: The feature names.
        ids: Per feature, ``int64`` IDs of all inputs one after the other.
        offsets: Per feature, where each input's IDs begin (``int64 [n + 1]``), or ``None``: one ID per input.
    """

    labels: np.ndarray
    dense: np.ndarray
    keys: list[str]
    ids: list[np.ndarray]
    offsets: list[np.ndarray | None]

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> EncodedRows:
        ids, offsets = [], []
        for values, where in zip(self.ids, self.offsets, strict=True):
            if where is None:
                ids.append(values[start:stop])
                offsets.append(None)
            else:
                ids.append(values[where[start]:where[stop]])
                offsets.append(where[start:stop + 1] - where[start])
        return EncodedRows(self.labels[start:stop], self.dense[start:stop], self.keys, ids, offsets)

    @staticmethod
    def concat(parts: Sequence[EncodedRows]) -> EncodedRows:
        ids, offsets = [], []
        for k in range(len(parts[0].keys)):
            ids.append(np.concatenate([p.ids[k] for p in parts]))
            if parts[0].offsets[k] is None:
                offsets.append(None)
            else:
                lengths = np.concatenate([np.diff(p.offsets[k]) for p in parts])  # type: ignore[arg-type]
                offsets.append(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
        return EncodedRows(np.concatenate([p.labels for p in parts]), np.concatenate([p.dense for p in parts]),
                           parts[0].keys, ids, offsets)

    def batch(self, start: int, stop: int) -> Batch:
        """The torchrec :class:`Batch` of inputs ``[start, stop)``."""
        values, lengths = [], []
        for ids, offsets in zip(self.ids, self.offsets, strict=True):
            if offsets is None:
                values.append(ids[start:stop])
                lengths.append(_ones(stop - start))
            else:
                values.append(ids[offsets[start]:offsets[stop]])
                lengths.append(np.diff(offsets[start:stop + 1]).astype(np.int32))
        sparse = KeyedJaggedTensor(keys=list(self.keys), values=torch.from_numpy(np.concatenate(values)),
                                   lengths=torch.from_numpy(np.concatenate(lengths)), stride=stop - start)
        return Batch(dense_features=torch.from_numpy(np.ascontiguousarray(self.dense[start:stop], dtype=np.float32)),
                     sparse_features=sparse,
                     labels=torch.from_numpy(np.ascontiguousarray(self.labels[start:stop], dtype=np.float32)))


@functools.lru_cache(maxsize=8)
def _ones(count: int) -> np.ndarray:
    """Lengths of one-hot features (read only: shared by every batch of that size)."""
    ones = np.ones(count, dtype=np.int32)
    ones.flags.writeable = False
    return ones


def encode_rows(rows: Rows, encoders: Sequence[FeatureEncoder]) -> EncodedRows:
    """Encode the sparse features of decoded rows (one call per feature over all the rows)."""
    ids, offsets = [], []
    for encoder in encoders:
        values, lengths = encoder(rows.sparse[encoder.feature.column])
        ids.append(values.astype(np.int64, copy=False))
        offsets.append(None if lengths is None else np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    return EncodedRows(rows.labels, rows.dense, [e.feature.column for e in encoders], ids, offsets)


def rows_to_batch(rows: Rows, encoders: Sequence[FeatureEncoder]) -> Batch:
    """A torchrec :class:`Batch` of decoded rows: one KeyedJaggedTensor key per feature, in encoder order."""
    return encode_rows(rows, encoders).batch(0, len(rows))


def _empty(encoders: Sequence[FeatureEncoder], decoder: RowDecoder) -> Batch:
    """A batch without inputs: a rank's share of the last validation batch when it has fewer rows than ranks."""
    empty = EncodedRows(np.zeros(0, dtype=np.float32), np.zeros((0, len(decoder.mapping.dense)), dtype=np.float32),
                        [e.feature.column for e in encoders], [np.zeros(0, dtype=np.int64) for _ in encoders],
                        [None for _ in encoders])
    return empty.batch(0, 0)


class ColumnarDataset(IterableDataset):
    """Streams one split of columnar files as torchrec Batches, sharded by rank and DataLoader worker.

    The rows of all files, in order (only the split's rows for a time-ordered split), are cut into global
    batches of ``world_size * batch_size`` rows, as :class:`~lightning_skew.data.criteo.GlobalBatchSharding`
    says: rank ``r`` takes rows ``[r B, (r + 1) B)`` of each, worker ``w`` of ``n`` the global batches
    ``j % n == w``. With ``keep_last`` (the default) the rows after the last complete global batch are yielded
    too, shared as evenly as the ranks allow (a rank may get an empty batch, so that every rank takes as many
    steps; for training, where an empty batch cannot train, fewer rows than ranks are left out and logged);
    ``keep_last=False`` yields complete global batches only (training's ``drop_last``; the rows left out are
    logged).

    Memory is bounded by a few chunks of the files (pyarrow's blocks) and one global batch. Every worker reads
    and decodes every row (so that all find the same rows and the same errors); each encodes only its own.

    Args:
        files: The files, in order.
        decoder: Decodes their chunks (the same decoding as the preparation pass).
        encoders: One per sparse feature, in feature order.
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_rows: Rows of the split (from the preparation pass), for ``len()``.
        batch_size: Rows per batch on this rank.
        boundaries: For a time-ordered split: only the rows of ``split`` are taken.
        rank: This process's rank.
        world_size: Number of ranks.
        keep_last: Also yield the rows after the last complete global batch.
    """

    def __init__(self, files: Sequence[ColumnarFile], decoder: RowDecoder, encoders: Sequence[FeatureEncoder],
                 split: str, num_rows: int, batch_size: int, boundaries: TimeBoundaries | None = None,
                 rank: int = 0, world_size: int = 1, keep_last: bool = False) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.files, self.decoder, self.encoders = list(files), decoder, list(encoders)
        self.split, self.num_rows, self.boundaries, self.keep_last = split, num_rows, boundaries, keep_last
        self.sharding = GlobalBatchSharding(batch_size, rank, world_size)
        remainder = num_rows % self.sharding.global_batch_size
        if keep_last and split == "train" and remainder < world_size:
            self.keep_last = False  # some rank's share would be empty, and an empty batch cannot train
        #: Rows of the split no batch holds (the partial last global batch, when it is left out).
        self.num_dropped_rows = 0 if self.keep_last else remainder
        self.last_pass_counts = PassCounts()
        self.skip_first = 0  # global batches the first pass leaves out (a run resumed mid-epoch trained them)

    @property
    def batch_size(self) -> int:
        return self.sharding.batch_size

    def __len__(self) -> int:
        """Batches this rank yields in one pass (over all workers together)."""
        size = self.sharding.global_batch_size
        return math.ceil(self.num_rows / size) if self.keep_last else self.num_rows // size

    def _split_rows(self, counts: PassCounts) -> Iterator[Rows]:
        code = SPLITS.index(self.split)
        for file in self.files:
            for rows in self.decoder.rows(file, counts):
                if self.boundaries is not None:
                    rows = rows.take(split_codes(rows.times, self.boundaries) == code)  # type: ignore[arg-type]
                if len(rows):
                    yield rows

    def owned_batches(self, positions: np.ndarray, first_batch: int = 0) -> np.ndarray:
        """For rows at ``positions`` of the split's stream: the global batch each belongs to on this rank and
        worker, or ``-1`` for another rank's or worker's row, one before ``first_batch`` (a resumed pass starts
        there) or one past the last batch."""
        sharding = self.sharding.with_current_worker(first_batch)
        size, rank, batch_size = sharding.global_batch_size, sharding.rank, sharding.batch_size
        batch, place = positions // size, positions % size
        last, remainder = divmod(self.num_rows, size)  # the incomplete last global batch, and its rows
        mine = (batch < last) & (place >= rank * batch_size) & (place < (rank + 1) * batch_size)
        if self.keep_last and remainder:
            low, high = self._last_share(rank, sharding.world_size)
            mine |= (batch == last) & (place >= low) & (place < high)
        mine &= sharding.owns(batch)
        return np.where(mine, batch, -1)

    def _last_share(self, rank: int, world_size: int) -> tuple[int, int]:
        remainder = self.num_rows % self.sharding.global_batch_size
        return rank * remainder // world_size, (rank + 1) * remainder // world_size

    def _expected_rows(self, batch: int) -> int:
        sharding = self.sharding.with_current_worker()
        if batch < self.num_rows // sharding.global_batch_size:
            return sharding.batch_size
        low, high = self._last_share(sharding.rank, sharding.world_size)
        return high - low

    def __iter__(self) -> Iterator[Batch]:
        # Persistent workers keep their own copy, so each copy skips on its first pass only, as the main one does.
        skip, self.skip_first = self.skip_first, 0
        sharding = self.sharding.with_current_worker(skip)
        counts = self.last_pass_counts = PassCounts()
        position = 0
        pending: EncodedRows | None = None  # this rank's rows of the batch being gathered
        pending_batch = -1
        yielded = 0
        owned = sharding.batches_owned(len(self))  # batches this worker yields
        # The rows before a resumed pass's first batch are decoded all the same (a time split and skipped malformed
        # rows decide which rows count), but not encoded.
        for rows in self._split_rows(counts):
            batches = self.owned_batches(np.arange(position, position + len(rows)), skip)
            position += len(rows)
            mine = batches >= 0
            if not mine.any():
                continue
            # Only this rank's rows are encoded, all of a chunk's at once.
            encoded = encode_rows(rows.take(mine), self.encoders)
            batches = batches[mine]
            starts = np.flatnonzero(np.diff(batches, prepend=-1))
            for k, start in enumerate(starts):
                stop = starts[k + 1] if k + 1 < len(starts) else len(batches)
                batch = int(batches[start])
                piece = encoded.slice(int(start), int(stop))
                if batch == pending_batch and pending is not None:
                    piece = EncodedRows.concat([pending, piece])
                if len(piece) == self._expected_rows(batch):
                    yield piece.batch(0, len(piece))
                    yielded += 1
                    pending, pending_batch = None, -1
                else:
                    pending, pending_batch = piece, batch
        if position != self.num_rows:
            raise RuntimeError(f"the {self.split} files hold {position} rows now but held {self.num_rows} when the "
                               "preparation pass read them: did they change? Start again to read them anew")
        if yielded < owned:  # the last share, when this rank's is empty
            yield _empty(self.encoders, self.decoder)
        if self.num_dropped_rows and sharding.worker_id == 0 and sharding.rank == 0:
            log.warning("columnar %s data: %d rows after the last complete global batch of %d were left out "
                        "(drop_last, or fewer rows than ranks)", self.split, self.num_dropped_rows,
                        sharding.global_batch_size)
        if counts.summary():
            log.warning("columnar %s data (rank %d, worker %d): %s in this pass", self.split, sharding.rank,
                        sharding.worker_id, counts.summary())
