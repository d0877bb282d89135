"""The training access stream: per step, the distinct rows the batch looks up (all tables in one ID space)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.hashing import MASK32, mix32

__all__ = ["AccessStream", "StreamBuilder", "shards_keep", "stream_from_batches"]


def shards_keep(rows: Tensor, rate: float) -> Tensor:
    """Which of ``rows`` (global row IDs) a spatially hashed sample at ``rate`` keeps (SHARDS, FAST 2015).

    A row is kept or left out for the whole stream, so every kept row's full reuse pattern survives and a cache
    of ``rate`` times the capacity sees what the full cache sees; figures scale back by ``1 / rate``.
    """
    if rate >= 1.0:
        return torch.ones_like(rows, dtype=torch.bool)
    return mix32(rows & MASK32) < int(rate * 2**32)


@dataclass(frozen=True)
class AccessStream:
    """The distinct rows each training step looks up, as the policies of :mod:`lightning_skew.tiers` replay them.

    Tables are laid end to end (``table_offsets``) as FBGEMM linearises a table-batched embedding's indices; within
    a step, ``rows[offsets[t]:offsets[t + 1]]`` is ascending and ``counts`` says how many lookups hit each.

    Args:
        table_names: the tables (one per sparse feature, as the access profile counts them).
        num_rows: rows of each table.
        bytes_per_row: fast-memory bytes of one row of each table (weights plus optimizer state).
        rows: global row IDs, step after step.
        counts: lookups of each entry of ``rows`` within its step.
        offsets: ``num_steps + 1`` boundaries into ``rows``.
        lookups: all lookups of each step (before sampling).
        sample_rate: share of rows kept by spatial sampling (1: the exact stream).
    """

    table_names: tuple[str, ...]
    num_rows: tuple[int, ...]
    bytes_per_row: tuple[int, ...]
    rows: Tensor
    counts: Tensor
    offsets: Tensor
    lookups: Tensor
    sample_rate: float = 1.0
    seconds: float = 0.0

    @property
    def num_steps(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def total_rows(self) -> int:
        return sum(self.num_rows)

    @property
    def table_offsets(self) -> Tensor:
        """Where each table starts in the global ID space, and the end: ``num_tables + 1`` entries."""
        return torch.tensor([0, *self.num_rows], dtype=torch.int64).cumsum(0)

    @property
    def total_bytes(self) -> int:
        """Bytes of every row of every table (what all-fast placement needs)."""
        return sum(n * b for n, b in zip(self.num_rows, self.bytes_per_row, strict=True))

    def step(self, index: int) -> Tensor:
        return self.rows[int(self.offsets[index]):int(self.offsets[index + 1])]

    def step_ids(self) -> Tensor:
        """The step of each entry of ``rows``."""
        return torch.repeat_interleave(torch.arange(self.num_steps), self.offsets.diff())

    def row_bytes(self, rows: Tensor) -> Tensor:
        """Bytes of each of the global ``rows``."""
        sizes = torch.tensor(self.bytes_per_row, dtype=torch.int64)
        return sizes[torch.bucketize(rows, self.table_offsets[1:], right=True)]

    def table_of(self, rows: Tensor) -> Tensor:
        return torch.bucketize(rows, self.table_offsets[1:], right=True)


class StreamBuilder:
    """Collects the access stream from batches (``KeyedJaggedTensor`` of sparse features, one per step).

    Args:
        table_names: features in the order their tables are laid end to end.
        num_rows: rows of each feature's table.
        bytes_per_row: fast-memory bytes of one row of each table.
        sample_rate: keep rows by spatial hashing at this rate (see :func:`shards_keep`); 1 keeps all.
    """

    def __init__(self, table_names: Sequence[str], num_rows: Sequence[int], bytes_per_row: Sequence[int],
                 sample_rate: float = 1.0) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        if not (len(table_names) == len(num_rows) == len(bytes_per_row)):
            raise ValueError(f"one row count and one row size per table: {len(table_names)} tables, "
                             f"{len(num_rows)} row counts, {len(bytes_per_row)} row sizes")
        self.table_names, self.num_rows = tuple(table_names), tuple(int(n) for n in num_rows)
        self.bytes_per_row, self.sample_rate = tuple(int(b) for b in bytes_per_row), float(sample_rate)
        starts = torch.tensor([0, *self.num_rows], dtype=torch.int64).cumsum(0)
        self._start = dict(zip(self.table_names, starts[:-1].tolist(), strict=True))
        self._total = int(starts[-1])
        self._rows: list[Tensor] = []
        self._counts: list[Tensor] = []
        self._lookups: list[int] = []

    def add(self, sparse: KeyedJaggedTensor) -> None:
        """Append one step: the batch's lookups of every known table (features without a table are left out)."""
        keys = sparse.keys()
        lengths = torch.tensor(sparse.length_per_key(), dtype=torch.int64)
        known = [k in self._start for k in keys]
        values = sparse.values().long()
        if not all(known):  # features no table here serves
            keep = torch.repeat_interleave(torch.tensor(known), lengths)
            values, lengths = values[keep], lengths[torch.tensor(known)]
            keys = [k for k in keys if k in self._start]
        if values.numel() and int(values.min()) < 0:
            raise ValueError(f"a batch holds negative IDs in features {keys}: the access stream needs row IDs")
        ends = torch.tensor([self._start[k] + self.num_rows[self.table_names.index(k)] for k in keys],
                            dtype=torch.int64)
        starts = torch.tensor([self._start[k] for k in keys], dtype=torch.int64)
        rows = values + torch.repeat_interleave(starts, lengths)
        beyond = rows >= torch.repeat_interleave(ends, lengths)
        if rows.numel() and bool(beyond.any()):
            first = int(torch.argmax(beyond.int()))
            key = keys[int(torch.bucketize(torch.tensor(first), lengths.cumsum(0), right=True))]
            raise ValueError(f"feature {key!r} looks up row {int(values[first])}, beyond its table's "
                             f"{self.num_rows[self.table_names.index(key)]} rows: the access stream needs the "
                             f"recipe's own table sizes")
        self._lookups.append(int(rows.numel()))
        if self.sample_rate < 1.0:
            rows = rows[shards_keep(rows, self.sample_rate)]
        unique, counts = torch.unique(rows, sorted=True, return_counts=True)
        self._rows.append(unique)
        self._counts.append(counts)

    def build(self, seconds: float = 0.0) -> AccessStream:
        sizes = torch.tensor([0] + [r.numel() for r in self._rows], dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int64)
        return AccessStream(self.table_names, self.num_rows, self.bytes_per_row,
                            torch.cat(self._rows) if self._rows else empty,
                            torch.cat(self._counts).long() if self._counts else empty, sizes.cumsum(0),
                            torch.tensor(self._lookups, dtype=torch.int64), self.sample_rate, seconds)


def stream_from_batches(batches: Iterable[Any], table_names: Sequence[str], num_rows: Sequence[int],
                        bytes_per_row: Sequence[int], max_steps: int | None = None,
                        sample_rate: float = 1.0) -> AccessStream:
    """The access stream of ``batches`` (torchrec ``Batch`` objects or ``KeyedJaggedTensor``), first
    ``max_steps`` only when given. A loader whose dataset can produce any batch on its own (``batch_at``, as the
    synthetic stream can) is read by index, so a window of the epoch costs only that window."""
    began = time.perf_counter()
    builder = StreamBuilder(table_names, num_rows, bytes_per_row, sample_rate)
    source = getattr(batches, "dataset", None)
    if max_steps is not None and hasattr(source, "batch_at") and hasattr(source, "__len__"):
        batches = (source.batch_at(i) for i in range(min(max_steps, len(source))))
    for index, batch in enumerate(batches):
        if max_steps is not None and index >= max_steps:
            break
        builder.add(batch if isinstance(batch, KeyedJaggedTensor) else batch.sparse_features)
    return builder.build(seconds=time.perf_counter() - began)
