"""Routing a batch's lookups to the hot and cold parts of a placement ahead of the step, on the host (in
``batch_to_device``, or in the DataLoader's workers: :class:`RouteInWorkers`), and handing the routed lookups to the
collections inside the step (a GPU step then holds none of the split's host syncs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.decisions import RoutedSparse, SkewBatch, routed_step
from lightning_skew.core.id_ranges import TableBounds
from lightning_skew.hotcold.router import LookupRouter

__all__ = ["RouteInWorkers", "RoutedLookups", "route_batch", "routed_ahead", "routed_batch_step", "routed_lookups"]


@dataclass(frozen=True)
class RoutedLookups:
    """A batch's lookups split for one collection's placement ahead of the step (in the data pipeline, on the
    host): the ``hot`` and ``cold`` KeyedJaggedTensors of shard slots (a stacked layout: all lookups in ``hot``,
    ``cold`` ``None``), the placement ``version`` they follow, and how many lookups hit cold rows."""

    hot: KeyedJaggedTensor
    cold: KeyedJaggedTensor | None
    version: int
    cold_lookups: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RoutedLookups:
        return RoutedLookups(self.hot.to(device, non_blocking=non_blocking),
                             None if self.cold is None else self.cold.to(device, non_blocking=non_blocking),
                             self.version, self.cold_lookups)

    def pin_memory(self) -> RoutedLookups:
        return RoutedLookups(self.hot.pin(), None if self.cold is None else self.cold.pin(), self.version,
                             self.cold_lookups)


def routed_lookups(router: LookupRouter, features: KeyedJaggedTensor, version: int) -> RoutedLookups:
    """``features`` routed by ``router`` ahead of the step, on the host (the cold count read here, not in the step),
    for the placement ``version`` it follows."""
    hot, cold, cold_lookups = router.route(features)
    return RoutedLookups(hot, cold, version, int(cold_lookups))


def routed_ahead(collections: Mapping[str, Any], batch: Any) -> bool:
    """Whether ``batch`` carries lookups routed (in a DataLoader worker, say) for the placement every collection
    (``{path: collection}``, each with ``placement_version``) has now, for the very ``sparse_features`` it holds."""
    routed = batch.routed_sparse if isinstance(batch, SkewBatch) else None
    return routed is not None and routed.valid_for(batch.sparse_features) and all(
        path in routed.parts and routed.parts[path].version == c.placement_version for path, c in collections.items())


def route_batch(collections: Mapping[str, Any], batch: Any) -> Any:
    """``batch`` with its lookups routed by every collection (``{path: collection}``, each with ``route`` and
    ``counting``) for its current placement, as ``SkewBatch.routed_sparse``; unchanged when it holds no
    KeyedJaggedTensor or while a collection counts lookups for rebalancing (those split, and count, in the step).
    A batch that arrived routed already (:func:`routed_ahead`) is the caller's to keep."""
    sparse = getattr(batch, "sparse_features", None)
    if not isinstance(sparse, KeyedJaggedTensor) or not isinstance(batch, Batch) or not collections \
            or any(c.counting for c in collections.values()):
        return batch
    routed = batch if isinstance(batch, SkewBatch) else SkewBatch.of(batch, False, 0)
    routed.routed_sparse = RoutedSparse(sparse, {path: c.route(sparse) for path, c in collections.items()})
    return routed


@contextmanager
def routed_batch_step(collections: Mapping[str, Any], batch: Any) -> Iterator[None]:
    """:func:`~lightning_skew.core.decisions.routed_step` for the routed lookups ``batch`` carries, while they still describe its inputs (a
    callback that changed them after routing voids them: the collections then route in the step)."""
    routed = batch.routed_sparse if isinstance(batch, SkewBatch) else None
    if routed is None or not routed.valid_for(batch.sparse_features):
        with routed_step(None, {}):
            yield
        return
    parts = {id(c): routed.parts[path] for path, c in collections.items() if path in routed.parts}
    with routed_step(routed.source, parts):
        yield


class _FrozenPlacement:
    """One collection's routing as it stands when the DataLoader starts: its router and placement version (what
    :func:`route_batch` asks of a collection; a later rebalance makes its routes stale, and the step routes again)."""

    counting = False

    def __init__(self, router: LookupRouter, version: int) -> None:
        self.router = router
        self.placement_version = version

    def route(self, features: KeyedJaggedTensor) -> RoutedLookups:
        return routed_lookups(self.router, features, self.placement_version)


class RouteInWorkers:
    """A DataLoader's ``collate_fn`` followed by the hot/cold routing of what it returns, so that with
    ``num_workers > 0`` the workers route each training batch and the training process does not
    (``HotColdStrategy`` sets it up in ``process_dataloader``).

    A batch with an ID outside its table is left unrouted: the training process checks it (and refuses or clamps
    it, as the DataModule says) and routes what it lets through.

    Args:
        collate_fn: the loader's own ``collate_fn``.
        collections: ``{path: (router, placement version)}`` of every hot/cold collection.
        bounds: the model's tables' sizes (:func:`~lightning_skew.core.id_ranges.model_bounds`).
    """

    def __init__(self, collate_fn: Callable[[Any], Any], collections: Mapping[str, tuple[LookupRouter, int]],
                 bounds: TableBounds) -> None:
        self.collate_fn = collate_fn
        self.collections = {path: _FrozenPlacement(router, version) for path, (router, version) in collections.items()}
        self.bounds = bounds

    def __call__(self, items: Any) -> Any:
        batch = self.collate_fn(items)
        sparse = getattr(batch, "sparse_features", None)
        if not isinstance(sparse, KeyedJaggedTensor) or self.bounds.find(sparse):
            return batch
        return route_batch(self.collections, batch)
