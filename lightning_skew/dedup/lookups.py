"""The math of deduplication: distinct bags of a batch's features, the split into a deduplicated batch, factors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.batch import Batch
from lightning_skew.core.decisions import SkewBatch, deduped_lookups
from lightning_skew.core.deduped import DedupedLookups
from lightning_skew.core.hashing import MASK32, mix32

__all__ = ["batch_repeats", "dedup_batch", "dedup_factors", "distinct_inputs", "format_repeats", "split_deduped"]


def _check_features(sparse: KeyedJaggedTensor, features: Sequence[str], by: str) -> list[int]:
    if sparse.variable_stride_per_key():
        raise ValueError(f"{by}: KeyedJaggedTensors with a variable batch size per feature are not supported")
    keys = sparse.keys()
    missing = [name for name in features if name not in keys]
    if missing or not features:
        raise ValueError(f"{by}: features {list(features)} must be a non-empty subset of the batch's sparse features "
                         f"{keys}; not found: {missing}")
    return [keys.index(name) for name in features]


def _bags_of(sparse: KeyedJaggedTensor, position: int) -> tuple[Tensor, Tensor, Tensor]:
    """Feature ``position``'s ``(lengths [B], offsets [B] into values, values)``, int64."""
    batch = sparse.stride()
    lengths = sparse.lengths().view(-1, batch)[position].long()
    start = int(sum(sparse.length_per_key()[:position]))
    values = sparse.values()[start:start + int(lengths.sum())].long()
    return lengths, torch.cumsum(lengths, 0) - lengths, values


def _bag_hash(lengths: Tensor, offsets: Tensor, values: Tensor, salt: int) -> Tensor:
    """A 62-bit hash of each bag (its length and its IDs in order): equal bags hash equal."""
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    place = torch.arange(values.numel()) - offsets[owner]
    mixed = mix32(((values * 0x9E3779B1) ^ (values >> 32) ^ (place * 0x85EBCA77) ^ salt) & MASK32)
    high = mix32((mixed ^ (place * 0xC2B2AE3D)) & MASK32)
    low_sum = torch.zeros_like(lengths).index_add_(0, owner, mixed)
    high_sum = torch.zeros_like(lengths).index_add_(0, owner, high)
    return ((high_sum & 0x3FFFFFFF) << 32) ^ (low_sum & MASK32) ^ (mix32(lengths & MASK32) << 20)


def _same_bags(lengths: Tensor, offsets: Tensor, values: Tensor, other: Tensor) -> bool:
    """Whether every input's bag equals that of input ``other[i]``, ID by ID."""
    if not torch.equal(lengths, lengths[other]):
        return False
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    place = torch.arange(values.numel()) - offsets[owner]
    return torch.equal(values, values[offsets[other][owner] + place])


def _first_of_each(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``(first, inverse)`` of the distinct entries of ``keys``, numbered by first appearance."""
    _, inverse = torch.unique(keys, return_inverse=True)
    count = int(inverse.max()) + 1 if inverse.numel() else 0
    first = torch.full((count,), keys.numel(), dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(keys.numel()), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return first[order], rank[inverse]


def _padded_bags(lengths: Tensor, offsets: Tensor, values: Tensor) -> Tensor:
    """Bags as rows ``[B, 1 + longest]``: the length, then the IDs, padded with -1."""
    batch = lengths.numel()
    rows = torch.full((batch, 1 + (int(lengths.max()) if batch else 0)), -1, dtype=torch.long)
    rows[:, 0] = lengths
    if values.numel():
        owner = torch.repeat_interleave(torch.arange(batch), lengths)
        rows[owner, 1 + torch.arange(values.numel()) - offsets[owner]] = values
    return rows


def _distinct(bags: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    keys = bags[0][0].new_zeros(bags[0][0].shape)
    for salt, bag in enumerate(bags):
        keys = keys * 1000003 ^ _bag_hash(*bag, salt)
    first, inverse = _first_of_each(keys)
    representative = first[inverse]
    if all(_same_bags(*bag, representative) for bag in bags):
        return first, inverse
    # A hash collision (never seen in practice): compare the bags themselves.
    rows = torch.cat([_padded_bags(*bag) for bag in bags], dim=1)
    _, exact = torch.unique(rows, dim=0, return_inverse=True)
    return _first_of_each(exact)


def _same_as_previous(lengths: Tensor, offsets: Tensor, values: Tensor) -> Tensor:
    """``[B]`` bool: whether each input's bag equals the previous input's, ID by ID (input 0: False)."""
    same = torch.zeros_like(lengths, dtype=torch.bool)
    if lengths.numel() < 2:
        return same
    same[1:] = lengths[1:] == lengths[:-1]
    # Where the lengths agree, lookup k of input i faces lookup k of input i - 1, `lengths[i]` places back (where
    # they do not, `same` is False already and the comparison is not read).
    back = (torch.arange(values.numel()) - torch.repeat_interleave(lengths, lengths, output_size=values.numel()))
    differs = values != values.index_select(0, back.clamp_(min=0))
    running = torch.cat([differs.new_zeros(1, dtype=torch.long), torch.cumsum(differs, 0)])
    return same & (running.index_select(0, offsets + lengths) == running.index_select(0, offsets))


def _runs(bags: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    same = _same_as_previous(*bags[0])
    for bag in bags[1:]:
        same &= _same_as_previous(*bag)
    starts = ~same
    inverse = torch.cumsum(starts.long(), 0) - 1
    return torch.nonzero(starts).flatten(), inverse


def distinct_inputs(sparse: KeyedJaggedTensor, features: Sequence[str],
                    consecutive: bool = True) -> tuple[Tensor, Tensor]:
    """``(first, inverse)``: the inputs whose bags of ``features`` (taken together) are distinct, in batch order
    (``first[u]`` is the first input with combination ``u``), and for every input the combination it has
    (``inverse[i]``, so input ``i``'s bags equal input ``first[inverse[i]]``'s). Exact: bags are compared ID by
    ID (and by their order within the bag).

    With ``consecutive`` (default) only runs of equal neighbours share a bag: a session's samples, which follow
    each other (RecD's assumption; one pass over the IDs). Otherwise all equal bags of the batch do (grouped by
    a hash, then checked against their group's first bag): more sharing when a user's sessions meet in one
    batch, at about 5x the host time."""
    positions = _check_features(sparse, features, "distinct_inputs")
    bags = [_bags_of(sparse, p) for p in positions]
    return _runs(bags) if consecutive else _distinct(bags)


def _gather_bags(values: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
    """The IDs (or weights) of the bags at ``starts`` of ``lengths`` in ``values``, one bag after the other."""
    total = int(lengths.sum())
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)
    shift = starts - (torch.cumsum(lengths, 0) - lengths)
    return values.index_select(0, shift.index_select(0, bag) + torch.arange(total))


def _three_forms(sparse: KeyedJaggedTensor, features: Sequence[str], first: Tensor
                 ) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor, KeyedJaggedTensor]:
    """``(rest, bags, merged)``: see :func:`split_deduped` and :func:`merged_lookups`. Lengths for all keys at
    once (``[keys, inputs]`` grids); the deduplicated features' bags gathered in one pass; the other keys' IDs
    taken as the whole runs of segments between them (a loop over the named features, not over the keys)."""
    positions = sorted(set(_check_features(sparse, features, "split_deduped")))
    named = torch.zeros(len(sparse.keys()), dtype=torch.bool)
    named[positions] = True
    batch, distinct = sparse.stride(), first.numel()
    lengths = sparse.lengths().view(-1, batch).long()
    starts = (torch.cumsum(lengths.flatten(), 0) - lengths.flatten()).view_as(lengths)
    bag_lengths = lengths[positions].index_select(1, first)  # [named, U]
    full_bag_lengths = lengths.new_zeros(lengths.shape[0], distinct)
    full_bag_lengths[positions] = bag_lengths
    rest_lengths = lengths.masked_fill(named[:, None], 0)
    merged_lengths = rest_lengths.clone()
    merged_lengths[:, :distinct] += full_bag_lengths
    bag_starts = starts[positions].index_select(1, first)
    bag_sizes = bag_lengths.sum(1).tolist()
    key_edges = [0, *accumulate(sparse.length_per_key())]

    def parts(flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gathered = torch.split(_gather_bags(flat, bag_starts.flatten(), bag_lengths.flatten()), bag_sizes)
        rest, merged, previous_end = [], [], 0
        for position, ids in zip(positions, gathered, strict=True):
            kept = flat[previous_end:key_edges[position]]
            rest.append(kept)
            merged += [kept, ids]
            previous_end = key_edges[position + 1]
        rest.append(flat[previous_end:])
        merged.append(flat[previous_end:])
        return torch.cat(rest), torch.cat(gathered), torch.cat(merged)

    values = parts(sparse.values())
    weights = None if sparse.weights_or_none() is None else parts(sparse.weights())
    dtype = sparse.lengths().dtype
    return tuple(KeyedJaggedTensor(keys=sparse.keys(), values=values[form], lengths=form_lengths.flatten().to(dtype),
                                   weights=None if weights is None else weights[form])
                 for form, form_lengths in enumerate((rest_lengths, full_bag_lengths, merged_lengths)))


def split_deduped(sparse: KeyedJaggedTensor, features: Sequence[str], first: Tensor
                  ) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
    """``(rest, bags)``: ``sparse`` with empty bags for ``features``, and a KeyedJaggedTensor with all keys whose
    input ``u`` holds the bags of ``features`` of input ``first[u]`` (and empty bags for the other keys)."""
    rest, bags, _ = _three_forms(sparse, features, first)
    return rest, bags


def merged_lookups(sparse: KeyedJaggedTensor, features: Sequence[str], first: Tensor) -> KeyedJaggedTensor:
    """``sparse`` with the bags of ``features`` replaced by those of inputs ``first`` in inputs ``[0, U)`` and
    empty bags after (the other keys as they are): the one-lookup form of
    :class:`~lightning_skew.core.deduped.DedupedLookups`."""
    return _three_forms(sparse, features, first)[2]


def dedup_batch(batch: Batch, features: Sequence[str], consecutive: bool = True) -> SkewBatch:
    """``batch`` with the lookups of ``features`` sent once per distinct combination of their bags
    (:class:`~lightning_skew.core.deduped.DedupedLookups` on a :class:`~lightning_skew.core.decisions.SkewBatch`);
    the other decisions of a ``SkewBatch`` stay. Host work for the data pipeline (it reads the IDs). See
    :func:`distinct_inputs` for ``consecutive``."""
    if deduped_lookups(batch) is not None:
        raise ValueError("dedup_batch: the batch is deduplicated already")
    first, inverse = distinct_inputs(batch.sparse_features, features, consecutive)
    rest, bags, merged = _three_forms(batch.sparse_features, features, first)
    lookups = DedupedLookups(bags, inverse, tuple(features), merged)
    plain = Batch(batch.dense_features, rest, batch.labels)
    if isinstance(batch, SkewBatch):
        return SkewBatch.of(plain, batch.is_hot, batch.num_hot, batch.hot_rows, batch.weights, batch.frozen_sparse,
                            lookups)
    return SkewBatch.of(plain, False, 0, deduped=lookups)


def dedup_factors(sparse: KeyedJaggedTensor, features: Sequence[str] | None = None,
                  consecutive: bool = True) -> dict[str, float]:
    """Distinct bags / bags of each feature of a batch (``None``: every key): what deduplicating it alone would
    leave of its bags (1.0: nothing repeats). See :func:`distinct_inputs` for ``consecutive``."""
    features = list(sparse.keys()) if features is None else list(features)
    _check_features(sparse, features, "dedup_factors")
    return {name: distinct_inputs(sparse, [name], consecutive)[0].numel() / max(sparse.stride(), 1)
            for name in features}


def batch_repeats(batches: Iterable[Batch], max_batches: int = 8) -> dict[str, dict[str, float]]:
    """Per feature, the mean over the first ``max_batches`` batches of distinct bags / bags: among neighbouring
    inputs (``consecutive``, what :class:`~lightning_skew.dedup.DedupDataModule` sends by default) and anywhere in
    the batch (``batch``). What deduplicating each feature would leave, before turning it on."""
    sums: dict[str, list[float]] = {}
    seen = 0
    for batch in batches:
        if seen >= max_batches:
            break
        sparse = batch.sparse_features
        for consecutive in (True, False):
            for name, share in dedup_factors(sparse, consecutive=consecutive).items():
                sums.setdefault(name, [0.0, 0.0])[0 if consecutive else 1] += share
        seen += 1
    return {name: {"consecutive": c / max(seen, 1), "batch": b / max(seen, 1)} for name, (c, b) in sums.items()}


def format_repeats(repeats: dict[str, dict[str, float]], batch_size: int | None, num_batches: int) -> str:
    """The per-feature report of :func:`batch_repeats`, one line per feature, most repeated first."""
    lines = [f"distinct bags / bags per batch (first {num_batches} batches of {batch_size or '?'} inputs, in "
             "training order; DedupDataModule(features=[...]) looks up and pools each distinct bag once):",
             "| feature | consecutive | anywhere in the batch |", "|---|---:|---:|"]
    for name, share in sorted(repeats.items(), key=lambda item: item[1]["consecutive"]):
        lines.append(f"| {name} | {share['consecutive']:.3f} | {share['batch']:.3f} |")
    return "\n".join(lines)
