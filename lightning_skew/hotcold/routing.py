"""Routing a batch's lookups to the hot and cold parts of a placement ahead of the step, on the host, and handing
the routed lookups to the collections inside the step (a GPU step then holds none of the split's host syncs)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.decisions import RoutedSparse, SkewBatch, routed_step

__all__ = ["RoutedLookups", "route_batch", "routed_batch_step"]


@dataclass(frozen=True)
class RoutedLookups:
    """A batch's lookups split for one collection's placement ahead of the step (in the data pipeline, on the
    host): the ``hot`` and ``cold`` KeyedJaggedTensors of shard slots, and the placement ``version`` they follow."""

    hot: KeyedJaggedTensor
    cold: KeyedJaggedTensor
    version: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RoutedLookups:
        return RoutedLookups(self.hot.to(device, non_blocking=non_blocking),
                             self.cold.to(device, non_blocking=non_blocking), self.version)

    def pin_memory(self) -> RoutedLookups:
        return RoutedLookups(self.hot.pin(), self.cold.pin(), self.version)


def route_batch(collections: Mapping[str, Any], batch: Any) -> Any:
    """``batch`` with its lookups routed by every collection (``{path: collection}``, each with ``route`` and
    ``counting``) for its current placement, as ``SkewBatch.routed_sparse``; unchanged when it holds no
    KeyedJaggedTensor or while a collection counts lookups for rebalancing (those split, and count, in the step)."""
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
