"""The tier simulator's policies equal slow, obviously correct references (plain Python) row for row."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.tiers import (
    StreamBuilder,
    all_fast,
    all_host,
    cache_set_of,
    cache_sets_for,
    fbgemm_cache,
    lookahead_cache,
    static_hot_set,
)

TABLES = ("a", "b", "c")
ROWS = (40, 25, 60)
SIZES = (72, 72, 40)
OFFSETS = (0, 40, 65)
MASK64 = 2**64 - 1


def _batches(steps: int, per_feature: int = 10, seed: int = 0) -> list[dict[str, list[int]]]:
    """Skewed lookups per feature (a few rows popular), with repeats within a batch."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        batch = {}
        for name, rows in zip(TABLES, ROWS, strict=True):
            weights = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.1
            batch[name] = torch.multinomial(weights, per_feature, replacement=True, generator=generator).tolist()
        batches.append(batch)
    return batches


def _stream(batches: list[dict[str, list[int]]], sample_rate: float = 1.0):
    builder = StreamBuilder(TABLES, ROWS, SIZES, sample_rate)
    for batch in batches:
        # features in another order than the tables, as a data module may emit them
        keys = ["c", "a", "b"]
        values = [v for k in keys for v in batch[k]]
        lengths = [1] * len(values)
        builder.add(KeyedJaggedTensor.from_lengths_sync(keys, torch.tensor(values), torch.tensor(lengths)))
    return builder.build()


def _global(batch: dict[str, list[int]]) -> list[int]:
    """The batch's lookups as global row IDs, with repeats."""
    return [OFFSETS[TABLES.index(name)] + row for name in TABLES for row in batch[name]]


def _row_size(row: int) -> int:
    return SIZES[sum(row >= start for start in OFFSETS) - 1]


def _as_lists(records) -> list[tuple[list[int], list[int], list[int]]]:
    return [(h.tolist(), r.tolist(), w.tolist()) for h, r, w in records]


def _check_totals(traffic, expected) -> None:
    """Per-step counts and bytes agree with the recorded rows."""
    for t, (hits, read, written) in enumerate(expected):
        assert int(traffic.hits[t]) == len(hits)
        assert int(traffic.read_rows[t]) == len(read)
        assert int(traffic.written_rows[t]) == len(written)
        assert int(traffic.read_bytes[t]) == sum(_row_size(r) for r in read)
        assert int(traffic.written_bytes[t]) == sum(_row_size(r) for r in written)


def _fmix64(value: int) -> int:
    value ^= value >> 33
    value = (value * 0xFF51AFD7ED558CCD) & MASK64
    value ^= value >> 33
    value = (value * 0xC4CEB9FE1A85EC53) & MASK64
    return value ^ (value >> 33)


def reference_fbgemm(batches, num_sets: int, assoc: int, algorithm: str):
    """FBGEMM's cache, kernel by kernel, one row at a time."""
    ways = [[None] * assoc for _ in range(num_sets)]
    stamps = [[0] * assoc for _ in range(num_sets)]
    frequency: dict[int, int] = {}
    out = []
    for t, batch in enumerate(batches):
        stamp = t + 2
        lookups = _global(batch)
        needed = sorted(set(lookups))
        if algorithm == "lfu":
            for row in lookups:
                frequency[row] = frequency.get(row, 0) + 1
        found = set()
        for row in needed:
            cache_set = _fmix64(row) % num_sets
            if row in ways[cache_set]:
                found.add(row)
                if algorithm == "lru":
                    stamps[cache_set][ways[cache_set].index(row)] = stamp
        by_set: dict[int, list[int]] = {}
        for row in needed:
            if row not in found:
                by_set.setdefault(_fmix64(row) % num_sets, []).append(row)
        inserted, evicted = [], []
        for cache_set, misses in by_set.items():
            if algorithm == "lfu":
                misses = sorted(misses, key=lambda r: -frequency[r])

            def cost(slot, cache_set=cache_set):
                if algorithm == "lru":
                    return stamps[cache_set][slot]
                row = ways[cache_set][slot]
                return -1 if row is None else frequency[row]

            order = sorted(range(assoc), key=lambda slot: (cost(slot), slot))
            costs = [cost(slot) for slot in order]
            for position in range(min(len(misses), assoc)):
                if algorithm == "lru" and costs[position] == stamp:
                    break
                if algorithm == "lfu" and costs[position] > frequency[misses[position]]:
                    break
                slot = order[position]
                if ways[cache_set][slot] is not None:
                    evicted.append(ways[cache_set][slot])
                ways[cache_set][slot] = misses[position]
                stamps[cache_set][slot] = stamp
                inserted.append(misses[position])
        cached = {row for rows in ways for row in rows if row is not None}
        hits = [r for r in needed if r in found and r in cached]
        direct = [r for r in needed if r not in cached]
        out.append((hits, sorted(inserted + direct), sorted(evicted + direct)))
    return out


def reference_lookahead(batches, capacity: int, window: int):
    """A lookahead cache: Belady's eviction over the next ``window`` batches, one row at a time."""
    steps = [set(_global(batch)) for batch in batches]
    cache: set[int] = set()
    last: dict[int, int] = {}
    never = float("inf")
    out = []
    for t, needed_set in enumerate(steps):
        needed = sorted(needed_set)

        def next_use(row, t=t):
            for s in range(t + 1, min(t + window, len(steps) - 1) + 1):
                if row in steps[s]:
                    return s
            return never

        found = [r for r in needed if r in cache]
        misses = [r for r in needed if r not in cache]
        room = capacity - len(found)
        if len(misses) > room:
            ranked = sorted(misses, key=lambda r: (next_use(r), r))
            incoming, direct = sorted(ranked[:room]), sorted(ranked[room:])
        else:
            incoming, direct = misses, []
        evict = max(0, len(incoming) - (capacity - len(cache)))
        candidates = sorted((r for r in cache if r not in needed_set),
                            key=lambda r: (next_use(r), -last[r], r), reverse=True)
        evicted = sorted(candidates[:evict])
        cache.difference_update(evicted)
        cache.update(incoming)
        for row in needed:
            last[row] = t
        out.append((found, sorted(incoming + direct), sorted(evicted + direct)))
    return out


def reference_static(batches, hot: set[int], rebalance_every: int | None, split_tables: list[int]):
    """A fixed hot set; rebalanced by lookups counted since the last rebalance (count, then hot, then lower ID)."""
    hot = set(hot)
    out = []
    counts: dict[int, int] = {}
    for t, batch in enumerate(batches):
        came, left = [], []
        if rebalance_every and t and t % rebalance_every == 0:
            for table in split_tables:
                start, end = OFFSETS[table], OFFSETS[table] + ROWS[table]
                current = {r for r in hot if start <= r < end}
                ranked = sorted(range(start, end), key=lambda r: (-counts.get(r, 0), r not in current, r))
                new = set(ranked[:len(current)])
                came += sorted(new - current)
                left += sorted(current - new)
                hot = (hot - current) | new
            counts = {}
        lookups = _global(batch)
        for row in lookups:
            counts[row] = counts.get(row, 0) + 1
        needed = sorted(set(lookups))
        cold = [r for r in needed if r not in hot]
        out.append(([r for r in needed if r in hot], sorted(cold + came), sorted(cold + left)))
    return out


@pytest.mark.parametrize("algorithm", ["lru", "lfu"])
@pytest.mark.parametrize("num_sets,assoc", [(1, 8), (3, 4), (2, 32)])
def test_fbgemm_cache_equals_reference(algorithm, num_sets, assoc):
    batches = _batches(30)
    stream = _stream(batches)
    traffic = fbgemm_cache(stream, load_factor=num_sets * assoc / stream.total_rows, algorithm=algorithm,
                           assoc=assoc, record=True)
    expected = reference_fbgemm(batches, num_sets, assoc, algorithm)
    assert _as_lists(traffic.records) == expected
    _check_totals(traffic, expected)
    assert int(traffic.hits.sum()) > 0  # the cases exercise hits, inserts and evictions
    assert int(traffic.written_rows.sum()) > 0


@pytest.mark.parametrize("capacity,window", [(12, 1), (30, 3), (45, 50), (100, 4)])
def test_lookahead_cache_equals_reference(capacity, window):
    batches = _batches(25)
    stream = _stream(batches)
    mean_row = stream.total_bytes / stream.total_rows
    traffic = lookahead_cache(stream, budget_bytes=int(capacity * mean_row) + 1, window=window, record=True)
    expected = reference_lookahead(batches, capacity, window)
    assert _as_lists(traffic.records) == expected
    _check_totals(traffic, expected)


@pytest.mark.parametrize("rebalance_every", [None, 1, 4])
def test_static_hot_set_equals_reference(rebalance_every):
    batches = _batches(20)
    stream = _stream(batches)
    hot_local = [torch.tensor([5, 0, 9, 1]), torch.arange(25), torch.tensor([], dtype=torch.int64)]
    hot = {OFFSETS[i] + int(r) for i, rows in enumerate(hot_local) for r in rows}
    traffic = static_hot_set(stream, hot_local, rebalance_every=rebalance_every, record=True)
    expected = reference_static(batches, hot, rebalance_every, split_tables=[0])
    assert _as_lists(traffic.records) == expected
    _check_totals(traffic, expected)
    assert traffic.fast_bytes == 4 * 72 + 25 * 72


def test_the_two_ends_and_the_cache_between_them():
    batches = _batches(15)
    stream = _stream(batches)
    host, fast = all_host(stream, record=True), all_fast(stream, record=True)
    needed = [sorted(set(_global(b))) for b in batches]
    assert _as_lists(host.records) == [([], n, n) for n in needed]
    assert _as_lists(fast.records) == [(n, [], []) for n in needed]
    assert fast.fast_bytes == sum(r * s for r, s in zip(ROWS, SIZES, strict=True))
    cache = fbgemm_cache(stream, load_factor=0.3).summary()
    assert host.summary()["hit_rate"] == 0.0 < cache["hit_rate"] < fast.summary()["hit_rate"] == 1.0
    assert cache["read_bytes_per_step"] < host.summary()["read_bytes_per_step"]


def test_cache_set_hash_is_fbgemm_murmur_finaliser():
    rows = torch.tensor([0, 1, 2, 12345, 2**40 + 7])
    assert cache_set_of(rows, 1000).tolist() == [_fmix64(r) % 1000 for r in rows.tolist()]
    # FBGEMM's rule: ceil(int(rows * load factor) / assoc) sets, at least one
    assert cache_sets_for(1000, 0.2) == 7 and cache_sets_for(1000, 0.0001) == 1


def test_spatial_sampling_keeps_whole_rows_and_scales_back():
    batches = _batches(200, per_feature=40, seed=1)
    exact, sampled = _stream(batches), _stream(batches, sample_rate=0.5)
    kept = set(sampled.rows.tolist())
    # a row is in or out for the whole stream
    assert all((row in kept) == (row in set(sampled.rows.tolist())) for row in exact.rows.tolist())
    assert 0 < sampled.rows.numel() < exact.rows.numel()
    full, part = all_host(exact).summary(), all_host(sampled).summary()
    assert part["needed_rows_per_step"] == pytest.approx(full["needed_rows_per_step"], rel=0.25)


def test_a_spatially_sampled_cache_sees_what_the_whole_cache_sees():
    generator = torch.Generator().manual_seed(3)
    rows = 50_000
    weights = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.05
    builders = [StreamBuilder(["f"], [rows], [68], rate) for rate in (1.0, 0.5)]
    for _ in range(150):
        ids = torch.multinomial(weights, 4000, replacement=True, generator=generator)
        batch = KeyedJaggedTensor.from_lengths_sync(["f"], ids, torch.ones(4000, dtype=torch.int64))
        for builder in builders:
            builder.add(batch)
    exact, sampled = (b.build() for b in builders)
    assert sampled.rows.numel() < 0.6 * exact.rows.numel()
    for replay in (lambda s: fbgemm_cache(s, load_factor=0.2), lambda s: fbgemm_cache(s, load_factor=0.2,
                                                                                        algorithm="lfu"),
                   lambda s: lookahead_cache(s, budget_bytes=rows * 68 // 5, window=4)):
        full, part = replay(exact).summary(50), replay(sampled).summary(50)
        assert part["hit_rate"] == pytest.approx(full["hit_rate"], abs=0.02)
        assert part["read_bytes_per_step"] == pytest.approx(full["read_bytes_per_step"], rel=0.1)


def test_stream_refuses_ids_beyond_their_table():
    builder = StreamBuilder(TABLES, ROWS, SIZES)
    batch = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([3, 25]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="feature 'b' looks up row 25, beyond its table's 25 rows"):
        builder.add(batch)
