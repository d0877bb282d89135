"""The batch-decision contract: every decision a batch may carry, and every step context a model's parts honour.

Parts meet here and nowhere else. A part that decides something about a step (which inputs are hot, how much each
counts, which lookups train) writes it into a declared field of the :class:`SkewBatch`, on the host, before the
batch moves; the part that acts on it reads that field, or the step context entered from it. Each field and each
context below says who sets it and who honours it.

Batch fields (:data:`BATCH_DECISIONS`), kept by moving (:meth:`SkewBatch.to`, :meth:`SkewBatch.pin_memory`) and
by :func:`~lightning_skew.core.batch.select_inputs`, :func:`~lightning_skew.core.batch.slice_inputs` and
:func:`~lightning_skew.core.batch.concat_batches` as far as they still hold:

==================  ====================================================  =============================================
field               set by                                                honoured by
==================  ====================================================  =============================================
``is_hot``          ``PopularityDataModule`` (agreed over ranks)          ``HotColdStrategy`` (:func:`hot_only_step`)
``num_hot``         ``PopularityDataModule`` (``stitch``)                 :meth:`SkewBatch.hot_part` / ``cold_part``
``hot_rows``        ``PopularityDataModule``                              ``HotColdStrategy`` (checks it is placed)
``weights``         ``StaleEmbeddingSkipper(keep_one_in>1)``              the model's loss (:data:`MODEL_DECISIONS`)
``frozen_sparse``   ``StaleEmbeddingSkipper(freeze_stale_lookups=True)``  the model's sparse arch (:func:`serving_frozen`)
``deduped``         ``DedupDataModule``                                   the model's sparse arch (:func:`serving_deduped`)
``routed_sparse``   ``HotColdStrategy.batch_to_device``                   hot/cold collections (:func:`routed_step`)
==================  ====================================================  =============================================

Step contexts (``ContextVar`` s, so nothing is set on another part's modules; a symbolic tracer's proxies count as
nothing): :func:`hot_only_step`, :func:`serving_frozen`, :func:`serving_deduped`, :func:`routed_step`.

A model declares the decisions it honours in ``honoured_batch_decisions`` (names from :data:`MODEL_DECISIONS`); a
part that puts one on the batches calls :func:`require_decisions` at setup, so a model that would ignore it (a
silently biased run) is an error instead. A callback, which can only change the batch Lightning hands it, writes
through :func:`set_decisions` and :func:`replace_inputs` (never attributes of its own on a foreign object).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.deduped import DedupedLookups

__all__ = ["BATCH_DECISIONS", "MODEL_DECISIONS", "RoutedSparse", "SkewBatch", "carry_decisions", "deduped_in_step",
           "deduped_lookups", "frozen_in_step", "frozen_lookups", "hot_only_in_step", "hot_only_step", "input_weights",
           "replace_inputs", "require_decisions", "routed_in_step", "routed_step", "serving_deduped", "serving_frozen",
           "set_decisions"]


# ---------------------------------------------------------------------------------------------- batch fields


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
        deduped: Lookups sent once per distinct bag (``None``: none), a
            :class:`~lightning_skew.core.deduped.DedupedLookups`: ``sparse_features`` then holds empty bags for
            its features, which a model that honours it pools from its ``bags`` and expands with its ``inverse``.
            It stays with the batch through :meth:`of`, ``select_inputs`` and ``concat_batches``.
        routed_sparse: ``sparse_features`` already routed in the data pipeline for the placement that serves it
            (``None``: not routed): a :class:`RoutedSparse`, valid only while ``sparse_features`` is the very object
            it was routed from (an operation that changes the inputs, or replaces ``sparse_features``, voids it).

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
        from lightning_skew.core.batch import select_inputs  # the batch mechanics build on this module

        return select_inputs(self, torch.arange(self.num_hot))

    def cold_part(self) -> Batch:
        """The cold micro-batch: inputs ``[num_hot, batch_size)``."""
        from lightning_skew.core.batch import select_inputs

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


#: Every decision a :class:`SkewBatch` carries beyond torchrec's ``Batch`` (its own dataclass fields, in order).
BATCH_DECISIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SkewBatch)
                                         if f.name not in {g.name for g in dataclasses.fields(Batch)})

#: The decisions a model itself must honour (``honoured_batch_decisions``): ignoring one would bias training.
MODEL_DECISIONS: frozenset[str] = frozenset({"weights", "frozen_sparse", "deduped"})


def input_weights(batch: Any) -> Tensor | None:
    """The per-input loss weights a batch carries (``None``: every input counts once; a plain ``Batch`` has none)."""
    return batch.weights if isinstance(batch, SkewBatch) else None


def deduped_lookups(batch: Any) -> DedupedLookups | None:
    """The lookups a batch sends once per distinct bag (``None``: none)."""
    return batch.deduped if isinstance(batch, SkewBatch) else None


def frozen_lookups(batch: Any) -> KeyedJaggedTensor | None:
    """The lookups a batch serves without gradient (``None``: none)."""
    return batch.frozen_sparse if isinstance(batch, SkewBatch) else None


def carry_decisions(batch: Batch) -> SkewBatch:
    """``batch`` itself, able to carry decisions: a :class:`SkewBatch` as it is; a plain torchrec ``Batch`` turned
    into a :class:`SkewBatch` in place, with every decision at its default (nothing decided).

    In place because Lightning hands a callback's ``on_train_batch_start`` the very object ``training_step`` then
    gets, and no callback hook returns a replacement: a callback that decides per step can only change that object.
    The two classes share their layout (``SkewBatch`` only adds defaulted dataclass fields), so the object is a
    complete ``SkewBatch`` afterwards. A batch of any other class is refused, naming what to yield instead.
    """
    if isinstance(batch, SkewBatch):
        return batch
    if type(batch) is not Batch:
        raise TypeError(f"a {type(batch).__name__} cannot carry per-step decisions (weights, frozen lookups): yield "
                        "torchrec Batch or lightning_skew.core.decisions.SkewBatch objects from the DataModule "
                        "(SkewBatch.of(batch, is_hot=False, num_hot=0) wraps a Batch)")
    batch.__class__ = SkewBatch
    for field in dataclasses.fields(SkewBatch):
        if field.name in BATCH_DECISIONS:
            setattr(batch, field.name, field.default)
    return batch


def set_decisions(batch: Batch, *, weights: Tensor | None = None,
                  frozen_sparse: KeyedJaggedTensor | None = None) -> SkewBatch:
    """Record per-input ``weights`` and ``frozen_sparse`` lookups on ``batch`` in place (through
    :func:`carry_decisions`: a callback's ``on_train_batch_start`` sees the very object ``training_step`` gets);
    returns it."""
    carried = carry_decisions(batch)
    carried.weights = weights
    carried.frozen_sparse = frozen_sparse
    return carried


def replace_inputs(batch: Batch, other: Batch) -> Batch:
    """Make ``batch`` hold the inputs of ``other`` and every decision ``other`` carries, in place (for a callback,
    as :func:`set_decisions`); returns it. ``other`` is ``batch`` changed, e.g. a subset of its inputs from
    ``select_inputs``: so a decision that no longer holds (a stitched batch's old split point, routed lookups of
    the old inputs) goes with the old inputs."""
    if isinstance(other, SkewBatch):
        batch = carry_decisions(batch)
        names = [f.name for f in dataclasses.fields(SkewBatch)]
    elif isinstance(batch, SkewBatch):
        raise TypeError("replace_inputs: a SkewBatch's inputs come with their decisions; give a SkewBatch")
    else:
        names = [f.name for f in dataclasses.fields(Batch)]
    for name in names:
        setattr(batch, name, getattr(other, name))
    return batch


def require_decisions(module: nn.Module, decisions: Iterable[str], by: str) -> None:
    """Refuse a module that does not honour ``decisions`` (names from :data:`MODEL_DECISIONS`) that part ``by``
    will put on its batches; the message names both. A name outside the contract is an error of ``by``."""
    decisions = set(decisions)
    unknown = sorted(decisions - MODEL_DECISIONS)
    if unknown:
        raise ValueError(f"{by} names {unknown}, which are not decisions a model honours "
                         f"(lightning_skew.core.decisions.MODEL_DECISIONS: {sorted(MODEL_DECISIONS)})")
    honoured = set(getattr(module, "honoured_batch_decisions", ()))
    missing = sorted(decisions - honoured)
    if missing:
        raise ValueError(
            f"{by} puts {', '.join(missing)} on the batches, but {type(module).__name__} does not honour "
            f"{'them' if len(missing) > 1 else 'it'} (its honoured_batch_decisions: {sorted(honoured) or 'none'}): "
            "training would be silently biased. Use a model that does (e.g. lightning_skew.models.DLRMModule), "
            "declare and honour them in yours, or turn the option off")


# ---------------------------------------------------------------------------------------------- step contexts

# Entered by HotColdStrategy.training_step from the batch's is_hot / hot_rows; read by every hot/cold collection.
_HOT_ONLY: ContextVar[bool] = ContextVar("lightning_skew_hot_only_step", default=False)
# Entered by the model's forward from the batch's frozen_sparse / deduped; read by its sparse arch's hooks.
_FROZEN: ContextVar[KeyedJaggedTensor | None] = ContextVar("lightning_skew_frozen_lookups", default=None)
_DEDUPED: ContextVar[DedupedLookups | None] = ContextVar("lightning_skew_deduped_lookups", default=None)
# Entered from the batch's routed_sparse (hotcold.routing.routed_batch_step): the KeyedJaggedTensor routed, and
# the routed lookups per collection (by id); read by the hot/cold collections.
_ROUTED: ContextVar[tuple[KeyedJaggedTensor | None, dict[int, Any]] | None] = ContextVar(
    "lightning_skew_routed_step", default=None)


@contextmanager
def _entered(var: ContextVar, value: Any) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


@contextmanager
def hot_only_step(hot_only: bool = True) -> Iterator[None]:
    """Within it, hot/cold collections leave their cold part out (``hot_only``): enter it only for a batch whose
    lookups hit hot rows on every rank, as :attr:`SkewBatch.is_hot` says. Entered by ``HotColdStrategy``."""
    with _entered(_HOT_ONLY, bool(hot_only)):
        yield


def hot_only_in_step() -> bool:
    """Whether the forward in progress belongs to a :func:`hot_only_step` (read by the hot/cold collections)."""
    return _HOT_ONLY.get()


@contextmanager
def serving_frozen(frozen: KeyedJaggedTensor | None) -> Iterator[None]:
    """Within, a model's ``serve_frozen`` sparse arch adds the pooled embeddings of ``frozen`` (``None``: nothing)
    to each forward. Entered by the model's forward from :attr:`SkewBatch.frozen_sparse`. Anything but a
    KeyedJaggedTensor counts as nothing (a symbolic tracer, such as TorchRec's train pipeline tracing the model,
    hands attribute proxies)."""
    with _entered(_FROZEN, frozen if isinstance(frozen, KeyedJaggedTensor) else None):
        yield


def frozen_in_step() -> KeyedJaggedTensor | None:
    """The frozen lookups in force (:func:`serving_frozen`), or ``None``."""
    return _FROZEN.get()


@contextmanager
def serving_deduped(deduped: DedupedLookups | None) -> Iterator[None]:
    """Within, a model's ``serve_deduped`` sparse arch serves ``deduped`` (``None``: nothing). Entered by the
    model's forward from :attr:`SkewBatch.deduped`. Anything but a
    :class:`~lightning_skew.core.deduped.DedupedLookups` counts as nothing (a symbolic tracer hands proxies)."""
    with _entered(_DEDUPED, deduped if isinstance(deduped, DedupedLookups) else None):
        yield


def deduped_in_step() -> DedupedLookups | None:
    """The deduplicated lookups in force (:func:`serving_deduped`), or ``None``."""
    return _DEDUPED.get()


@contextmanager
def routed_step(features: KeyedJaggedTensor | None, routed: dict[int, Any]) -> Iterator[None]:
    """Within it, the collection with ``id(collection)`` in ``routed``, called with ``features`` (that very object),
    uses its routed lookups when they follow its current placement, so the step splits nothing. Entered from
    :attr:`SkewBatch.routed_sparse` (``lightning_skew.hotcold.routing.routed_batch_step``)."""
    with _entered(_ROUTED, (features, routed)):
        yield


def routed_in_step(collection: Any, features: KeyedJaggedTensor) -> Any:
    """The lookups routed ahead for ``collection`` when the step in progress routed exactly ``features``
    (else ``None``)."""
    step = _ROUTED.get()
    if step is None or step[0] is not features:
        return None
    return step[1].get(id(collection))
