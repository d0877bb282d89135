"""Stale embedding rows (Slipstream): how much rows moved over a window, which are stale, which inputs to drop.

Pure functions on tensors; :class:`~lightning_skew.stale.skipper.StaleEmbeddingSkipper` wraps them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.rowsets import RowSet, lookups_in

__all__ = [
    "bisect_threshold",
    "critical_thresholds",
    "drop_mask",
    "IDLE_CEILING",
    "keep_at_least_one",
    "next_window",
    "row_change",
    "rows_left",
    "sampled_inputs",
    "unweighted_lookups",
    "weighted_drop",
    "stale_rowset",
]


def row_change(before: Tensor, after: Tensor, relative: bool = False, eps: float = 1e-12) -> Tensor:
    """Per row, the largest absolute change of any element between two snapshots ``[rows, dim]``.

    With ``relative=True`` the change is divided by the row's largest absolute element before the window
    (plus ``eps``), so rows of different scale share one threshold.
    """
    if before.shape != after.shape:
        raise ValueError(f"snapshots differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}")
    if before.numel() == 0:
        return torch.zeros(before.shape[0], dtype=torch.float32)
    change = (after.float() - before.float()).abs().amax(dim=1)
    if relative:
        change = change / (before.float().abs().amax(dim=1) + eps)
    return change


def stale_rowset(feature_names: Sequence[str], num_rows: Sequence[int], candidates: Sequence[Tensor],
                 changes: Sequence[Tensor], threshold: float) -> RowSet:
    """The candidate rows whose change is below ``threshold`` (Slipstream's test), per feature."""
    rows = [cand[change < threshold] for cand, change in zip(candidates, changes, strict=True)]
    return RowSet(list(feature_names), list(num_rows), rows)


def drop_mask(sparse: KeyedJaggedTensor, stale: RowSet, min_stale_lookups: int | None = None) -> Tensor:
    """Which inputs to drop: those with at least ``min_stale_lookups`` lookups on stale rows (``None``: all).

    An input with fewer lookups than ``min_stale_lookups`` is dropped only when all of them are stale; an
    input without lookups is never dropped.
    """
    hits, lookups = lookups_in(sparse, stale)
    needed = lookups if min_stale_lookups is None else lookups.clamp(max=min_stale_lookups)
    return (hits >= needed) & (lookups > 0)


def sampled_inputs(batch_size: int, one_in: int, seed: int, rank: int, position: int) -> Tensor:
    """A deterministic draw of about one input in ``one_in`` of a batch: the same for the same ``seed``, ``rank``
    and ``position`` (the batch's first input's place in the rank's stream), so a resumed run, or any process
    repeating the run, draws alike."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + position) % (2 ** 63))
    return torch.randint(one_in, (batch_size,), generator=generator) == 0


def weighted_drop(droppable: Tensor, sampled: Tensor, keep_one_in: int) -> tuple[Tensor, Tensor]:
    """``(drop, weights)``: the droppable inputs not ``sampled`` are dropped; the sampled droppable ones are kept
    at weight ``keep_one_in`` (so the kept share stands for all of them), every other input at weight 1."""
    return droppable & ~sampled, torch.where(droppable & sampled, float(keep_one_in), 1.0)


def unweighted_lookups(sparse: KeyedJaggedTensor, weights: Tensor | None) -> Tensor:
    """Per lookup of ``sparse``: whether its input has weight 1 (all, when ``weights`` is ``None`` or all 1)."""
    if weights is None or not bool((weights != 1).any()):
        return torch.ones(sparse.values().numel(), dtype=torch.bool)
    owner = torch.repeat_interleave(torch.arange(sparse.stride()).repeat(len(sparse.keys())),
                                    sparse.lengths().long().cpu())
    return (weights.cpu() == 1)[owner]


def rows_left(before: RowSet | None, after: RowSet) -> int:
    """Rows of ``before`` that are not in ``after`` (over the features both name)."""
    if before is None:
        return 0
    return sum(int((before.mask(name) & ~after.mask(name)).sum()) for name in before.feature_names
               if name in after.feature_names)


# An evaluation whose ceiling (the share of the sample that marking every candidate stale would drop) is below
# this finds nothing to skip: uniform IDs, or candidates that miss most lookups.
IDLE_CEILING = 0.01


def next_window(window: int, every: int, max_idle_windows: int, idle: bool) -> int:
    """Steps to the next evaluation: doubled after an idle one (nothing to skip), up to ``max_idle_windows``
    windows of ``every`` steps; back to ``every`` as soon as an evaluation finds something."""
    return min(window * 2, every * max_idle_windows) if idle else every


def keep_at_least_one(drop: Tensor) -> Tensor:
    """``drop`` with its first input kept when it would drop every input (never an empty step)."""
    if drop.numel() and bool(drop.all()):
        drop = drop.clone()
        drop[0] = False
    return drop


def critical_thresholds(sparse: KeyedJaggedTensor, changes: dict[str, Tensor],
                        min_stale_lookups: int | None = None) -> Tensor:
    """Per input, the threshold above which :func:`drop_mask` drops it (``inf``: never).

    ``changes[feature]`` holds every row's change over the window (``inf`` for rows that are not candidates);
    features missing from ``changes`` count as never stale. An input is dropped at threshold ``t`` exactly
    when ``critical < t``: its ``k``-th smallest lookup change is below ``t`` (``k = min_stale_lookups``, at
    most its lookups; all of them by default).
    """
    batch_size = sparse.stride()
    per_lookup, owners = [], []
    for key, jagged in sparse.to_dict().items():
        lengths = jagged.lengths().long()
        owners.append(torch.repeat_interleave(torch.arange(batch_size), lengths))
        if key in changes:
            per_lookup.append(changes[key][jagged.values().long()].float())
        else:
            per_lookup.append(torch.full((int(lengths.sum()),), float("inf")))
    change = torch.cat(per_lookup) if per_lookup else torch.zeros(0)
    owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
    lookups = torch.bincount(owner, minlength=batch_size)
    if min_stale_lookups is None:  # all lookups: a segment max, no sort
        critical = torch.full((batch_size,), float("-inf")).scatter_reduce(0, owner, change, reduce="amax")
        return torch.where(lookups > 0, critical, torch.full_like(critical, float("inf")))
    # Sort by (owner, change): within each input's segment the changes ascend.
    order = torch.argsort(change, stable=True)
    order = order[torch.argsort(owner[order], stable=True)]
    ordered = change[order]
    needed = lookups.clamp(max=min_stale_lookups)  # None returned above
    starts = torch.cumsum(lookups, 0) - lookups
    critical = torch.full((batch_size,), float("inf"))
    has = lookups > 0
    critical[has] = ordered[(starts + needed - 1)[has]]
    return critical


def bisect_threshold(dropped_share: Callable[[float], float], target: float, tolerance: float, low: float,
                     high: float, max_iterations: int = 40) -> tuple[float, float]:
    """Find a threshold whose drop share is within ``tolerance`` of ``target`` by bisection in log space.

    ``dropped_share(t)`` must not decrease with ``t`` (a larger threshold marks more rows stale). The search
    runs between ``low > 0`` and ``high``; when no threshold hits the band (ties, too few candidates), the
    one closest to ``target`` seen is returned.

    Returns:
        ``(threshold, share)``.
    """
    if not 0.0 <= target <= 1.0 or tolerance < 0:
        raise ValueError(f"target must lie in [0, 1] and tolerance be >= 0, got {target}, {tolerance}")
    if not 0 < low <= high:
        raise ValueError(f"the search needs 0 < low <= high, got low={low}, high={high}")
    best = (low, dropped_share(low))
    if abs(best[1] - target) <= tolerance or best[1] > target:
        return best
    top = (high, dropped_share(high))
    if top[1] <= target + tolerance:
        return top if abs(top[1] - target) < abs(best[1] - target) else best
    lo, hi = torch.log(torch.tensor(low, dtype=torch.float64)), torch.log(torch.tensor(high, dtype=torch.float64))
    for _ in range(max_iterations):
        mid = float(torch.exp((lo + hi) / 2))
        share = dropped_share(mid)
        if abs(share - target) < abs(best[1] - target):
            best = (mid, share)
        if abs(share - target) <= tolerance:
            return mid, share
        if share < target:
            lo = torch.log(torch.tensor(mid, dtype=torch.float64))
        else:
            hi = torch.log(torch.tensor(mid, dtype=torch.float64))
    return best
