"""The math of deduplication: distinct bags of a batch's features, the split into a deduplicated batch, factors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    # Where the lengths agree, lookup k of input i faces lookup k of input i - 1, `lengths[i]` places back.
    back = torch.arange(values.numel()) - lengths[owner]
    comparable = same[owner]
    differs = comparable & (values != values[back.clamp(min=0)])
    mismatches = torch.zeros_like(lengths).index_add_(0, owner, differs.long())
    return same & (mismatches == 0)


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


def _gathered(values: Tensor, lengths: Tensor, starts: Tensor) -> Tensor:
    """The IDs of bags given by their lengths and start offsets, one bag after the other."""
    counts = lengths.long()
    segment = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return values[starts.long()[segment] + torch.arange(segment.numel()) - (torch.cumsum(counts, 0) - counts)[segment]]


def _three_forms(sparse: KeyedJaggedTensor, features: Sequence[str], first: Tensor
                 ) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor, KeyedJaggedTensor]:
    """``(rest, bags, merged)``: see :func:`split_deduped` and :func:`merged_lookups`. The other keys' IDs are
    taken as whole segments; only the deduplicated bags are gathered, once for both forms that hold them."""
    positions = set(_check_features(sparse, features, "split_deduped"))
    keys, batch = sparse.keys(), sparse.stride()
    distinct = first.numel()
    lengths = sparse.lengths().view(len(keys), batch)
    per_key = sparse.length_per_key()
    values = torch.split(sparse.values(), per_key)
    weights = sparse.weights_or_none()
    weight_parts = None if weights is None else torch.split(weights, per_key)
    zeros_b, zeros_u, pad = lengths.new_zeros(batch), lengths.new_zeros(distinct), lengths.new_zeros(batch - distinct)
    rest_v, rest_w, rest_l, bag_v, bag_w, bag_l, merged_v, merged_w, merged_l = ([] for _ in range(9))
    for key in range(len(keys)):
        if key in positions:
            picked = lengths[key][first]
            starts = (torch.cumsum(lengths[key], 0) - lengths[key])[first]
            ids = _gathered(values[key], picked, starts)
            bag_v.append(ids)
            merged_v.append(ids)
            if weight_parts is not None:
                bag_w.append(_gathered(weight_parts[key], picked, starts))
                merged_w.append(bag_w[-1])
            rest_l.append(zeros_b)
            bag_l.append(picked)
            merged_l.append(torch.cat([picked, pad]))
        else:
            rest_v.append(values[key])
            merged_v.append(values[key])
            if weight_parts is not None:
                rest_w.append(weight_parts[key])
                merged_w.append(weight_parts[key])
            rest_l.append(lengths[key])
            bag_l.append(zeros_u)
            merged_l.append(lengths[key])

    def kjt(parts: list[Tensor], weight_list: list[Tensor], length_list: list[Tensor]) -> KeyedJaggedTensor:
        empty = sparse.values()[:0]
        return KeyedJaggedTensor(keys=keys, values=torch.cat(parts) if parts else empty,
                                 lengths=torch.cat(length_list),
                                 weights=None if weights is None else
                                 (torch.cat(weight_list) if weight_list else weights[:0]))

    return kjt(rest_v, rest_w, rest_l), kjt(bag_v, bag_w, bag_l), kjt(merged_v, merged_w, merged_l)


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
