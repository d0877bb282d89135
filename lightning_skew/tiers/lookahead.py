"""Bagpipe-style lookahead caching: a fast-memory cache that sees the next ``W`` batches before they run.

Bagpipe (Agarwal et al., SOSP 2023) overlaps embedding movement with training by looking ahead in the data
stream: the rows a coming batch needs are prefetched while earlier batches train, and a cached row is kept
while a batch within the lookahead still needs it. This policy is that idea as a cache (fully associative,
``capacity`` rows): before step ``t`` it loads the step's rows that are not cached; when it must make room it
evicts the cached rows whose next use is furthest ahead (Belady's choice, over what the window shows: a row no
batch of steps ``t+1 .. t+W`` needs counts as never needed again; ties: the least recently used, then the
higher row ID). When a step needs more rows than the cache holds, those needed soonest again are cached and the
rest read from host memory directly. Every read is known ``W`` steps ahead, so it can be prefetched off the
step's critical path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_skew.tiers.policies import StepRecord, Traffic, _traffic, count_link_traffic, step_record
from lightning_skew.tiers.stream import AccessStream, shards_keep

__all__ = ["lookahead_cache", "lookahead_hot_set", "next_use_steps", "refresh_plan"]


def next_use_steps(stream: AccessStream) -> Tensor:
    """For each entry of ``stream.rows``: the next step that looks up the same row, or ``num_steps`` if none."""
    steps = stream.step_ids()
    order = torch.sort(stream.rows, stable=True).indices  # by row, then by step (entries come in step order)
    rows, at = stream.rows[order], steps[order]
    following = torch.full_like(at, stream.num_steps)
    same = rows[1:] == rows[:-1]
    following[:-1] = torch.where(same, at[1:], following[:-1])
    result = torch.empty_like(following)
    result[order] = following
    return result


def lookahead_cache(stream: AccessStream, budget_bytes: int, window: int = 8, record: bool = False) -> Traffic:
    """Replay ``stream`` through a lookahead cache of ``budget_bytes`` (rows plus optimizer state).

    Args:
        stream: the access stream (a spatial sample keeps ``sample_rate`` of the capacity).
        budget_bytes: fast memory for cached rows; the capacity in rows is the budget over the mean row size.
        window: how many coming batches the cache sees (Bagpipe's lookahead).
        record: keep the per-step row IDs (tests).
    """
    if window < 1:
        raise ValueError(f"the lookahead window must be at least one batch, got {window}")
    mean_row = stream.total_bytes / max(stream.total_rows, 1)
    full_capacity = int(budget_bytes // mean_row)
    capacity = int(round(full_capacity * stream.sample_rate))
    # State per row the stream looks up, in compact IDs (order-preserving), not per row of the tables.
    universe, compact = torch.unique(stream.rows, return_inverse=True)
    sizes = stream.row_bytes(universe)
    num, total = stream.num_steps, int(universe.numel())
    never = num + 1  # a next use beyond the window
    if (never + 2) * (num + 2) * max(total, 1) >= 2**62:
        raise ValueError(f"the lookahead replay's sort key cannot hold {num} steps of {total} rows; simulate fewer "
                         "steps (--tiers-steps) or sample rows (--tiers-sample-rate)")
    following = next_use_steps(stream)
    slots = torch.full((max(capacity, 0),), -1, dtype=torch.int64)
    slot_of = torch.full((total,), -1, dtype=torch.int64)
    next_use = torch.full((total,), never, dtype=torch.int64)
    last_use = torch.full((total,), -1, dtype=torch.int64)
    marked = torch.full((total,), -1, dtype=torch.int64)
    filled, filled_at = 0, None
    hits, read, read_b, written, written_b = (torch.zeros(num, dtype=torch.int64) for _ in range(5))
    records: list[StepRecord] | None = [] if record else None
    for t in range(num):
        lo, hi = int(stream.offsets[t]), int(stream.offsets[t + 1])
        rows, coming = compact[lo:hi], following[lo:hi]
        marked[rows] = t
        found = slot_of[rows] >= 0
        miss, miss_next = rows[~found], coming[~found]
        room = capacity - int(found.sum())
        take = min(miss.numel(), room)
        if take < miss.numel():  # more rows than the cache holds: keep those needed again soonest
            capped = torch.where(miss_next <= t + window, miss_next, torch.full_like(miss_next, never))
            order = torch.argsort(capped * total + miss, stable=True)
            incoming, direct = miss[order[:take]], miss[order[take:]]
            incoming = torch.sort(incoming).values
        else:
            incoming, direct = miss, miss[:0]
        free = capacity - filled
        evict_count = max(0, incoming.numel() - free)
        evicted = rows[:0]
        targets = torch.arange(filled, filled + min(free, incoming.numel()))
        if evict_count:
            cached = slots[:filled]
            candidates = torch.nonzero(marked[cached] != t).flatten()
            candidate_rows = cached[candidates]
            upcoming = next_use[candidate_rows]
            capped = torch.where(upcoming <= t + window, upcoming, torch.full_like(upcoming, never))
            key = (capped * (num + 2) + (num - last_use[candidate_rows])) * total + candidate_rows
            chosen = torch.topk(key, evict_count).indices
            freed = candidates[chosen]
            evicted = torch.sort(cached[freed]).values
            slot_of[evicted] = -1
            targets = torch.cat([targets, freed])
        filled += min(free, incoming.numel())
        if filled_at is None and filled >= capacity:
            filled_at = t
        slots[targets] = incoming
        slot_of[incoming] = targets
        next_use[rows] = coming
        last_use[rows] = t
        hits[t] = int(found.sum())
        count_link_traffic(t, incoming, evicted, direct, sizes, read, read_b, written, written_b)
        if records is not None:
            records.append(step_record(universe, rows[found], incoming, evicted, direct))
    fast_bytes = int(full_capacity * mean_row)
    return _traffic(f"lookahead (Bagpipe-style), window {window}", stream, fast_bytes, hits, read, read_b, written,
                    written_b, ahead=True, records=records, filled_at=filled_at)


def refresh_plan(hot_rows: Tensor, steps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The moves that make one table's hot shard hold the rows of ``steps[0]``, looking ahead at ``steps[1:]``.

    Args:
        hot_rows: the table's hot rows in slot order.
        steps: the rows (table-local IDs, repeats allowed) of this step and of the coming ones.

    Returns:
        ``(slots, incoming)``: the step's cold rows (ascending, those needed again soonest first when they
        outnumber the slots free to take them) and the slots they go to, freed from the hot rows needed
        furthest ahead (none of the coming steps: first; ties: the higher row ID).
    """
    hot_rows = hot_rows.long()
    needed = torch.unique(steps[0].long())
    capacity = hot_rows.numel()
    if capacity == 0 or needed.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    never = len(steps)
    coming = [step.long() for step in steps[1:]]
    size = 1 + max(int(hot_rows.max()), int(needed.max()), *(int(c.max()) for c in coming if c.numel()))
    first_use = torch.full((size,), never, dtype=torch.int64)  # the first coming step that looks each row up
    if coming:
        ahead = torch.cat([torch.full((c.numel(),), k, dtype=torch.int64) for k, c in enumerate(coming, 1)])
        first_use.scatter_reduce_(0, torch.cat(coming), ahead, reduce="amin")

    def next_use(rows: Tensor) -> Tensor:
        return first_use[rows]

    missing = needed[~torch.isin(needed, hot_rows)]
    evictable = torch.nonzero(~torch.isin(hot_rows, needed)).flatten()
    take = min(missing.numel(), evictable.numel())
    if take < missing.numel():
        order = torch.argsort(next_use(missing) * (int(missing.max()) + 1) + missing, stable=True)
        missing = torch.sort(missing[order[:take]]).values
    if take == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    candidates = hot_rows[evictable]
    key = next_use(candidates) * (int(candidates.max()) + 1) + candidates
    slots = evictable[torch.topk(key, take).indices]
    return slots, missing


def lookahead_hot_set(stream: AccessStream, hot_rows: Sequence[Tensor], window: int = 8,
                      record: bool = False) -> Traffic:
    """The static hot set with Bagpipe's lookahead on top, as :class:`~lightning_skew.tiers.prefetch.LookaheadPrefetch`
    runs it: before each step, each split table's hot shard takes the step's cold rows (:func:`refresh_plan`,
    looking ``window`` batches ahead); the rest of the step's cold rows are read directly.

    Args:
        stream: the access stream (a spatial sample keeps the sampled hot rows, and so the same share of slots).
        hot_rows: per table, its hot rows in slot order (table-local IDs), as the placement holds them.
        window: the coming batches each step sees.
        record: keep the per-step row IDs (tests).
    """
    if len(hot_rows) != len(stream.num_rows):
        raise ValueError(f"lookahead_hot_set needs the hot rows of each of the stream's {len(stream.num_rows)} "
                         f"tables, got {len(hot_rows)}")
    starts = stream.table_offsets
    fast_bytes = sum(int(r.numel()) * b for r, b in zip(hot_rows, stream.bytes_per_row, strict=True))
    current, split = [], []
    for table, rows in enumerate(hot_rows):
        rows = rows.long().cpu()
        split.append(0 < rows.numel() < stream.num_rows[table])
        current.append(int(starts[table]) + rows[shards_keep(rows + int(starts[table]), stream.sample_rate)])
    total, num = stream.total_rows, stream.num_steps
    hot = torch.zeros(total, dtype=torch.bool)
    for rows in current:
        hot[rows] = True
    # Next step that looks up each row: first its first use, then (once seen) the use after the last one.
    following = next_use_steps(stream)
    next_use = torch.full((total,), num, dtype=torch.int64)
    steps_of = stream.step_ids()
    next_use.scatter_reduce_(0, stream.rows, steps_of, reduce="amin")
    marked = torch.full((total,), -1, dtype=torch.int64)
    never = num + 1
    split_tables = [t for t, is_split in enumerate(split) if is_split]
    bounds_of = stream.table_offsets
    hits, read, read_b, written, written_b = (torch.zeros(num, dtype=torch.int64) for _ in range(5))
    records: list[StepRecord] | None = [] if record else None
    for t in range(num):
        lo, hi = int(stream.offsets[t]), int(stream.offsets[t + 1])
        rows, coming = stream.rows[lo:hi], following[lo:hi]
        marked[rows] = t
        horizon = min(t + window, num - 1)
        found = hot[rows]
        bounds = torch.searchsorted(rows, bounds_of).tolist()
        incoming, evicted = [], []
        for table in split_tables:
            part = slice(bounds[table], bounds[table + 1])
            cold = ~found[part]
            missing, missing_next = rows[part][cold], coming[part][cold]
            slots = current[table]
            free = torch.nonzero(marked[slots] != t).flatten()
            take = min(missing.numel(), free.numel())
            if take == 0:
                continue
            if take < missing.numel():
                capped = torch.where(missing_next <= horizon, missing_next, torch.full_like(missing_next, never))
                order = torch.argsort(capped * (total + 1) + missing, stable=True)
                missing = torch.sort(missing[order[:take]]).values
            candidates = slots[free]
            upcoming = next_use[candidates]
            capped = torch.where(upcoming <= horizon, upcoming, torch.full_like(upcoming, never))
            chosen = free[torch.topk(capped * (total + 1) + candidates, take).indices]
            evicted.append(slots[chosen])
            incoming.append(missing)
            slots[chosen] = missing
        next_use[rows] = coming
        came = torch.cat(incoming) if incoming else rows[:0]
        left = torch.cat(evicted) if evicted else rows[:0]
        hot[left] = False
        hot[came] = True
        direct = rows[~hot[rows]]
        hits[t] = int(found.sum())
        read[t] = came.numel() + direct.numel()
        written[t] = left.numel() + direct.numel()
        direct_bytes = int(stream.row_bytes(direct).sum())
        read_b[t] = int(stream.row_bytes(came).sum()) + direct_bytes
        written_b[t] = int(stream.row_bytes(left).sum()) + direct_bytes
        if records is not None:
            records.append((rows[found], torch.sort(torch.cat([came, direct])).values,
                            torch.sort(torch.cat([left, direct])).values))
    return _traffic(f"static hot set + lookahead prefetch, window {window}", stream, fast_bytes, hits, read, read_b,
                    written, written_b, ahead=True, records=records)
