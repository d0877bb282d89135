"""Skew statistics of lookup counts: the top rows' share of lookups and the popularity curve's power law."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TableSkew", "fit_power_law", "top_share"]


@dataclass(frozen=True)
class TableSkew:
    """Skew statistics of one table (see :meth:`AccessProfile.skew`).

    ``lookups`` counts every lookup; ``missing_lookups`` of them went to the table's ``missing_row`` (the row
    that stands for a missing value; ``None``: the table has none). The rest are the present values, over which
    ``distinct_rows`` (rows seen), ``top1_share`` (share of the present lookups taken by the top 1% of the rows
    seen) and ``exponent`` are computed. ``distinct_rows`` is exact for counted tables and the number of tracked
    rows (a lower bound) for sketched ones; ``exact`` tells which.
    """

    table: str
    num_rows: int
    lookups: int
    distinct_rows: int
    top1_share: float
    exponent: float
    exact: bool
    missing_row: int | None = None
    missing_lookups: int = 0

    @property
    def missing_share(self) -> float:
        """Share of the lookups that were missing values (0 without lookups)."""
        return self.missing_lookups / self.lookups if self.lookups else 0.0

    @property
    def seen_share(self) -> float:
        """Share of the table's rows that present values looked up."""
        return self.distinct_rows / self.num_rows


def top_share(counts: Tensor, num_rows: int, top_fraction: float = 0.01, total: int | None = None) -> float:
    """Share of lookups taken by the ``max(1, floor(top_fraction * num_rows))`` most counted rows.

    ``num_rows`` is the number of rows the share is of: a table's rows (the definition of
    :func:`lightning_skew.data.synthetic.expected_top_share`), or the rows seen, as :meth:`AccessProfile.skew`
    reports it. ``counts`` may list only some rows (a sketch); ``total`` is then the number of lookups counted.
    """
    total = int(counts.sum()) if total is None else total
    if total <= 0:
        return 0.0
    top = max(1, int(top_fraction * num_rows))
    return float(torch.topk(counts.long(), min(top, counts.numel())).values.sum()) / total


def fit_power_law(counts: Tensor, min_count: int = 16, points: int = 64) -> float:
    """Power-law exponent ``s`` of ``count(rank) ~ rank ** -s``, fitted over the head of the popularity curve.

    Least squares of ``log count`` on ``log rank`` (rank 1 = most counted) at up to ``points``
    log-spaced ranks from 1 to the last rank counted at least ``min_count`` times, so every decade of
    ranks weighs the same and the noisy tail (where sorting Poisson counts inflates the curve) stays out.

    Valid when the head follows a power law (Zipf-like click logs: ``s`` in about 0.5-2); it measures
    the head only, so a table whose tail bends away still gets its head's exponent. Returns ``nan``
    when fewer than 3 distinct ranks reach ``min_count`` (too little data, or uniform popularity).
    """
    ordered = torch.sort(counts.double(), descending=True).values
    head = int((ordered >= min_count).sum())
    ranks = torch.unique(torch.logspace(0, math.log10(max(head, 1)), points, dtype=torch.float64).round().long())
    if head < 3 or ranks.numel() < 3:
        return float("nan")
    x = torch.log(ranks.double())
    y = torch.log(ordered[ranks - 1])
    x_centered = x - x.mean()
    slope = float((x_centered * (y - y.mean())).sum() / (x_centered * x_centered).sum())
    return -slope
