"""The batch every part passes on, with the per-step decisions it carries, and the operations that keep them.

A :class:`SkewBatch` is a torchrec ``Batch`` (dense features, a ``KeyedJaggedTensor`` of sparse features,
labels) that also says what a step may do with it: whether every input on every rank looks up only hot rows
(``is_hot``, with the hot set it refers to), and where a stitched batch splits into its hot and cold
micro-batches (``num_hot``), how much each input's loss counts (``weights``), and which lookups are served
without gradient (``frozen_sparse``). Parts decide on the batch and read from the batch; no part sets flags on
another's modules. :func:`select_inputs` and :func:`concat_batches` keep the decisions that still hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.deduped import DedupedLookups
from lightning_skew.core.rowsets import is_one_hot

__all__ = ["Batch", "RoutedSparse", "SkewBatch", "batch_size_of", "concat_batches", "deduped_lookups",
           "frozen_lookups", "input_weights", "select_inputs", "set_decisions", "slice_inputs", "split_lookups"]


@dataclass
class SkewBatch(Batch):
    """A torchrec :class:`~torchrec.datasets.utils.Batch` with the decisions of its step.

    Inputs ``[0, num_hot)`` touch only hot rows; the rest may touch cold ones. A hot batch (``is_hot``)
    has ``num_hot == batch_size``. A ``stitch`` batch is one mini-batch reordered hot-first, so
    :meth:`hot_part` and :meth:`cold_part` are its two Hotline micro-batches, while a model that ignores
    the split trains on it exactly as on the original mini-batch.

    Args:
        is_hot: ``True`` when every input's lookups all hit rows of ``hot_rows`` on every rank, so the step
            may leave the cold rows out (the producer agrees it across ranks before setting it).
        num_hot: Leading inputs known to be hot (the split point of a stitched batch; 0 for cold batches).
        hot_rows: The hot set (a :class:`~lightning_skew.core.rowsets.RowSet`) that ``is_hot`` and
            ``num_hot`` refer to; a consumer that keeps other rows in fast memory checks it against its own.
        weights: Per-input loss weights ``[batch_size]`` (``None``: all 1). A model that honours them trains
            as if input ``i`` were in the batch ``weights[i]`` times (a weighted mean of the losses).
        frozen_sparse: Lookups served without gradient (``None``: none): a KeyedJaggedTensor with the keys and
            batch size of ``sparse_features`` whose pooled embeddings a model that honours it adds to those of
            ``sparse_features``, under ``torch.no_grad()``, so the embedding backward and optimizer never see
            those lookups while the rest of the model trains on the whole input.
        routed_sparse: ``sparse_features`` already routed in the data pipeline for the placement that serves it
            (``None``: not routed): a :class:`RoutedSparse`, valid only while ``sparse_features`` is the very object
            it was routed from (an operation that changes the inputs, or replaces ``sparse_features``, voids it).
        deduped: Lookups sent once per distinct bag (``None``: none), a
            :class:`~lightning_skew.core.deduped.DedupedLookups`: ``sparse_features`` then holds empty bags for
            its features, which a model that honours it pools from its ``bags`` and expands with its ``inverse``.
            It stays with the batch through :meth:`of`, :func:`select_inputs` and :func:`concat_batches`.

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([3, 4]), lengths=torch.tensor([1, 1]))
        >>> batch = SkewBatch(torch.zeros(2, 1), kjt, torch.zeros(2), is_hot=False, num_hot=1)
        >>> batch.hot_part().sparse_features.values().tolist(), batch.to("cpu").num_hot
        ([3], 1)
    """

    is_hot: bool = False
    num_hot: int = 0
    hot_rows: Any = None
    weights: Tensor | None = None
    frozen_sparse: KeyedJaggedTensor | None = None
    deduped: DedupedLookups | None = None
    routed_sparse: RoutedSparse | None = None

    @classmethod
    def of(cls, batch: Batch, is_hot: bool, num_hot: int, hot_rows: Any = None, weights: Tensor | None = None,
           frozen_sparse: KeyedJaggedTensor | None = None, deduped: DedupedLookups | None = None) -> SkewBatch:
        # The deduplicated lookups are part of the inputs (their bags are empty in sparse_features): kept by default.
        deduped = deduped if deduped is not None else deduped_lookups(batch)
        return cls(batch.dense_features, batch.sparse_features, batch.labels, is_hot=is_hot, num_hot=num_hot,
                   hot_rows=hot_rows, weights=weights, frozen_sparse=frozen_sparse, deduped=deduped)

    def _with_tensors(self, batch: Batch, weights: Tensor | None, frozen_sparse: KeyedJaggedTensor | None,
                      deduped: DedupedLookups | None = None, move_routed: Any = None) -> SkewBatch:
        # dataclasses.replace keeps every other field, a subclass's own included.
        out = dataclasses.replace(self, dense_features=batch.dense_features, sparse_features=batch.sparse_features,
                                  labels=batch.labels, weights=weights, frozen_sparse=frozen_sparse, deduped=deduped,
                                  routed_sparse=None)
        if move_routed is not None and self.routed_sparse is not None \
                and self.routed_sparse.source is self.sparse_features:
            out.routed_sparse = move_routed(self.routed_sparse, out.sparse_features)
        return out

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SkewBatch:
        return self._with_tensors(
            super().to(device, non_blocking),
            None if self.weights is None else self.weights.to(device, non_blocking=non_blocking),
            None if self.frozen_sparse is None else self.frozen_sparse.to(device, non_blocking=non_blocking),
            None if self.deduped is None else self.deduped.to(device, non_blocking=non_blocking),
            lambda routed, source: routed.to(device, non_blocking, source))

    def pin_memory(self) -> SkewBatch:
        return self._with_tensors(super().pin_memory(),
                                  None if self.weights is None else self.weights.pin_memory(),
                                  None if self.frozen_sparse is None else self.frozen_sparse.pin(),
                                  None if self.deduped is None else self.deduped.pin_memory(),
                                  lambda routed, source: routed.pin_memory(source))

    def hot_part(self) -> Batch:
        """The hot micro-batch: inputs ``[0, num_hot)``."""
        return select_inputs(self, torch.arange(self.num_hot))

    def cold_part(self) -> Batch:
        """The cold micro-batch: inputs ``[num_hot, batch_size)``."""
        return select_inputs(self, torch.arange(self.num_hot, self.batch_size))


@dataclass(frozen=True)
class RoutedSparse:
    """A batch's lookups routed ahead of the step (on the host) by a placement, for the KeyedJaggedTensor
    ``source`` only: ``parts`` by the name of the collection they are for, each with ``to(device, non_blocking)``
    and ``pin_memory()``."""

    source: KeyedJaggedTensor
    parts: dict[str, Any]

    def valid_for(self, sparse: Any) -> bool:
        """Whether these lookups describe ``sparse`` (the very object they were routed from)."""
        return sparse is self.source

    def to(self, device: torch.device | str, non_blocking: bool, source: KeyedJaggedTensor) -> RoutedSparse:
        return RoutedSparse(source, {name: part.to(device, non_blocking) for name, part in self.parts.items()})

    def pin_memory(self, source: KeyedJaggedTensor) -> RoutedSparse:
        return RoutedSparse(source, {name: part.pin_memory() for name, part in self.parts.items()})


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
    weights, frozen = input_weights(batch), frozen_lookups(batch)
    if not isinstance(batch, SkewBatch) and weights is None and frozen is None:
        return picked
    weights = None if weights is None else weights[index.to(weights.device)]
    frozen = None if frozen is None else _select_kjt(frozen, index)
    deduped = deduped_lookups(batch)
    deduped = None if deduped is None else deduped.select(index)
    if not isinstance(batch, SkewBatch):
        return SkewBatch.of(picked, False, 0, None, weights, frozen)
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
    weights, frozen = input_weights(batch), frozen_lookups(batch)
    if not isinstance(batch, SkewBatch) and weights is None and frozen is None:
        return picked
    weights = None if weights is None else weights[start:stop]
    frozen = None if frozen is None else _slice_kjt(frozen, start, stop)
    deduped = deduped_lookups(batch)
    deduped = None if deduped is None else deduped.select(torch.arange(start, stop))
    if not isinstance(batch, SkewBatch):
        return SkewBatch.of(picked, False, 0, None, weights, frozen)
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
        if input_weights(only) is not None or frozen_lookups(only) is not None:
            return SkewBatch.of(only, False, 0, None, input_weights(only), frozen_lookups(only))
        return Batch(only.dense_features, only.sparse_features, only.labels)
    keys = batches[0].sparse_features.keys()
    for batch in batches[1:]:
        if batch.sparse_features.keys() != keys:
            raise ValueError(f"concat_batches: feature keys differ: {keys} vs {batch.sparse_features.keys()}")
    joined = Batch(dense_features=torch.cat([batch.dense_features for batch in batches]),
                   sparse_features=_concat_kjts([batch.sparse_features for batch in batches]),
                   labels=torch.cat([batch.labels for batch in batches]))
    weighted = [input_weights(batch) for batch in batches]
    frozen = [frozen_lookups(batch) for batch in batches]
    if not any(isinstance(batch, SkewBatch) for batch in batches) and all(w is None for w in weighted) \
            and all(f is None for f in frozen):
        return joined
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


def input_weights(batch: Any) -> Tensor | None:
    """The per-input loss weights a batch carries (``None``: every input counts once)."""
    return getattr(batch, "weights", None)


def deduped_lookups(batch: Any) -> DedupedLookups | None:
    """The lookups a batch sends once per distinct bag (``None``: none)."""
    return getattr(batch, "deduped", None)


def frozen_lookups(batch: Any) -> KeyedJaggedTensor | None:
    """The lookups a batch serves without gradient (``None``: none)."""
    return getattr(batch, "frozen_sparse", None)


def set_decisions(batch: Batch, *, weights: Tensor | None = None,
                  frozen_sparse: KeyedJaggedTensor | None = None) -> None:
    """Record per-input weights and frozen lookups on ``batch`` in place (a torchrec ``Batch`` or a
    :class:`SkewBatch`; a callback's ``on_train_batch_start`` sees the very object ``training_step`` gets)."""
    batch.weights = weights
    batch.frozen_sparse = frozen_sparse


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
