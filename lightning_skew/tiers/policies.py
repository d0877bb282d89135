"""What a placement moves over the host link, step by step: the traffic record, the two ends and the static hot set.

Every policy replays an :class:`~lightning_skew.tiers.stream.AccessStream` and returns a :class:`Traffic`:
per step, the distinct rows the batch needs, those already in fast memory (hits), the rows read from host
memory and the rows written back to it, in rows and bytes (a row's bytes are its weights plus its optimizer
state, as the hot/cold placement counts them). The model of the link is the same for every policy: a row that
is not in fast memory when its step runs is read once and, updated by the step, written back once; a row that
leaves fast memory is written back (it was updated while there); a row that enters is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_skew.hotcold.placement import rebalanced_rows
from lightning_skew.tiers.stream import AccessStream

__all__ = ["StepRecord", "Traffic", "all_fast", "all_host", "static_hot_set", "segment_sum"]

#: Per step, the rows a policy found in fast memory, read over the link and wrote back (ascending), for tests.
StepRecord = tuple[Tensor, Tensor, Tensor]


@dataclass
class Traffic:
    """One policy's replay of a stream: per-step tensors (``[num_steps]``, int64) and what it was given.

    Attributes:
        policy: the policy's name, with its settings.
        fast_bytes: fast memory the policy holds (rows plus optimizer state), in the full (unsampled) stream.
        needed: distinct rows each step looks up.
        hits: of those, rows already in fast memory.
        read_rows, read_bytes: rows (and their bytes) read from host memory.
        written_rows, written_bytes: rows (and bytes) written back to host memory.
        ahead: whether the reads are known (and can be issued) before the step starts, off its critical path.
        sample_rate: the stream's spatial sample rate (per-step figures scale by its inverse).
        filled_at: the first step after which a cache was (99%) full, ``None`` if it never filled (a placement is
            full from the start: 0).
        records: per step (hits, read, written) row IDs, when asked for.
    """

    policy: str
    fast_bytes: int
    needed: Tensor
    hits: Tensor
    read_rows: Tensor
    read_bytes: Tensor
    written_rows: Tensor
    written_bytes: Tensor
    ahead: bool = False
    sample_rate: float = 1.0
    records: list[StepRecord] | None = field(default=None, repr=False)
    filled_at: int | None = 0

    def warm_from(self, warmup: int) -> tuple[int, bool]:
        """The first step of the figures: after ``warmup`` steps and after the cache filled, if it filled within
        the first three quarters of the stream; and whether it did (otherwise its write-backs, which start when it
        is full, are undercounted against a long run)."""
        steps = int(self.needed.numel())
        if self.filled_at is not None and self.filled_at < steps * 3 // 4:
            return max(warmup, self.filled_at + 1), True
        return warmup, False

    def summary(self, skip_steps: int = 0) -> dict[str, float]:
        """Hit rate over the distinct rows needed, and per-step means (scaled to the full stream) of rows and bytes
        read and written, over the steps after the first ``skip_steps`` (a cache's warm-up)."""
        steps = slice(skip_steps, None)
        needed = float(self.needed[steps].sum())
        count = max(int(self.needed[steps].numel()), 1)
        scale = 1.0 / self.sample_rate
        return {"hit_rate": float(self.hits[steps].sum()) / needed if needed else float("nan"),
                "needed_rows_per_step": needed * scale / count,
                "read_rows_per_step": float(self.read_rows[steps].sum()) * scale / count,
                "read_bytes_per_step": float(self.read_bytes[steps].sum()) * scale / count,
                "written_rows_per_step": float(self.written_rows[steps].sum()) * scale / count,
                "written_bytes_per_step": float(self.written_bytes[steps].sum()) * scale / count,
                "fast_bytes": float(self.fast_bytes), "steps": float(count)}


def segment_sum(values: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """Sums of ``values`` (int64) by segment index."""
    return torch.zeros(num_segments, dtype=torch.int64).index_add_(0, segments, values.long())


def _traffic(policy: str, stream: AccessStream, fast_bytes: int, hits: Tensor, read: Tensor, read_bytes: Tensor,
             written: Tensor, written_bytes: Tensor, ahead: bool = False,
             records: list[StepRecord] | None = None, filled_at: int | None = 0) -> Traffic:
    return Traffic(policy, int(fast_bytes), stream.offsets.diff(), hits, read, read_bytes, written, written_bytes,
                   ahead, stream.sample_rate, records, filled_at)


def count_link_traffic(t: int, incoming: Tensor, evicted: Tensor, direct: Tensor, sizes: Tensor, read: Tensor,
                       read_bytes: Tensor, written: Tensor, written_bytes: Tensor) -> None:
    """Step ``t``'s rows and bytes over the host link, into the per-step counts: rows filled into fast memory and
    rows served straight from host memory (``direct``) are read; evicted rows and the direct ones are written back."""
    read[t] = incoming.numel() + direct.numel()
    written[t] = evicted.numel() + direct.numel()
    direct_bytes = int(sizes[direct].sum())
    read_bytes[t] = int(sizes[incoming].sum()) + direct_bytes
    written_bytes[t] = int(sizes[evicted].sum()) + direct_bytes


def step_record(universe: Tensor, hit: Tensor, incoming: Tensor, evicted: Tensor, direct: Tensor) -> StepRecord:
    """A step's rows in the stream's own IDs: hits, rows read, rows written (as the references list them)."""
    return (universe[hit], universe[torch.sort(torch.cat([incoming, direct])).values],
            universe[torch.sort(torch.cat([evicted, direct])).values])


def all_host(stream: AccessStream, record: bool = False) -> Traffic:
    """Every table in host memory: every row a step needs is read and written back."""
    steps, sizes = stream.step_ids(), stream.row_bytes(stream.rows)
    rows = segment_sum(torch.ones_like(stream.rows), steps, stream.num_steps)
    size = segment_sum(sizes, steps, stream.num_steps)
    records = [(stream.step(t)[:0], stream.step(t), stream.step(t)) for t in range(stream.num_steps)] if record \
        else None
    return _traffic("all host", stream, 0, torch.zeros_like(rows), rows, size, rows.clone(), size.clone(),
                    records=records)


def all_fast(stream: AccessStream, record: bool = False) -> Traffic:
    """Every table in fast memory: nothing crosses the link."""
    steps = stream.step_ids()
    hits = segment_sum(torch.ones_like(stream.rows), steps, stream.num_steps)
    zero = torch.zeros_like(hits)
    records = [(stream.step(t), stream.step(t)[:0], stream.step(t)[:0]) for t in range(stream.num_steps)] if record \
        else None
    return _traffic("all fast", stream, stream.total_bytes, hits, zero, zero.clone(), zero.clone(), zero.clone(),
                    records=records)


def static_hot_set(stream: AccessStream, hot_rows: Sequence[Tensor], rebalance_every: int | None = None,
                   record: bool = False) -> Traffic:
    """A placement's hot rows in fast memory, the rest in host memory (FAE; what ``HotColdStrategy`` places).

    Args:
        stream: the access stream.
        hot_rows: per table, its hot rows in slot order (as :class:`~lightning_skew.hotcold.placement.Placement`
            holds them); table-local IDs.
        rebalance_every: as ``HotColdStrategy(rebalance_every_n_steps=...)``: before every step that is a
            multiple of it (not the first), each split table (some rows hot, some not) takes the rows counted
            most since the last rebalance, same count, by :func:`~lightning_skew.hotcold.placement.rebalanced_rows`;
            rows that enter are read, rows that leave written back (at that step). ``None``: never.
        record: keep the per-step row IDs (tests).
    """
    if len(hot_rows) != len(stream.num_rows):
        raise ValueError(f"static_hot_set needs the hot rows of each of the stream's {len(stream.num_rows)} tables, "
                         f"got {len(hot_rows)}")
    if rebalance_every is not None and rebalance_every < 1:
        raise ValueError(f"rebalance_every must be None or >= 1, got {rebalance_every}")
    starts = stream.table_offsets
    current = [rows.long().cpu() for rows in hot_rows]
    hot = torch.zeros(stream.total_rows, dtype=torch.bool)
    for start, rows in zip(starts[:-1].tolist(), current, strict=True):
        hot[start + rows] = True
    fast_bytes = sum(int(r.numel()) * b for r, b in zip(current, stream.bytes_per_row, strict=True))
    split = [0 < int(r.numel()) < n for r, n in zip(current, stream.num_rows, strict=True)]
    period = rebalance_every if rebalance_every is not None and any(split) else stream.num_steps or 1
    steps, sizes = stream.step_ids(), stream.row_bytes(stream.rows)
    num = stream.num_steps
    hits, read, read_b = (torch.zeros(num, dtype=torch.int64) for _ in range(3))
    written, written_b = torch.zeros(num, dtype=torch.int64), torch.zeros(num, dtype=torch.int64)
    records: list[StepRecord] | None = [] if record else None
    if rebalance_every is not None and stream.sample_rate < 1.0:
        raise ValueError("a rebalanced hot set needs the exact stream (sample_rate 1): the lookups counted between "
                         "rebalances choose rows among all of them")
    none = torch.zeros(0, dtype=torch.int64)
    for first in range(0, num, period):
        last = min(first + period, num)
        incoming, leaving = none, none
        if first > 0 and rebalance_every is not None:
            incoming, leaving = _rebalance(stream, first - period, first, current, split, hot)
            read[first] += incoming.numel()
            read_b[first] += int(stream.row_bytes(incoming).sum())
            written[first] += leaving.numel()
            written_b[first] += int(stream.row_bytes(leaving).sum())
        lo, hi = int(stream.offsets[first]), int(stream.offsets[last])
        rows, at = stream.rows[lo:hi], steps[lo:hi]
        is_hot = hot[rows]
        cold = ~is_hot
        hits[first:last] = segment_sum(is_hot.long(), at, num)[first:last]
        cold_rows = segment_sum(cold.long(), at, num)[first:last]
        cold_bytes = segment_sum(sizes[lo:hi] * cold, at, num)[first:last]
        read[first:last] += cold_rows
        read_b[first:last] += cold_bytes
        written[first:last] += cold_rows
        written_b[first:last] += cold_bytes
        if records is not None:
            for t in range(first, last):
                step = stream.step(t)
                extra_in, extra_out = (incoming, leaving) if t == first else (none, none)
                cold_step = step[~hot[step]]
                records.append((step[hot[step]], torch.sort(torch.cat([cold_step, extra_in])).values,
                                torch.sort(torch.cat([cold_step, extra_out])).values))
    name = "static hot set" + (f", rebalanced every {rebalance_every} steps" if rebalance_every else "")
    return _traffic(name, stream, fast_bytes, hits, read, read_b, written, written_b, records=records)


def _rebalance(stream: AccessStream, first: int, last: int, current: list[Tensor], split: list[bool],
               hot: Tensor) -> tuple[Tensor, Tensor]:
    """Rebalance ``current`` (and the ``hot`` mask) in place from the lookups of steps ``[first, last)``; the
    global IDs of the rows that enter and leave fast memory."""
    lo, hi = int(stream.offsets[max(first, 0)]), int(stream.offsets[last])
    counts = torch.zeros(stream.total_rows, dtype=torch.int64).index_add_(0, stream.rows[lo:hi],
                                                                          stream.counts[lo:hi])
    starts = stream.table_offsets.tolist()
    incoming, leaving = [], []
    for table, (is_split, rows) in enumerate(zip(split, current, strict=True)):
        if not is_split:
            continue
        start, num_rows = starts[table], stream.num_rows[table]
        new = rebalanced_rows(counts[start:start + num_rows], rows, num_rows)
        moved = new != rows
        leaving.append(start + rows[moved])
        incoming.append(start + new[moved])
        current[table] = new
    incoming_rows = torch.sort(torch.cat(incoming)).values if incoming else torch.zeros(0, dtype=torch.int64)
    leaving_rows = torch.sort(torch.cat(leaving)).values if leaving else torch.zeros(0, dtype=torch.int64)
    hot[leaving_rows] = False
    hot[incoming_rows] = True
    return incoming_rows, leaving_rows
