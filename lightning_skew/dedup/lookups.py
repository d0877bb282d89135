"""The math of deduplication: distinct bags of a batch's features, the split into a deduplicated batch, factors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.batch import Batch, SkewBatch
from lightning_skew.core.deduped import DedupedLookups

__all__ = ["dedup_batch", "dedup_factors", "distinct_inputs", "split_deduped"]


def _check_features(sparse: KeyedJaggedTensor, features: Sequence[str], by: str) -> list[int]:
    if sparse.variable_stride_per_key():
        raise ValueError(f"{by}: KeyedJaggedTensors with a variable batch size per feature are not supported")
    keys = sparse.keys()
    missing = [name for name in features if name not in keys]
    if missing or not features:
        raise ValueError(f"{by}: features {list(features)} must be a non-empty subset of the batch's sparse features "
                         f"{keys}; not found: {missing}")
    return [keys.index(name) for name in features]


def _padded_bags(sparse: KeyedJaggedTensor, position: int) -> Tensor:
    """Feature ``position``'s bags as rows ``[B, 1 + longest]``: the length, then the IDs, padded with -1."""
    batch = sparse.stride()
    lengths = sparse.lengths().view(-1, batch)[position].long()
    start = int(sum(sparse.length_per_key()[:position]))
    values = sparse.values()[start:start + int(lengths.sum())].long()
    longest = int(lengths.max()) if batch else 0
    rows = torch.full((batch, 1 + longest), -1, dtype=torch.long)
    rows[:, 0] = lengths
    if values.numel():
        owner = torch.repeat_interleave(torch.arange(batch), lengths)
        column = torch.arange(values.numel()) - (torch.cumsum(lengths, 0) - lengths)[owner]
        rows[owner, 1 + column] = values
    return rows


def distinct_inputs(sparse: KeyedJaggedTensor, features: Sequence[str]) -> tuple[Tensor, Tensor]:
    """``(first, inverse)``: the inputs whose bags of ``features`` (taken together) are distinct, in batch order
    (``first[u]`` is the first input with combination ``u``), and for every input the combination it has
    (``inverse[i]``, so input ``i``'s bags equal input ``first[inverse[i]]``'s). Exact: bags are compared ID by
    ID (and by their order within the bag), not by a hash."""
    positions = _check_features(sparse, features, "distinct_inputs")
    rows = torch.cat([_padded_bags(sparse, p) for p in positions], dim=1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    count = int(inverse.max()) + 1 if inverse.numel() else 0
    first = torch.full((count,), rows.shape[0], dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(rows.shape[0]), reduce="amin")
    order = torch.argsort(first)  # number the combinations by first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return first[order], rank[inverse]


def split_deduped(sparse: KeyedJaggedTensor, features: Sequence[str], first: Tensor
                  ) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
    """``(rest, bags)``: ``sparse`` with empty bags for ``features``, and a KeyedJaggedTensor with all keys whose
    input ``u`` holds the bags of ``features`` of input ``first[u]`` (and empty bags for the other keys)."""
    positions = _check_features(sparse, features, "split_deduped")
    keys, batch = sparse.keys(), sparse.stride()
    deduped = torch.zeros(len(keys), dtype=torch.bool)
    deduped[positions] = True
    lengths = sparse.lengths().view(len(keys), batch)
    weights = sparse.weights_or_none()
    per_key = sparse.length_per_key()
    kept = [part for part, drop in zip(torch.split(sparse.values(), per_key), deduped.tolist(), strict=True)
            if not drop]
    kept_weights = None if weights is None else [
        part for part, drop in zip(torch.split(weights, per_key), deduped.tolist(), strict=True) if not drop]
    rest = KeyedJaggedTensor(keys=keys, values=torch.cat(kept) if kept else sparse.values()[:0],
                             lengths=torch.where(deduped[:, None], 0, lengths).reshape(-1),
                             weights=None if weights is None else
                             (torch.cat(kept_weights) if kept_weights else weights[:0]))
    picked = torch.where(deduped[:, None], lengths[:, first], 0)  # [F, U]
    starts = sparse.offsets()[:-1].view(len(keys), batch)[:, first].reshape(-1).long()
    counts = picked.reshape(-1).long()
    segment = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    index = starts[segment] + torch.arange(segment.numel()) - (torch.cumsum(counts, 0) - counts)[segment]
    bags = KeyedJaggedTensor(keys=keys, values=sparse.values()[index], lengths=picked.reshape(-1),
                             weights=None if weights is None else weights[index])
    return rest, bags


def dedup_batch(batch: Batch, features: Sequence[str]) -> SkewBatch:
    """``batch`` with the lookups of ``features`` sent once per distinct combination of their bags
    (:class:`~lightning_skew.core.deduped.DedupedLookups` on a :class:`~lightning_skew.core.batch.SkewBatch`);
    the other decisions of a ``SkewBatch`` stay. Host work for the data pipeline (it reads the IDs)."""
    if getattr(batch, "deduped", None) is not None:
        raise ValueError("dedup_batch: the batch is deduplicated already")
    first, inverse = distinct_inputs(batch.sparse_features, features)
    rest, bags = split_deduped(batch.sparse_features, features, first)
    lookups = DedupedLookups(bags, inverse, tuple(features))
    plain = Batch(batch.dense_features, rest, batch.labels)
    if isinstance(batch, SkewBatch):
        return SkewBatch.of(plain, batch.is_hot, batch.num_hot, batch.hot_rows, batch.weights, batch.frozen_sparse,
                            lookups)
    return SkewBatch.of(plain, False, 0, deduped=lookups)


def dedup_factors(sparse: KeyedJaggedTensor, features: Sequence[str] | None = None) -> dict[str, float]:
    """Distinct bags / bags of each feature of a batch (``None``: every key): what deduplicating it alone would
    leave of its lookups' bags (1.0: nothing repeats)."""
    features = list(sparse.keys()) if features is None else list(features)
    positions = _check_features(sparse, features, "dedup_factors")
    factors = {}
    for name, position in zip(features, positions, strict=True):
        distinct = torch.unique(_padded_bags(sparse, position), dim=0).shape[0]
        factors[name] = distinct / max(sparse.stride(), 1)
    return factors
