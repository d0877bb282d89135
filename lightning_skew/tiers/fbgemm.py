"""FBGEMM's UVM embedding cache as it works: set-associative, LRU or LFU, filled by a prefetch per batch.

Followed from FBGEMM's source (github.com/pytorch/FBGEMM, ``fbgemm_gpu/``):

- ``fbgemm_gpu/split_table_batched_embeddings_ops_training.py`` (``_apply_cache_state``): the cache has
  ``cache_sets = (int(total_cache_hash_size * cache_load_factor) + assoc - 1) // assoc`` sets (at least one)
  of ``assoc = DEFAULT_ASSOC = 32`` ways (64 on ROCm), over all the cached tables' rows linearised end to end;
  ``_prefetch`` bumps ``timestep`` (from 1) before each batch.
- ``src/split_embeddings_cache/common.cuh`` (``cache_slot``): a row's set is MurmurHash3's 64-bit finaliser of
  its linear index, modulo the number of sets.
- ``src/split_embeddings_cache/lru_cache_find.cu`` and ``lru_cache_populate.cu``: a batch's distinct indices
  (ascending) are looked up; a found one gets the batch's timestamp; the misses, radix-sorted by set (stable:
  ascending index within a set), go into their set's slots in the order of the slots' timestamps (empty slots
  hold 0), the i-th miss into the i-th oldest slot, at most ``assoc`` per set, stopping at the first slot used
  by this batch; the rest are conflict misses, read from host memory directly.
- ``lfu_cache_find.cu`` and ``lfu_cache_populate.cu``: every row's count grows by its lookups in each batch
  (before the search); misses sorted by set, then count descending (then index); the i-th miss replaces the
  slot with the i-th smallest count (empty slots count -1) while that count is not above the miss's, at most
  ``assoc`` per set. Nothing protects a row found in this batch, so an LFU insert may evict it, and it is then
  read from host memory directly.

The figures are rows and bytes; ties between equal slot timestamps (or counts), which the kernels' bitonic sort
leaves unspecified, go to the lower slot. Evicted rows are always written back: every cached row was looked up,
hence updated, after it was loaded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_skew.tiers.policies import StepRecord, Traffic, _traffic, count_link_traffic, step_record
from lightning_skew.tiers.stream import AccessStream

__all__ = ["DEFAULT_ASSOC", "cache_set_of", "cache_sets_for", "fbgemm_cache", "load_factor_for"]

#: Ways per set on CUDA (``DEFAULT_ASSOC`` in FBGEMM's training module).
DEFAULT_ASSOC = 32
_LFU_COUNTER_BITS = 40


def load_factor_for(budget_bytes: int, total_bytes: int) -> float:
    """The cache load factor whose cache holds ``budget_bytes`` of rows plus optimizer state: ``budget / total``,
    as the benchmarks size TorchRec's UVM cache to the hot/cold budget."""
    return min(1.0, budget_bytes / max(total_bytes, 1))


def cache_sets_for(total_rows: int, load_factor: float, assoc: int = DEFAULT_ASSOC) -> int:
    """FBGEMM's number of cache sets for ``total_rows`` cached rows at ``load_factor``."""
    if load_factor <= 0:
        raise ValueError(f"the cache load factor must be positive, got {load_factor}")
    return max(1, (int(total_rows * load_factor) + assoc - 1) // assoc)


def cache_set_of(rows: Tensor, num_sets: int) -> Tensor:
    """The cache set of each linear row index: MurmurHash3's 64-bit finaliser, modulo ``num_sets``."""
    with np.errstate(over="ignore"):
        h = rows.numpy().astype(np.uint64)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
        # FBGEMM takes h % (uint32_t)C of the 64-bit hash
        return torch.from_numpy((h % np.uint64(num_sets)).astype(np.int64))


def _rank_in_segment(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For sorted ``keys``: distinct keys, each entry's key index, and each entry's rank among equal keys."""
    unique, inverse, counts = torch.unique_consecutive(keys, return_inverse=True, return_counts=True)
    starts = counts.cumsum(0) - counts
    return unique, inverse, torch.arange(keys.numel()) - starts[inverse]


def fbgemm_cache(stream: AccessStream, budget_bytes: int | None = None, algorithm: str = "lru",
                 load_factor: float | None = None, assoc: int = DEFAULT_ASSOC, record: bool = False) -> Traffic:
    """Replay ``stream`` through FBGEMM's UVM cache (``EmbeddingLocation.MANAGED_CACHING``).

    Args:
        stream: the access stream (a spatial sample keeps ``sample_rate`` of the sets).
        budget_bytes: fast memory for the cache, rows plus optimizer state; gives the load factor.
        algorithm: ``lru`` or ``lfu``.
        load_factor: the cache load factor itself, instead of ``budget_bytes``.
        assoc: ways per set (32 on CUDA).
        record: keep the per-step row IDs (tests).
    """
    if algorithm not in ("lru", "lfu"):
        raise ValueError(f"FBGEMM's cache algorithms are 'lru' and 'lfu', got {algorithm!r}")
    if (budget_bytes is None) == (load_factor is None):
        raise ValueError("give fbgemm_cache either budget_bytes or load_factor")
    if load_factor is None:
        load_factor = load_factor_for(int(budget_bytes), stream.total_bytes)  # type: ignore[arg-type]
    full_sets = cache_sets_for(stream.total_rows, load_factor, assoc)
    num_sets = max(1, round(full_sets * stream.sample_rate))
    # Rows beyond the cache (its row share of the tables' bytes, like the placement's row sizes).
    mean_row = stream.total_bytes / max(stream.total_rows, 1)
    fast_bytes = math.ceil(full_sets * assoc * mean_row)
    state = torch.full((num_sets, assoc), -1, dtype=torch.int64)  # cached row per slot (lxu_cache_state)
    cost = torch.zeros((num_sets, assoc), dtype=torch.int64)  # lru_state (timestamps), or -1 / counts for LFU
    set_of = cache_set_of(stream.rows, num_sets)
    # State per row the stream looks up, in compact IDs (order-preserving), not per row of the tables.
    universe, compact = torch.unique(stream.rows, return_inverse=True)
    sizes = stream.row_bytes(universe)
    slot_of = torch.full((universe.numel(),), -1, dtype=torch.int64)
    counts = torch.zeros(universe.numel(), dtype=torch.int64)  # lfu_state
    num = stream.num_steps
    hits, read, read_b, written, written_b = (torch.zeros(num, dtype=torch.int64) for _ in range(5))
    records: list[StepRecord] | None = [] if record else None
    flat_state, flat_cost = state.view(-1), cost.view(-1)
    valid, filled_at = 0, None
    for t in range(num):
        lo, hi = int(stream.offsets[t]), int(stream.offsets[t + 1])
        rows, sets = compact[lo:hi], set_of[lo:hi]
        timestamp = t + 2  # FBGEMM's timestep starts at 1 and is bumped before each prefetch
        if algorithm == "lfu":
            counts[rows] += stream.counts[lo:hi]
        slots = slot_of[rows]
        found = slots >= 0
        if algorithm == "lru":
            flat_cost[slots[found]] = timestamp
        miss, miss_sets = rows[~found], sets[~found]
        if algorithm == "lru":
            order = torch.sort(miss_sets, stable=True).indices
        else:
            key = miss_sets * (1 << _LFU_COUNTER_BITS) + ((1 << _LFU_COUNTER_BITS) - 1 - counts[miss])
            order = torch.sort(key, stable=True).indices
        miss, miss_sets = miss[order], miss_sets[order]
        unique_sets, which, rank = _rank_in_segment(miss_sets)
        if algorithm == "lru":
            slot_costs = cost[unique_sets]
        else:
            cached = state[unique_sets]
            slot_costs = torch.where(cached >= 0, counts[cached.clamp(min=0)], torch.full_like(cached, -1))
        sorted_costs, sorted_slots = torch.sort(slot_costs, dim=1, stable=True)
        eligible = rank < assoc
        take_rank = rank.clamp(max=assoc - 1)
        candidate_cost = sorted_costs[which, take_rank]
        if algorithm == "lru":
            insert = eligible & (candidate_cost < timestamp)
        else:
            insert = eligible & (candidate_cost <= counts[miss])
        target = unique_sets[which[insert]] * assoc + sorted_slots[which[insert], take_rank[insert]]
        incoming = miss[insert]
        evicted = flat_state[target]
        evicted = evicted[evicted >= 0]
        valid += int(target.numel()) - int(evicted.numel())
        if filled_at is None and valid >= 0.99 * state.numel():
            filled_at = t
        slot_of[evicted] = -1
        flat_state[target] = incoming
        slot_of[incoming] = target
        if algorithm == "lru":
            flat_cost[target] = timestamp
        cached_now = slot_of[rows] >= 0
        step_hits = found & cached_now
        direct = rows[~cached_now]  # conflict misses (and, for LFU, found rows evicted by this batch's inserts)
        hits[t] = int(step_hits.sum())
        count_link_traffic(t, incoming, evicted, direct, sizes, read, read_b, written, written_b)
        if records is not None:
            records.append(step_record(universe, rows[step_hits], incoming, evicted, direct))
    name = f"FBGEMM UVM cache, {algorithm.upper()} ({full_sets} sets x {assoc}, load factor {load_factor:.4g})"
    return _traffic(name, stream, fast_bytes, hits, read, read_b, written, written_b, records=records,
                    filled_at=filled_at)
