"""Tracking candidate rows over a window: counted candidates, snapshots, each row's change, the stale set.

Functions of the watched tables (:func:`~lightning_skew.core.tables.watched_tables`) and tensors, the same on
every rank (counts are summed, snapshots and changes maxed over ranks, by the ``reduce`` they are given: the
skipper's Trainer strategy);
:class:`~lightning_skew.stale.skipper.StaleEmbeddingSkipper` calls them at each evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.distributed import all_reduce_max, all_reduce_sum
from lightning_skew.core.lookups import check_ids, top_rows_flat
from lightning_skew.core.rowsets import RowSet
from lightning_skew.core.tables import WatchedTable
from lightning_skew.stale.staleness import bisect_threshold, critical_thresholds, stale_rowset

__all__ = ["Reduce", "candidates_from_rowset", "counted_candidates", "over_ranks", "row_changes", "search_threshold",
           "snapshot_rows", "stale_rows"]

Reduce = Callable[[Tensor, str], Tensor]
"""``reduce(tensor, op)``: the element-wise ``"sum"`` or ``"max"`` of ``tensor`` over ranks, as a new tensor (the
skipper passes its Trainer's ``strategy.reduce``)."""


def over_ranks(tensor: Tensor, op: str) -> Tensor:
    """The default :data:`Reduce`, for use outside a Trainer: ``torch.distributed``'s, a no-op on one process."""
    return all_reduce_sum(tensor) if op == "sum" else all_reduce_max(tensor)


def _split(flat: Tensor, parts: Sequence[Tensor]) -> list[Tensor]:
    return [piece.reshape(part.shape) for piece, part in zip(torch.split(flat, [p.numel() for p in parts]), parts,
                                                             strict=True)]


def counted_candidates(tables: Sequence[WatchedTable], sample: Iterable[KeyedJaggedTensor],
                       max_rows: int, reduce: Reduce = over_ranks) -> list[Tensor]:
    """Per table, the rows among the ``max_rows`` most looked up in ``sample`` (all tables and ranks together)."""
    by_key = [kjt.to_dict() for kjt in sample]
    counts = []
    for table in tables:
        ids = [jagged[name].values().long().cpu() for jagged in by_key for name in table.features if name in jagged]
        joined = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        check_ids(",".join(table.features), joined, table.num_rows)
        counts.append(torch.bincount(joined, minlength=table.num_rows))  # one pass per table, not per batch
    flat = reduce(torch.cat(counts), "sum")
    mask = top_rows_flat(flat, min(max_rows, int((flat > 0).sum())))
    return [torch.nonzero(m).flatten() for m in torch.split(mask, [t.num_rows for t in tables])]


def candidates_from_rowset(rowset: RowSet, tables: Sequence[WatchedTable]) -> list[Tensor]:
    """Per table, the rows that ``rowset`` names for any of its features (a clear error on other table sizes)."""
    candidates = []
    for table in tables:
        mask = torch.zeros(table.num_rows, dtype=torch.bool)
        for feature in table.features:
            if feature in rowset.feature_names:
                index = rowset.feature_names.index(feature)
                if rowset.num_rows[index] != table.num_rows:
                    raise ValueError(f"hot_rows: feature {feature!r} has {rowset.num_rows[index]} rows in the row set "
                                     f"but {table.num_rows} in the model's table; is the profile from another dataset?")
                mask |= rowset.mask(feature)
        candidates.append(torch.nonzero(mask).flatten())
    return candidates


def snapshot_rows(tables: Sequence[WatchedTable], candidates: Sequence[Tensor],
                  reduce: Reduce = over_ranks) -> list[Tensor]:
    """Full rows (all columns) of the candidates, identical on every rank: each rank fills what it holds."""
    states: dict[int, Any] = {}
    snapshots = [table.read_rows(rows, states) for table, rows in zip(tables, candidates, strict=True)]
    if not snapshots:
        return snapshots
    return _split(reduce(torch.cat([s.reshape(-1) for s in snapshots]), "max"), snapshots)  # -inf: not held


def row_changes(tables: Sequence[WatchedTable], candidates: Sequence[Tensor], snapshots: Sequence[Tensor],
                relative: bool = False, reduce: Reduce = over_ranks) -> list[Tensor]:
    """Per table, each candidate row's largest element change since its snapshot (relative to the row's largest
    absolute element with ``relative``): the maximum over the parts each rank holds, then over ranks."""
    changes, states = [], {}
    for table, rows, snapshot in zip(tables, candidates, snapshots, strict=True):
        if not rows.numel():
            changes.append(torch.zeros(0))
            continue
        now = table.read_rows(rows, states)
        change = torch.where(torch.isfinite(now), (now - snapshot).abs(), torch.zeros(())).amax(dim=1)
        if relative:
            change = change / (snapshot.abs().amax(dim=1) + 1e-12)
        changes.append(change)
    if not changes:
        return changes
    return _split(reduce(torch.cat(changes), "max"), changes)


def _per_feature(tables: Sequence[WatchedTable], candidates: Sequence[Tensor],
                 changes: Sequence[Tensor]) -> dict[str, Tensor]:
    """Every row's change by feature (``inf`` for rows that are not candidates)."""
    by_feature = {}
    for table, rows, change in zip(tables, candidates, changes, strict=True):
        full = torch.full((table.num_rows,), float("inf"))
        full[rows] = change
        for feature in table.features:
            by_feature[feature] = full
    return by_feature


def search_threshold(tables: Sequence[WatchedTable], candidates: Sequence[Tensor], changes: Sequence[Tensor],
                     sample: Sequence[KeyedJaggedTensor], target: float, tolerance: float,
                     fixed: float | None = None, min_stale_lookups: int | None = None,
                     reduce: Reduce = over_ranks) -> tuple[float, float, float]:
    """The threshold (``fixed``, else the one whose drop share on ``sample`` is ``target`` within ``tolerance``),
    its drop share, and the *ceiling*: the share any threshold could drop (every candidate stale), all ranks'
    samples together. A ceiling near 0 says there is nothing to skip (uniform IDs, candidates that miss most
    lookups); it is 1.0 when not measured (no sample, or skipping paused)."""
    if not sample or (fixed is None and target <= 0):
        return 0.0, 0.0, 1.0
    by_feature = _per_feature(tables, candidates, changes)
    critical = torch.cat([critical_thresholds(kjt, by_feature, min_stale_lookups) for kjt in sample])

    def dropped_share(threshold: float) -> float:
        counts = reduce(torch.tensor([float((critical < threshold).sum()), float(critical.numel())],
                                     dtype=torch.float64), "sum")
        return float(counts[0] / counts[1].clamp(min=1))

    ceiling = dropped_share(float("inf"))
    if fixed is not None:
        return fixed, dropped_share(fixed), ceiling
    finite = torch.cat(list(changes))
    finite = finite[torch.isfinite(finite)]
    if finite.numel() == 0:
        return 0.0, 0.0, ceiling
    positive = finite[finite > 0]
    low = float(positive.min()) / 2 if positive.numel() else 1e-12
    high = max(float(finite.max()) * 2, low)
    return (*bisect_threshold(dropped_share, target, tolerance, low, high), ceiling)


def stale_rows(tables: Sequence[WatchedTable], candidates: Sequence[Tensor], changes: Sequence[Tensor],
               threshold: float) -> RowSet:
    """The candidate rows whose change is below ``threshold``, per feature."""
    names, sizes, rows, chs = [], [], [], []
    for table, cand, change in zip(tables, candidates, changes, strict=True):
        for feature in table.features:
            names.append(feature)
            sizes.append(table.num_rows)
            rows.append(cand)
            chs.append(change)
    return stale_rowset(names, sizes, rows, chs, threshold)
