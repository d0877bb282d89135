"""Power-law ID popularity: the samplers and their exact CDF, the rank -> row scatter, and drift."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The HEAD_ROWS most popular ranks of a table are sampled from their exact probabilities (k+1)^-s;
# the rest from the closed-form inverse CDF of the density x^-s on [HEAD_ROWS + 0.5, N + 0.5), rank
# k taking the mass of [k + 0.5, k + 1.5) (midpoint rule, relative error < s(s+1)/(24 k^2) < 1e-5).
HEAD_ROWS = 256

# |1 - s| below this is treated as this: keeps one formula for s == 1 (log) and s != 1 (powers).
_MIN_ABS_POWER = 1e-12


def _tail_power(exponent: Tensor) -> Tensor:
    power = 1.0 - exponent
    return torch.where(power.abs() < _MIN_ABS_POWER, torch.full_like(power, _MIN_ABS_POWER), power)


def _tail_mass(log_lo: Tensor, log_hi: Tensor, power: Tensor) -> Tensor:
    """Integral of x^-s over [lo, hi] with ``power = 1 - s``, stable for s near 1."""
    return torch.exp(power * log_lo) * torch.expm1(power * (log_hi - log_lo)) / power


def _alias_table(weights: list[float]) -> tuple[list[float], list[int]]:
    """Walker/Vose alias table: cell ``i`` keeps itself with probability ``prob[i]``, else ``alias[i]``."""
    size, total = len(weights), sum(weights)
    scaled = [w * size / total for w in weights]
    prob, alias = [1.0] * size, list(range(size))
    small = [i for i, w in enumerate(scaled) if w < 1.0]
    large = [i for i, w in enumerate(scaled) if w >= 1.0]
    while small and large:
        low, high = small.pop(), large.pop()
        prob[low], alias[low] = scaled[low], high
        scaled[high] -= 1.0 - scaled[low]
        (small if scaled[high] < 1.0 else large).append(high)
    return prob, alias


@dataclass(frozen=True)
class PowerLawTables:
    """Precomputed power-law samplers for several tables at once (one row of each tensor per table).

    Rank ``k`` of a table with ``N`` rows and exponent ``s`` has probability proportional to
    ``(k + 1) ** -s`` for ``k < HEAD_ROWS`` (exact, sampled with an alias table) and to the integral of
    ``x ** -s`` over ``[k + 0.5, k + 1.5)`` beyond (closed-form inverse CDF), so a 10M-row table costs
    no more than a 300-row one. :meth:`cdf` is the exact CDF of this distribution.
    """

    num_rows: Tensor  # [M] int64
    head_rows: Tensor  # [M] int64, min(N, HEAD_ROWS)
    head_cdf: Tensor  # [M, HEAD_ROWS] float64, P(rank <= k), padded with 2.0 past head_rows
    head_share: Tensor  # [M] float64, P(rank < head_rows)
    head_scale: Tensor  # [M] float64, head_rows / head_share: maps a head uniform to an alias cell
    head_prob: Tensor  # [M * HEAD_ROWS] float64, alias-table keep probabilities, flattened
    head_alias: Tensor  # [M * HEAD_ROWS] int64, alias-table alternatives, flattened
    tail_log_lo: Tensor  # [M] float64, log(head_rows + 0.5)
    tail_log_hi: Tensor  # [M] float64, log(N + 0.5)
    tail_power: Tensor  # [M] float64, 1 - s (never exactly 0)
    tail_expm1: Tensor  # [M] float64, expm1((1 - s) * (log_hi - log_lo))

    @classmethod
    def build(cls, num_rows: Sequence[int], exponents: Sequence[float]) -> PowerLawTables:
        rows = torch.tensor(list(num_rows), dtype=torch.int64)
        exponent = torch.tensor(list(exponents), dtype=torch.float64)
        head_rows = rows.clamp(max=HEAD_ROWS)
        ranks = torch.arange(HEAD_ROWS, dtype=torch.float64)
        in_head = ranks[None, :] < head_rows[:, None]
        head_weight = torch.where(in_head, (ranks[None, :] + 1.0) ** -exponent[:, None], 0.0)
        head_cum = head_weight.cumsum(dim=1)
        head_mass = head_cum[:, -1]
        power = _tail_power(exponent)
        log_lo = torch.log(head_rows.double() + 0.5)
        log_hi = torch.log(rows.double() + 0.5)
        tail_mass = _tail_mass(log_lo, log_hi, power)
        total = head_mass + tail_mass
        head_cdf = torch.where(in_head, head_cum / total[:, None], 2.0)
        head_prob = torch.ones(len(rows), HEAD_ROWS, dtype=torch.float64)
        head_alias = torch.zeros(len(rows), HEAD_ROWS, dtype=torch.int64)
        built: dict[tuple[int, float], tuple[list[float], list[int]]] = {}
        for column, (size, s) in enumerate(zip(head_rows.tolist(), exponent.tolist(), strict=True)):
            if (size, s) not in built:
                built[(size, s)] = _alias_table(head_weight[column, :size].tolist())
            prob, alias = built[(size, s)]
            head_prob[column, :size] = torch.tensor(prob, dtype=torch.float64)
            head_alias[column, :size] = torch.tensor(alias, dtype=torch.int64)
        head_share = head_mass / total
        return cls(
            num_rows=rows,
            head_rows=head_rows,
            head_cdf=head_cdf.contiguous(),
            head_share=head_share,
            head_scale=head_rows.double() / head_share,
            head_prob=head_prob.reshape(-1),
            head_alias=head_alias.reshape(-1),
            tail_log_lo=log_lo,
            tail_log_hi=log_hi,
            tail_power=power,
            tail_expm1=torch.expm1(power * (log_hi - log_lo)),
        )

    def sample(self, uniforms: Tensor) -> Tensor:
        """Map float64 uniforms in [0, 1) of shape ``[M, n]`` (row ``m`` for table ``m``) to ranks.

        One uniform serves both parts: below ``head_share`` it picks an alias cell (integer part) and
        decides between the cell and its alias (fractional part); above, it inverts the tail CDF.
        """
        head_share = self.head_share[:, None]
        in_head = uniforms < head_share
        position = uniforms * self.head_scale[:, None]
        cell = position.floor()
        keep = position - cell
        cell = torch.minimum(cell.to(torch.int64), self.head_rows[:, None] - 1)
        flat = cell + torch.arange(0, cell.shape[0] * HEAD_ROWS, HEAD_ROWS)[:, None]
        head_rank = torch.where(keep < self.head_prob.take(flat), cell, self.head_alias.take(flat))
        tail_share = (1.0 - head_share).clamp(min=1e-300)
        within_tail = ((uniforms - head_share) / tail_share).clamp_(0.0, 1.0)
        # Inverse of the tail CDF: x^p = lo^p + v (hi^p - lo^p), solved in log space.
        log_x = torch.log1p(within_tail.mul_(self.tail_expm1[:, None])).div_(self.tail_power[:, None])
        log_x.add_(self.tail_log_lo[:, None])
        tail_rank = log_x.exp_().sub_(0.5).floor_().to(torch.int64)
        tail_rank = torch.minimum(torch.maximum(tail_rank, self.head_rows[:, None]), self.num_rows[:, None] - 1)
        return torch.where(in_head, head_rank, tail_rank)

    def cdf(self, ranks: Tensor) -> Tensor:
        """P(rank < k) for integer ``k`` in ``[0, N]``, shape ``[M, n]``, as float64."""
        ranks = ranks.to(torch.int64)
        head_index = (ranks.clamp(max=HEAD_ROWS) - 1).clamp(min=0).contiguous()
        head_part = torch.where(ranks > 0, torch.gather(self.head_cdf, 1, head_index), 0.0)
        head_part = torch.where(ranks >= self.head_rows[:, None], self.head_share[:, None], head_part)
        log_k = torch.log(torch.maximum(ranks, self.head_rows[:, None]).double() + 0.5)
        tail_total = _tail_mass(self.tail_log_lo, self.tail_log_hi, self.tail_power)[:, None]
        tail_part = _tail_mass(self.tail_log_lo[:, None], log_k, self.tail_power[:, None])
        tail_part = tail_part / tail_total.clamp(min=1e-300) * (1.0 - self.head_share[:, None])
        return head_part + torch.where(ranks > self.head_rows[:, None], tail_part, 0.0)


def sample_power_law_ranks(uniforms: Tensor, num_rows: int, exponent: float) -> Tensor:
    """Popularity ranks (0 = most popular) of one table from float64 uniforms in [0, 1), any shape.

    See :class:`PowerLawTables` for the distribution: exact ``(k + 1) ** -s`` for the most popular
    ``HEAD_ROWS`` ranks, a continuous approximation beyond. ``exponent = 0`` is uniform.
    """
    tables = PowerLawTables.build([num_rows], [exponent])
    return tables.sample(uniforms.reshape(1, -1).double()).reshape(uniforms.shape)


def power_law_cdf(ranks: Tensor, num_rows: int, exponent: float) -> Tensor:
    """P(rank < k) under the distribution :func:`sample_power_law_ranks` samples from."""
    tables = PowerLawTables.build([num_rows], [exponent])
    return tables.cdf(torch.as_tensor(ranks).reshape(1, -1)).reshape(torch.as_tensor(ranks).shape)


def expected_top_share(num_rows: int, exponent: float, top_fraction: float = 0.01) -> float:
    """Share of lookups that go to the ``max(1, floor(top_fraction * num_rows))`` most popular rows.

    Exact for the distribution that :func:`sample_power_law_ranks` (and so the generator) samples from.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    top_rows = max(1, int(top_fraction * num_rows))
    return float(power_law_cdf(torch.tensor([top_rows]), num_rows, exponent)[0])


def scatter_multiplier(num_rows: int, fraction: float) -> int:
    """A multiplier coprime to ``num_rows`` near ``fraction * num_rows``, so ``a*k mod N`` is a bijection."""
    multiplier = max(1, int(fraction * num_rows))
    while math.gcd(multiplier, num_rows) != 1:
        multiplier += 1
    return multiplier


def rank_to_row(ranks: Tensor, num_rows: Tensor | int, multiplier: Tensor | int, offset: Tensor | int) -> Tensor:
    """Row ID of each popularity rank: ``(multiplier * rank + offset) mod num_rows``, as hashing would scatter.

    A bijection on ``[0, num_rows)`` when ``gcd(multiplier, num_rows) == 1`` (see :func:`scatter_multiplier`).
    Arguments broadcast; products stay below 2^63 for tables of up to ~3e9 rows.
    """
    return (ranks * multiplier + offset) % num_rows


def drift_ranks(ranks: Tensor, num_rows: Tensor | int, period: Tensor | int, shift: Tensor | int) -> Tensor:
    """Ranks after ``period`` drifts of ``shift`` each: the row at rank k is the one formerly at k + shift.

    So the ``shift`` hottest rows become the coldest and rows that were ``shift`` ranks down become hot.
    """
    return (ranks + (period * shift) % num_rows) % num_rows
