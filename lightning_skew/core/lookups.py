"""Counting lookups per (feature, row) and picking the most looked-up rows: the one counter every part uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.rowsets import RowSet, lookups_in

__all__ = ["check_ids", "count_lookups", "hot_input_mask", "top_rows", "top_rows_flat"]


def check_ids(name: str, ids: Tensor, size: int) -> None:
    """A clear error when ``ids`` of feature ``name`` fall outside its table ``[0, size)``."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"feature {name!r} has IDs outside its table [0, {size}): "
                         f"min {int(ids.min())}, max {int(ids.max())}")


def count_lookups(sparse: KeyedJaggedTensor, feature_names: Sequence[str], num_rows: Sequence[int],
                  counts: list[Tensor] | None = None) -> list[Tensor]:
    """Add the lookups of one batch per (feature, row) to ``counts`` (int64, one tensor per feature).

    Features of ``sparse`` that ``feature_names`` does not list are ignored. Cost follows the lookups, not the
    table rows.
    """
    if counts is None:
        counts = [torch.zeros(size, dtype=torch.int64) for size in num_rows]
    by_key = sparse.to_dict()
    for name, size, count in zip(feature_names, num_rows, counts, strict=True):
        if name not in by_key:
            continue
        ids = by_key[name].values().long().cpu()
        check_ids(name, ids, size)
        count.index_put_((ids,), torch.ones((), dtype=count.dtype), accumulate=True)
    return counts


def top_rows_flat(counts: Tensor, budget_rows: int) -> Tensor:
    """Boolean mask of the ``budget_rows`` largest counts (rows never looked up are never chosen).

    Ties go to the lower position, so the choice is deterministic.
    """
    if budget_rows < 0:
        raise ValueError(f"budget_rows must be >= 0, got {budget_rows}")
    counts = counts.long()
    seen = torch.nonzero(counts > 0).flatten()  # sort only the rows looked up: the cost follows the rows seen
    order = seen[torch.sort(counts[seen], descending=True, stable=True).indices[:budget_rows]]
    mask = torch.zeros(counts.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


def top_rows(counts: Sequence[Tensor], feature_names: Sequence[str], budget_rows: int) -> RowSet:
    """The ``budget_rows`` most looked-up rows over all tables (rows never looked up are never hot).

    Ties go to the earlier feature, then the lower row ID, so the choice is deterministic.
    """
    mask = top_rows_flat(torch.cat([count.long() for count in counts]), budget_rows)
    return RowSet.from_masks(list(feature_names), list(torch.split(mask, [c.numel() for c in counts])))


def hot_input_mask(sparse: KeyedJaggedTensor, hot_rows: RowSet) -> Tensor:
    """``[B]`` booleans: inputs all of whose lookups hit ``hot_rows`` (an input with no lookups counts as hot)."""
    hits, lookups = lookups_in(sparse, hot_rows)
    return hits == lookups
