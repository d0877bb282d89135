"""Sketches of a lookup stream: the input sample, row counts, heavy-hitter summaries and the input reservoir."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.hashing import hash32

__all__ = [
    "ReservoirEntry",
    "add_row_counts",
    "add_sparse_counts",
    "check_row_ids",
    "merge_heavy_hitters",
    "reservoir_batch",
    "reservoir_from_state",
    "reservoir_inputs",
    "reservoir_priority",
    "reservoir_to_state",
    "sampled_mask",
    "trim_reservoir",
]

# Salts keep the input sample and the reservoir's priorities independent for the same seed.
_SAMPLE_SALT, _RESERVOIR_SALT = 0x5EED, 0xB0770

ReservoirEntry = tuple[int, list[str], Tensor, Tensor]
"""One kept batch: ``(priority, keys, values, lengths)`` of its counted inputs."""


def sampled_mask(first_position: int, count: int, fraction: float, seed: int) -> Tensor:
    """Which of the stream positions ``[first_position, first_position + count)`` a ``fraction`` sample keeps.

    Position ``i`` is kept when ``hash(seed, i) / 2^32 < fraction``: deterministic, independent of how
    the stream is cut into batches, and a Bernoulli(``fraction``) sample for practical purposes.
    """
    if fraction >= 1.0:
        return torch.ones(count, dtype=torch.bool)
    positions = torch.arange(first_position, first_position + count, dtype=torch.int64)
    return hash32(positions, seed + _SAMPLE_SALT) < int(fraction * 2**32)


def check_row_ids(rows: Tensor, num_rows: int, table: str = "table") -> None:
    """Raise ``ValueError`` naming ``table`` when an ID of ``rows`` lies outside ``[0, num_rows)``."""
    if rows.numel() == 0:
        return
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= num_rows:
        raise ValueError(f"table {table!r}: row IDs must lie in [0, {num_rows}), found "
                         f"{low if low < 0 else high}; the DataModule's num_embeddings_per_feature and its IDs "
                         f"disagree")


def add_row_counts(counts: Tensor, rows: Tensor, table: str = "table") -> Tensor:
    """Add one lookup per entry of ``rows`` to ``counts`` (int64, one entry per row of the table), in place.

    Costs O(len(rows)), not O(table rows). Raises ``ValueError`` naming ``table`` when an ID lies outside
    ``[0, len(counts))``. Profiles keep sparse counts instead (:func:`add_sparse_counts`).
    """
    if rows.numel() == 0:
        return counts
    check_row_ids(rows, counts.numel(), table)
    counts.index_put_((rows.long(),), torch.ones((), dtype=counts.dtype), accumulate=True)
    return counts


def add_sparse_counts(rows_a: Tensor, counts_a: Tensor, rows_b: Tensor, counts_b: Tensor,
                      num_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """The sum of two sparse counts ``(rows, counts)``: rows sorted by ID without repeats, counts of equal rows added.

    Either side may repeat rows in any order (``rows_b`` a batch's raw IDs with ``counts_b`` ones, say). One sort
    of both sides: O((a + b) log(a + b)), whatever the table's size. With ``num_rows`` (the table's size) no larger
    than ``a + b``, one dense pass over the table instead, which costs no more and sorts nothing.
    """
    if num_rows is not None and num_rows <= rows_a.numel() + rows_b.numel():
        dense = torch.zeros(num_rows, dtype=torch.int64)
        dense.index_add_(0, torch.cat([rows_a, rows_b]).long(), torch.cat([counts_a, counts_b]).long())
        rows = torch.nonzero(dense).flatten()
        return rows, dense[rows]
    rows, inverse = torch.unique(torch.cat([rows_a, rows_b]).long(), return_inverse=True)
    counts = torch.zeros(rows.numel(), dtype=torch.int64)
    counts.index_add_(0, inverse, torch.cat([counts_a, counts_b]).long())
    return rows, counts


def merge_heavy_hitters(rows_a: Tensor, counts_a: Tensor, rows_b: Tensor, counts_b: Tensor,
                        capacity: int) -> tuple[Tensor, Tensor, int]:
    """Merge two Misra-Gries summaries (or exact counts of a batch) into one of at most ``capacity`` counters.

    Counts of equal rows are added; if more than ``capacity`` rows remain, the ``(capacity + 1)``-th
    largest count ``c`` is subtracted from every counter and counters at or below zero are dropped
    (Agarwal et al., "Mergeable summaries", 2012).

    Returns:
        ``(rows, counts, decrement)``: rows sorted by ID, their counts, and ``c`` (0 if nothing was
        dropped). A row's count falls by at most ``decrement`` in this step, and summed over all merges
        the decrements are at most ``N / (capacity + 1)`` for ``N`` counted lookups, because each one
        removes ``capacity + 1`` times itself from a total that never exceeds ``N``.
    """
    if capacity < 1:
        raise ValueError(f"a heavy-hitter summary needs at least 1 counter, got capacity={capacity}")
    rows, counts = add_sparse_counts(rows_a, counts_a, rows_b, counts_b)
    if rows.numel() <= capacity:
        return rows, counts, 0
    decrement = int(torch.topk(counts, capacity + 1, sorted=True).values[-1])
    counts = counts - decrement
    keep = counts > 0
    return rows[keep], counts[keep], decrement


# ----------------------------------------------------------------------------------------------------------
# The reservoir: whole batches of counted inputs, kept by a seeded priority so that merges stay deterministic
# ----------------------------------------------------------------------------------------------------------


def reservoir_priority(batch_position: int, seed: int, rank: int) -> int:
    """The priority of the batch at ``batch_position`` of a rank's stream (lower priorities are kept)."""
    position = torch.tensor([batch_position], dtype=torch.int64)
    return int(hash32(position, seed + _RESERVOIR_SALT + 7919 * rank)[0])


def reservoir_inputs(entries: list[ReservoirEntry]) -> int:
    """Inputs the kept batches hold."""
    return sum(int(entry[3].numel()) // len(entry[1]) for entry in entries)


def trim_reservoir(entries: list[ReservoirEntry], limit: int) -> list[ReservoirEntry]:
    """Keep the lowest-priority batches while they hold fewer than ``limit`` inputs (at least one batch)."""
    kept, inputs = [], 0
    for entry in sorted(entries, key=lambda e: e[0]):
        if kept and inputs >= limit:
            break
        kept.append(entry)
        inputs += entry[3].numel() // max(len(entry[1]), 1)
    return kept


def reservoir_to_state(entries: list[ReservoirEntry]) -> list[dict[str, Any]]:
    """The kept batches as plain dicts (a profile file's ``reservoir``)."""
    return [{"priority": p, "keys": k, "values": v, "lengths": n} for p, k, v, n in entries]


def reservoir_from_state(entries: list[dict[str, Any]]) -> list[ReservoirEntry]:
    """The kept batches of :func:`reservoir_to_state`."""
    return [(int(e["priority"]), list(e["keys"]), e["values"], e["lengths"]) for e in entries]


def reservoir_batch(entries: list[ReservoirEntry]) -> KeyedJaggedTensor | None:
    """The kept batches as one KJT over every key any of them has (``None`` when none is kept).

    A batch without some key contributes inputs without lookups of it.
    """
    if not entries:
        return None
    keys = list(dict.fromkeys(k for entry in entries for k in entry[1]))
    values: dict[str, list[Tensor]] = {k: [] for k in keys}
    lengths: dict[str, list[Tensor]] = {k: [] for k in keys}
    for _, entry_keys, entry_values, entry_lengths in entries:
        batch_size = entry_lengths.numel() // len(entry_keys)
        per_key_lengths = entry_lengths.reshape(len(entry_keys), batch_size)
        per_key_values = torch.split(entry_values, per_key_lengths.sum(dim=1).tolist())
        for k in keys:  # a feature missing from a batch: no lookups for its inputs
            if k in entry_keys:
                index = entry_keys.index(k)
                values[k].append(per_key_values[index])
                lengths[k].append(per_key_lengths[index])
            else:
                lengths[k].append(torch.zeros(batch_size, dtype=entry_lengths.dtype))
    return KeyedJaggedTensor(keys=keys, values=torch.cat([v for k in keys for v in values[k]]),
                             lengths=torch.cat([n for k in keys for n in lengths[k]]))
