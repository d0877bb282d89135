"""Hot/cold placement of embedding tables under a fast-memory budget (FAE), as pure functions.

A :class:`Placement` says, per table, which rows are hot. A table whose rows are all hot lives in fast
memory, one with none stays in host memory, and the rest are *split*: the hot rows form a compact hot
shard (slots ``0 .. H-1``, in ascending row ID) and the other rows a cold shard (slots ``0 .. N-H-1``,
ascending). :func:`row_slots` is that re-indexing; :func:`split_rows` and :func:`merge_rows` move a
table's rows (weights or per-row optimizer state) between the dataset's ID space and the two shards,
exactly (a permutation, no approximation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Placement",
    "TablePlacement",
    "TableSpec",
    "merge_rows",
    "plan_placement",
    "rebalanced_mask",
    "row_slots",
    "split_rows",
]

HOT, COLD, SPLIT = "hot", "cold", "split"


@dataclass(frozen=True)
class TableSpec:
    """An embedding table as the placement sees it: name, the features that look it up, size and width."""

    name: str
    feature_names: tuple[str, ...]
    num_rows: int
    embedding_dim: int


@dataclass(frozen=True)
class TablePlacement:
    """Which rows of one table are hot (``hot[i]`` for row ID ``i``)."""

    spec: TableSpec
    hot: Tensor

    @property
    def num_hot(self) -> int:
        return int(self.hot.sum())

    @property
    def kind(self) -> str:
        """``hot`` (every row hot), ``cold`` (none) or ``split``."""
        hot = self.num_hot
        return HOT if hot == self.spec.num_rows else COLD if hot == 0 else SPLIT


@dataclass(frozen=True)
class Placement:
    """Per table, the hot rows; and the budget and row sizes (weights plus optimizer state) they fit in."""

    tables: tuple[TablePlacement, ...]
    budget_bytes: int
    bytes_per_row: tuple[int, ...]

    @property
    def hot_bytes(self) -> int:
        """Bytes the hot rows take, optimizer state included."""
        return sum(t.num_hot * size for t, size in zip(self.tables, self.bytes_per_row, strict=True))

    def table(self, name: str) -> TablePlacement:
        for table in self.tables:
            if table.spec.name == name:
                return table
        raise KeyError(f"the placement has no table {name!r}")

    def rows(self) -> list[list[str]]:
        """The plan as table rows: table, placement, hot rows, cold rows, hot bytes."""
        return [[t.spec.name, t.kind, str(t.num_hot), str(t.spec.num_rows - t.num_hot), str(t.num_hot * size)]
                for t, size in zip(self.tables, self.bytes_per_row, strict=True)]

    def describe(self) -> str:
        header = ["table | placement | hot rows | cold rows | hot bytes"]
        lines = [" | ".join(row) for row in self.rows()]
        total = f"hot: {self.hot_bytes} of {self.budget_bytes} budget bytes"
        return "\n".join(header + lines + [total])

    def with_masks(self, masks: Sequence[Tensor]) -> Placement:
        """The same tables with other hot masks (each keeping its table's hot row count)."""
        tables = []
        for table, mask in zip(self.tables, masks, strict=True):
            if mask.shape != table.hot.shape or int(mask.sum()) != table.num_hot:
                raise ValueError(f"table {table.spec.name!r}: a new placement must keep {table.num_hot} hot rows of "
                                 f"{table.spec.num_rows} (the shards' shapes), got {int(mask.sum())} of {mask.numel()}")
            tables.append(TablePlacement(table.spec, mask.bool().cpu()))
        return Placement(tuple(tables), self.budget_bytes, self.bytes_per_row)

    def state_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "bytes_per_row": list(self.bytes_per_row),
                "tables": [{"name": t.spec.name, "feature_names": list(t.spec.feature_names),
                            "num_rows": t.spec.num_rows, "embedding_dim": t.spec.embedding_dim,
                            "hot_rows": torch.nonzero(t.hot).flatten()} for t in self.tables]}

    @classmethod
    def from_state_dict(cls, state: dict) -> Placement:
        tables = []
        for entry in state["tables"]:
            spec = TableSpec(entry["name"], tuple(entry["feature_names"]), int(entry["num_rows"]),
                             int(entry["embedding_dim"]))
            mask = torch.zeros(spec.num_rows, dtype=torch.bool)
            mask[entry["hot_rows"].long()] = True
            tables.append(TablePlacement(spec, mask))
        return cls(tuple(tables), int(state["budget_bytes"]), tuple(int(b) for b in state["bytes_per_row"]))

    def same_shapes(self, other: Placement) -> bool:
        """Whether ``other`` places the same tables with the same hot row counts (shards of the same shapes)."""
        return [(t.spec, t.num_hot) for t in self.tables] == [(t.spec, t.num_hot) for t in other.tables]


def plan_placement(tables: Sequence[TableSpec], hot_rows: Sequence[Tensor], budget_bytes: int,
                   bytes_per_row: Sequence[int]) -> Placement:
    """Place ``tables`` under ``budget_bytes``, starting from each table's profiled ``hot_rows``.

    The profiled rows (for example :meth:`~lightning_skew.profile.AccessProfile.hot_rows`, FAE's global cut)
    are hot. Then, smallest remainder first (ties: earlier table), every table whose remaining rows fit in
    the budget left over becomes hot entirely, so small tables never pay for a split. The hot bytes never
    exceed the budget.

    Args:
        tables: the tables, in the model's order.
        hot_rows: per table, the row IDs to make hot (any order).
        budget_bytes: fast memory for hot rows, optimizer state included.
        bytes_per_row: bytes one row of each table takes (see :func:`~lightning_skew.profile.row_bytes`).

    Raises:
        ValueError: if the budget holds no row at all, if the given hot rows exceed it, or if the inputs do
            not describe the same tables.
    """
    if not (len(tables) == len(hot_rows) == len(bytes_per_row)):
        raise ValueError(f"plan_placement needs one entry per table: {len(tables)} tables, {len(hot_rows)} hot row "
                         f"lists, {len(bytes_per_row)} row sizes")
    if not tables:
        raise ValueError("plan_placement: there are no tables to place")
    smallest = min(bytes_per_row)
    if budget_bytes < smallest:
        name = tables[list(bytes_per_row).index(smallest)].name
        raise ValueError(f"a fast-memory budget of {budget_bytes} bytes holds no embedding row: the smallest row "
                         f"(table {name!r}) takes {smallest} bytes with its optimizer state; raise budget_bytes")
    masks = []
    for spec, rows in zip(tables, hot_rows, strict=True):
        rows = rows.long().flatten()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= spec.num_rows):
            raise ValueError(f"table {spec.name!r}: hot rows lie outside [0, {spec.num_rows}); was the profile made "
                             "for other tables?")
        mask = torch.zeros(spec.num_rows, dtype=torch.bool)
        mask[rows] = True
        masks.append(mask)
    used = sum(int(m.sum()) * size for m, size in zip(masks, bytes_per_row, strict=True))
    if used > budget_bytes:
        raise ValueError(f"the given hot rows take {used} bytes, more than the budget of {budget_bytes}")
    remainders = sorted((int((~m).sum()) * size, index) for index, (m, size) in
                        enumerate(zip(masks, bytes_per_row, strict=True)) if not bool(m.all()))
    for extra, index in remainders:
        if used + extra <= budget_bytes:
            masks[index][:] = True
            used += extra
    placed = tuple(TablePlacement(spec, mask) for spec, mask in zip(tables, masks, strict=True))
    return Placement(placed, int(budget_bytes), tuple(int(b) for b in bytes_per_row))


def rebalanced_mask(counts: Tensor, current: Tensor) -> Tensor:
    """The ``current.sum()`` most counted rows of a table, as a new hot mask.

    Ties keep currently hot rows hot, then prefer the smaller row ID, so rows move only when another row
    was really counted more often, and the result is deterministic.
    """
    capacity = int(current.sum())
    mask = torch.zeros_like(current, dtype=torch.bool)
    if capacity == 0 or capacity == current.numel():
        return current.clone().bool()
    # Sort key: count descending, then currently hot first, then row ID ascending (stable sort keeps IDs).
    key = counts.long().cpu() * 2 + current.long()
    order = torch.argsort(key, descending=True, stable=True)
    mask[order[:capacity]] = True
    return mask


def row_slots(hot: Tensor) -> Tensor:
    """Where each row of a table lives: its slot in the hot shard (if ``hot``) or in the cold shard.

    Both shards keep ascending row-ID order.
    """
    hot = hot.bool()
    hot_slot = torch.cumsum(hot, 0) - 1
    cold_slot = torch.cumsum(~hot, 0) - 1
    return torch.where(hot, hot_slot, cold_slot)


def split_rows(full: Tensor, hot: Tensor) -> tuple[Tensor, Tensor]:
    """A table's rows (first dimension) as ``(hot shard, cold shard)`` under the hot mask ``hot``."""
    hot = hot.to(full.device).bool()
    return full[hot], full[~hot]


def merge_rows(hot_part: Tensor | None, cold_part: Tensor | None, hot: Tensor) -> Tensor:
    """Inverse of :func:`split_rows`: the table's rows in row-ID order (a missing part has no rows)."""
    like = hot_part if hot_part is not None else cold_part
    if like is None:
        raise ValueError("merge_rows needs a hot or a cold part")
    hot = hot.to(like.device).bool()
    full = like.new_empty((hot.numel(), *like.shape[1:]))
    if hot_part is not None:
        full[hot] = hot_part
    if cold_part is not None:
        full[~hot] = cold_part.to(like.device)
    return full
