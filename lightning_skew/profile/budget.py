"""Hot sets under a byte budget: what a row costs, which rows are hot, and the lookups they cover."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BudgetPoint",
    "Candidates",
    "global_hot_order",
    "lookup_coverage",
    "optimizer_state_elements",
    "row_bytes",
    "select_hot_rows",
    "smallest_budget_for_coverage",
]


@dataclass(frozen=True)
class BudgetPoint:
    """Hot set quality at one budget: hot rows, lookup coverage and the share of inputs that are all hot."""

    budget_bytes: int
    hot_rows: int
    hot_rows_per_table: list[int]
    coverage: float
    all_hot_inputs: float


# ----------------------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------------------


def optimizer_state_elements(optimizer: str, embedding_dim: int) -> int:
    """Optimizer state elements per embedding row: ``sgd`` 0, ``rowwise_adagrad`` 1, ``adagrad`` dim, ``adam`` 2 dim."""
    per_row = {"sgd": 0, "exact_sgd": 0, "rowwise_adagrad": 1, "exact_row_wise_adagrad": 1,
               "adagrad": embedding_dim, "exact_adagrad": embedding_dim, "adam": 2 * embedding_dim}
    if optimizer not in per_row:
        raise ValueError(f"unknown embedding optimizer {optimizer!r}; expected one of {sorted(per_row)} "
                         f"(or pass the state bytes per row yourself)")
    return per_row[optimizer]


def row_bytes(embedding_dim: int, bytes_per_element: int = 4, optimizer: str = "rowwise_adagrad",
              optimizer_bytes_per_row: int | None = None) -> int:
    """Bytes one hot row takes: ``dim * bytes_per_element`` plus its optimizer state.

    The state is ``optimizer_bytes_per_row`` when given, else ``optimizer_state_elements(optimizer, dim)``
    elements of ``bytes_per_element`` bytes (fp32 state for fp32 weights).
    """
    if embedding_dim < 1 or bytes_per_element < 1:
        raise ValueError(f"embedding_dim and bytes_per_element must be positive, got {embedding_dim}, "
                         f"{bytes_per_element}")
    if optimizer_bytes_per_row is None:
        optimizer_bytes_per_row = optimizer_state_elements(optimizer, embedding_dim) * bytes_per_element
    return embedding_dim * bytes_per_element + optimizer_bytes_per_row


# ----------------------------------------------------------------------------------------------------------
# Hot sets
# ----------------------------------------------------------------------------------------------------------


Candidates = Sequence[tuple[Tensor, Tensor]]
"""Per table ``(rows, counts)``: the rows that may be hot and their lookup counts."""


def global_hot_order(candidates: Candidates, bytes_per_row: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All candidate rows of all tables, most counted first: ``(table, row, count, cumulative_bytes)``.

    Rows with a zero count are left out. Ties go to the earlier table, then to the earlier candidate
    (the smaller row ID, as profiles list their rows), so every hot set cut from it is deterministic.
    """
    tables, rows, counts, sizes = [], [], [], []
    for index, ((table_rows, table_counts), size) in enumerate(zip(candidates, bytes_per_row, strict=True)):
        seen = table_counts > 0
        rows.append(table_rows[seen].long())
        counts.append(table_counts[seen].long())
        tables.append(torch.full((int(seen.sum()),), index, dtype=torch.int64))
        sizes.append(torch.full((int(seen.sum()),), int(size), dtype=torch.int64))
    table, row, count, size = (torch.cat(parts) for parts in (tables, rows, counts, sizes))
    order = torch.argsort(count, descending=True, stable=True)
    return table[order], row[order], count[order], size[order].cumsum(0)


def _check_budget(budget_bytes: int, bytes_per_row: Sequence[int], names: Sequence[str] | None) -> None:
    smallest = min(bytes_per_row)
    if budget_bytes < smallest:
        table = bytes_per_row.index(smallest)
        label = f"table {names[table]!r}" if names else f"table {table}"
        raise ValueError(f"a budget of {budget_bytes} bytes is too small for any hot row: the smallest row "
                         f"({label}) takes {smallest} bytes with its optimizer state; raise the budget")


def select_hot_rows(candidates: Candidates, bytes_per_row: Sequence[int], budget_bytes: int,
                    mode: str = "global", names: Sequence[str] | None = None,
                    order: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> list[Tensor]:
    """The hot rows of each table under ``budget_bytes``, as sorted row IDs per table.

    Args:
        candidates: per table ``(rows, counts)``; rows with a zero count are never hot.
        bytes_per_row: bytes one row of each table takes (see :func:`row_bytes`).
        budget_bytes: the memory for hot rows, all tables together.
        mode: ``"global"`` (FAE): the most counted rows over all tables, in :func:`global_hot_order`,
            up to the first that no longer fits. ``"proportional"``: each table gets the share of the
            budget that it has of the lookups and fills it with its most counted rows. ``"equal"``:
            each table gets ``budget / tables``. Per-table shares that a table cannot use are not
            passed on, so those modes may leave part of the budget empty.
        names: table names for error messages.
        order: the ``global_hot_order(candidates, bytes_per_row)``, when already computed (curves reuse it).

    Raises:
        ValueError: if the budget is smaller than the smallest row, or ``mode`` is unknown.
    """
    _check_budget(budget_bytes, list(bytes_per_row), names)
    if mode == "global":
        order = global_hot_order(candidates, bytes_per_row) if order is None else order
        return _cut(order, budget_bytes, len(candidates))
    if mode not in ("proportional", "equal"):
        raise ValueError(f"mode must be 'global', 'proportional' or 'equal', got {mode!r}")
    lookups = torch.tensor([float(counts.sum()) for _, counts in candidates], dtype=torch.float64)
    if mode == "equal" or float(lookups.sum()) == 0:
        shares = torch.full((len(candidates),), 1.0 / len(candidates), dtype=torch.float64)
    else:
        shares = lookups / lookups.sum()
    hot = []
    for (rows, counts), size, share in zip(candidates, bytes_per_row, shares.tolist(), strict=True):
        take = int(budget_bytes * share) // int(size)
        order = torch.argsort(counts.long(), descending=True, stable=True)[:take]
        order = order[counts[order] > 0]
        hot.append(torch.sort(rows[order].long()).values)
    return hot


def _cut(order: tuple[Tensor, Tensor, Tensor, Tensor], budget_bytes: int, num_tables: int) -> list[Tensor]:
    """The longest prefix of a :func:`global_hot_order` whose bytes fit ``budget_bytes``, as rows per table."""
    table, row, _, cumulative = order
    chosen = int(torch.searchsorted(cumulative, torch.tensor(budget_bytes), right=True))
    return [torch.sort(row[:chosen][table[:chosen] == t]).values for t in range(num_tables)]


# ----------------------------------------------------------------------------------------------------------
# Coverage
# ----------------------------------------------------------------------------------------------------------


def lookup_coverage(candidates: Candidates, hot_rows: Sequence[Tensor], total_lookups: int) -> float:
    """Share of ``total_lookups`` that went to ``hot_rows``, from the counts of ``candidates``."""
    if total_lookups <= 0:
        return 0.0
    hit = 0
    for (rows, counts), hot in zip(candidates, hot_rows, strict=True):
        hit += int(counts[torch.isin(rows, hot)].sum())
    return hit / total_lookups


def smallest_budget_for_coverage(candidates: Candidates, bytes_per_row: Sequence[int], total_lookups: int,
                                 target: float = 0.9) -> int | None:
    """The smallest budget whose global cut covers at least ``target`` of ``total_lookups``, in bytes.

    ``None`` when the counted rows together cover less (a sketch dropped too many counts).
    """
    _, _, count, cumulative = global_hot_order(candidates, bytes_per_row)
    covered = count.cumsum(0)
    needed = int(torch.searchsorted(covered, torch.tensor(math.ceil(target * total_lookups)), right=False))
    return None if needed >= covered.numel() else int(cumulative[needed])
