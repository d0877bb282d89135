"""Operations on batches that keep the decisions they carry: picking, slicing and joining inputs, splitting lookups.

The decisions themselves (the fields of :class:`~lightning_skew.core.decisions.SkewBatch`, and who sets and honours
each) are declared in :mod:`lightning_skew.core.decisions`; :func:`select_inputs`, :func:`slice_inputs` and
:func:`concat_batches` keep those that still hold for the inputs they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.decisions import SkewBatch, deduped_lookups, frozen_lookups, input_weights
from lightning_skew.core.deduped import DedupedLookups
from lightning_skew.core.rowsets import is_one_hot

__all__ = ["Batch", "batch_size_of", "concat_batches", "select_inputs", "slice_inputs", "split_lookups"]


def batch_size_of(batch: Any) -> int:
    """Inputs in a batch: its labels' length for Batch-like objects, else the first tensor's first dimension."""
    labels = getattr(batch, "labels", None)
    if isinstance(labels, Tensor):
        return int(labels.shape[0])
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return int(batch[0].shape[0])
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, Tensor):
                return int(value.shape[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def _exclusive_cumsum(lengths: Tensor) -> Tensor:
    return torch.cumsum(lengths, 0) - lengths


def _select_kjt(sparse: KeyedJaggedTensor, index: Tensor) -> KeyedJaggedTensor:
    if sparse.variable_stride_per_key():
        raise ValueError("select_inputs: KeyedJaggedTensors with a variable batch size per feature are not supported")
    keys = sparse.keys()
    weights = sparse.weights_or_none()
    if is_one_hot(sparse):
        grid = sparse.values().view(len(keys), sparse.stride())[:, index].reshape(-1)
        return KeyedJaggedTensor(keys=keys, values=grid, lengths=torch.ones(grid.numel(), dtype=sparse.lengths().dtype),
                                 weights=None if weights is None else
                                 weights.view(len(keys), sparse.stride())[:, index].reshape(-1))
    lengths = sparse.lengths().view(len(keys), sparse.stride())
    starts = sparse.offsets()[:-1].view(len(keys), sparse.stride())[:, index].reshape(-1).long()
    picked = lengths[:, index].reshape(-1)
    counts = picked.long()
    segment = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    positions = starts[segment] + torch.arange(segment.numel()) - _exclusive_cumsum(counts)[segment]
    return KeyedJaggedTensor(keys=keys, values=sparse.values()[positions], lengths=picked,
                             weights=None if weights is None else weights[positions])


def _leading_hot(hot: Tensor) -> int:
    """How many leading entries of a boolean vector are ``True`` when all ``True`` ones lead (else 0)."""
    count = int(hot.sum())
    return count if bool(hot[:count].all()) else 0


def select_inputs(batch: Batch, index: Tensor | Sequence[int]) -> Batch:
    """The inputs of ``batch`` at positions ``index`` (in that order; a boolean mask selects in batch order).

    Dense features, labels and every feature of the KeyedJaggedTensor (values, lengths, weights) are
    indexed together, so input ``i`` of the result is input ``index[i]`` of ``batch``. A :class:`SkewBatch`
    stays one: inputs of a hot batch are hot, and the hot inputs picked from a stitched batch stay its split
    point when they still lead.
    """
    index = torch.as_tensor(index)
    if index.dtype == torch.bool:
        index = torch.nonzero(index, as_tuple=False).flatten()
    index = index.long().reshape(-1)
    picked = Batch(dense_features=batch.dense_features[index],
                   sparse_features=_select_kjt(batch.sparse_features, index), labels=batch.labels[index])
    if not isinstance(batch, SkewBatch):  # nothing decided: nothing to keep
        return picked
    weights = None if batch.weights is None else batch.weights[index.to(batch.weights.device)]
    frozen = None if batch.frozen_sparse is None else _select_kjt(batch.frozen_sparse, index)
    deduped = None if batch.deduped is None else batch.deduped.select(index)
    num_hot = index.numel() if batch.is_hot else _leading_hot(index.cpu() < batch.num_hot)
    return SkewBatch.of(picked, batch.is_hot, num_hot, batch.hot_rows, weights, frozen, deduped)


def _slice_kjt(sparse: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Inputs ``[start, stop)`` of every feature: one contiguous run of values per feature, gathered at once."""
    if sparse.variable_stride_per_key():
        raise ValueError("slice_inputs: KeyedJaggedTensors with a variable batch size per feature are not supported")
    keys, stride = sparse.keys(), sparse.stride()
    lengths = sparse.lengths().view(len(keys), stride)[:, start:stop]
    offsets = sparse.offsets().view(-1)
    first = torch.arange(len(keys), device=offsets.device) * stride
    begins, ends = offsets[first + start].long(), offsets[first + stop].long()
    counts = ends - begins
    total = int(counts.sum())
    # Position i of the result lies in feature f's run: begins[f] + (i - where f's run starts in the result).
    shift = torch.repeat_interleave(begins - _exclusive_cumsum(counts), counts, output_size=total)
    positions = shift + torch.arange(total, device=shift.device)
    weights = sparse.weights_or_none()
    return KeyedJaggedTensor(keys=keys, values=sparse.values()[positions], lengths=lengths.reshape(-1),
                             weights=None if weights is None else weights[positions])


def slice_inputs(batch: Batch, start: int, stop: int) -> Batch:
    """The inputs ``[start, stop)`` of ``batch``, as :func:`select_inputs` would give them for
    ``torch.arange(start, stop)``, without looking at the other inputs (cheap on a large joined batch)."""
    size = batch_size_of(batch)
    if not 0 <= start <= stop <= size:
        raise ValueError(f"slice_inputs: [{start}, {stop}) is not a range of the batch's {size} inputs")
    picked = Batch(dense_features=batch.dense_features[start:stop],
                   sparse_features=_slice_kjt(batch.sparse_features, start, stop), labels=batch.labels[start:stop])
    if not isinstance(batch, SkewBatch):
        return picked
    weights = None if batch.weights is None else batch.weights[start:stop]
    frozen = None if batch.frozen_sparse is None else _slice_kjt(batch.frozen_sparse, start, stop)
    deduped = None if batch.deduped is None else batch.deduped.select(torch.arange(start, stop))
    num_hot = stop - start if batch.is_hot else max(0, min(batch.num_hot, stop) - start)
    return SkewBatch.of(picked, batch.is_hot, num_hot, batch.hot_rows, weights, frozen, deduped)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """One batch holding the inputs of ``batches`` in order (all must have the same feature keys).

    Joined :class:`SkewBatch` es stay one: hot when all are hot (of the same hot set), with the leading hot
    inputs as the split point.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    if len(batches) == 1:
        only = batches[0]
        if isinstance(only, SkewBatch):
            return only
        return Batch(only.dense_features, only.sparse_features, only.labels)
    keys = batches[0].sparse_features.keys()
    for batch in batches[1:]:
        if batch.sparse_features.keys() != keys:
            raise ValueError(f"concat_batches: feature keys differ: {keys} vs {batch.sparse_features.keys()}")
    joined = Batch(dense_features=torch.cat([batch.dense_features for batch in batches]),
                   sparse_features=_concat_kjts([batch.sparse_features for batch in batches]),
                   labels=torch.cat([batch.labels for batch in batches]))
    if not any(isinstance(batch, SkewBatch) for batch in batches):
        return joined
    weighted = [input_weights(batch) for batch in batches]
    frozen = [frozen_lookups(batch) for batch in batches]
    deduped = [deduped_lookups(batch) for batch in batches]
    if any(d is None for d in deduped) and any(d is not None for d in deduped):
        raise ValueError("concat_batches: some batches carry deduplicated lookups and some do not; deduplicate all "
                         "or none")
    weights = None
    if any(w is not None for w in weighted):
        weights = torch.cat([torch.ones(batch_size_of(b), device=b.labels.device) if w is None else w
                             for b, w in zip(batches, weighted, strict=True)])
    frozen_sparse = None
    if any(f is not None for f in frozen):
        frozen_sparse = _concat_kjts([_no_lookups(b.sparse_features) if f is None else f
                                      for b, f in zip(batches, frozen, strict=True)])
    return SkewBatch.of(joined, *joined_decisions(batches), weights, frozen_sparse,
                        None if deduped[0] is None else DedupedLookups.concat(deduped))


def _concat_kjts(sparse: Sequence[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """The inputs of KeyedJaggedTensors with the same keys, one after the other."""
    keys = sparse[0].keys()
    for kjt in sparse:
        if kjt.variable_stride_per_key():
            raise ValueError("concat_batches: variable batch sizes per feature are not supported")
    lengths = torch.cat([kjt.lengths().view(len(keys), kjt.stride()) for kjt in sparse], dim=1).reshape(-1)
    if all(kjt.values().numel() == kjt.lengths().numel() for kjt in sparse) and bool((lengths == 1).all()):
        # One ID per feature and input everywhere: [features, inputs] grids joined side by side, no per-key split.
        values = torch.cat([kjt.values().view(len(keys), kjt.stride()) for kjt in sparse], dim=1).reshape(-1)
        weights = None
        if all(kjt.weights_or_none() is not None for kjt in sparse):
            weights = torch.cat([kjt.weights().view(len(keys), kjt.stride()) for kjt in sparse], dim=1).reshape(-1)
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)
    per_key = [torch.split(kjt.values(), kjt.length_per_key()) for kjt in sparse]
    values = torch.cat([part[f] for f in range(len(keys)) for part in per_key])
    weights = None
    if all(kjt.weights_or_none() is not None for kjt in sparse):
        split = [torch.split(kjt.weights(), kjt.length_per_key()) for kjt in sparse]
        weights = torch.cat([part[f] for f in range(len(keys)) for part in split])
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def _no_lookups(sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor with the keys and batch size of ``sparse`` and no lookup at all."""
    return KeyedJaggedTensor(keys=sparse.keys(), values=sparse.values()[:0],
                             lengths=torch.zeros_like(sparse.lengths()))


def split_lookups(sparse: KeyedJaggedTensor, member: Tensor) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
    """``sparse`` cut in two by a per-lookup mask: the lookups outside ``member`` and those inside, each a
    KeyedJaggedTensor with all keys and the whole batch (an input's bag holds the lookups of its side).

    Sum pooling of the two equals sum pooling of ``sparse``, so a model may look up one side without gradient.
    """
    if sparse.variable_stride_per_key():
        raise ValueError("split_lookups: KeyedJaggedTensors with a variable batch size per feature are not supported")
    member = member.to(sparse.values().device)
    lengths = sparse.lengths()
    weights = sparse.weights_or_none()
    if is_one_hot(sparse):
        inside = member.to(lengths.dtype)
    else:
        owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths.long())
        inside = torch.zeros_like(lengths).index_add_(0, owner, member.to(lengths.dtype))
    keep = ~member
    out = KeyedJaggedTensor(keys=sparse.keys(), values=sparse.values()[keep], lengths=lengths - inside,
                            weights=None if weights is None else weights[keep])
    frozen = KeyedJaggedTensor(keys=sparse.keys(), values=sparse.values()[member], lengths=inside,
                               weights=None if weights is None else weights[member])
    return out, frozen


def joined_decisions(batches: Sequence[Batch]) -> tuple[bool, int, Any]:
    """``(is_hot, num_hot, hot_rows)`` of the batches joined in order (plain batches count as cold)."""
    hot_sets = {id(b.hot_rows): b.hot_rows for b in batches if isinstance(b, SkewBatch) and b.hot_rows is not None}
    hot_rows = next(iter(hot_sets.values())) if len(hot_sets) == 1 else None
    is_hot = hot_rows is not None and all(isinstance(b, SkewBatch) and b.is_hot for b in batches)
    num_hot = 0
    for batch in batches:
        if isinstance(batch, SkewBatch) and batch.is_hot:
            num_hot += batch_size_of(batch)
            continue
        num_hot += batch.num_hot if isinstance(batch, SkewBatch) else 0
        break
    return is_hot, num_hot, hot_rows
