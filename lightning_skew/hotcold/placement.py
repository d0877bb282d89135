"""Hot/cold placement of embedding tables under a fast-memory budget (FAE), as pure functions.

A :class:`Placement` says, per table, which rows are hot and in which slot of the table's hot shard each
lives. A table whose rows are all hot lives in fast memory only, one with none in host memory only, and the
rest are *split*: the hot rows form a compact hot shard (``hot_rows[s]`` is the row in slot ``s``), and the
cold shard is the whole table in row-ID order, whose copies of hot rows are not read while they are hot (as
FAE keeps its CPU table whole). So a lookup of a cold row needs no re-indexing, and moving a row between the
shards touches only that row: :func:`rebalanced_rows` keeps every staying row in its slot and puts incoming
rows into the slots of evicted ones. :func:`split_rows` and :func:`merge_rows` move a table's rows (weights
or per-row optimizer state) between the dataset's ID space and the two shards, exactly.
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
    "feature_groups",
    "hot_slots",
    "merge_rows",
    "plan_placement",
    "rebalanced_mask",
    "rebalanced_rows",
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
    """The hot rows of one table, in hot-shard slot order (``hot_rows[s]`` lives in slot ``s``)."""

    spec: TableSpec
    hot_rows: Tensor

    @property
    def num_hot(self) -> int:
        return int(self.hot_rows.numel())

    @property
    def hot(self) -> Tensor:
        """Boolean mask over the table's rows: hot or not."""
        mask = torch.zeros(self.spec.num_rows, dtype=torch.bool)
        mask[self.hot_rows] = True
        return mask

    @property
    def kind(self) -> str:
        """``hot`` (every row hot: no cold shard), ``cold`` (none: no hot shard) or ``split``."""
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

    def with_hot_rows(self, hot_rows: Sequence[Tensor]) -> Placement:
        """The same tables with other hot rows (slot order), each keeping its table's hot row count."""
        tables = []
        for table, rows in zip(self.tables, hot_rows, strict=True):
            rows = rows.long().cpu()
            if rows.numel() != table.num_hot or (rows.numel() and int(rows.unique().numel()) != rows.numel()):
                raise ValueError(f"table {table.spec.name!r}: a new placement must keep {table.num_hot} distinct hot "
                                 f"rows (the shards' shapes), got {rows.numel()}")
            tables.append(TablePlacement(table.spec, rows))
        return Placement(tuple(tables), self.budget_bytes, self.bytes_per_row)

    def state_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "bytes_per_row": list(self.bytes_per_row),
                "tables": [{"name": t.spec.name, "feature_names": list(t.spec.feature_names),
                            "num_rows": t.spec.num_rows, "embedding_dim": t.spec.embedding_dim,
                            "hot_rows": t.hot_rows.clone()} for t in self.tables]}

    @classmethod
    def from_state_dict(cls, state: dict) -> Placement:
        tables = []
        for entry in state["tables"]:
            spec = TableSpec(entry["name"], tuple(entry["feature_names"]), int(entry["num_rows"]),
                             int(entry["embedding_dim"]))
            tables.append(TablePlacement(spec, entry["hot_rows"].long()))
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
    # Tables that share a feature are placed alike (one routing serves the feature's lookups): whole together.
    remainders = sorted((sum(int((~masks[i]).sum()) * bytes_per_row[i] for i in group), group[0], group)
                        for group in feature_groups(tables) if not all(bool(masks[i].all()) for i in group))
    for extra, _, group in remainders:
        if used + extra <= budget_bytes:
            for index in group:
                masks[index][:] = True
            used += extra
    placed = tuple(TablePlacement(spec, torch.nonzero(mask).flatten()) for spec, mask in zip(tables, masks, strict=True))
    return Placement(placed, int(budget_bytes), tuple(int(b) for b in bytes_per_row))


def feature_groups(tables: Sequence[TableSpec]) -> list[list[int]]:
    """The tables (indices, in order) grouped by the features they share: tables looked up by one feature are in
    one group (transitively), and every other table is a group of its own. A group is placed alike."""
    parent = list(range(len(tables)))

    def root(index: int) -> int:
        while parent[index] != index:
            index = parent[index]
        return index

    first: dict[str, int] = {}
    for index, spec in enumerate(tables):
        for feature in spec.feature_names:
            if feature in first:
                parent[root(index)] = root(first[feature])
            else:
                first[feature] = index
    groups: dict[int, list[int]] = {}
    for index in range(len(tables)):
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())


def rebalanced_mask(counts: Tensor, current: Tensor) -> Tensor:
    """The ``current.sum()`` most counted rows of a table, as a new hot mask.

    Ties keep currently hot rows hot, then prefer the smaller row ID, so rows move only when another row
    was really counted more often, and the result is deterministic.
    """
    capacity = int(current.sum())
    if capacity == 0 or capacity == current.numel():
        return current.clone().bool()
    counts, current = counts.long().cpu(), current.bool().cpu()
    # Only counted or currently hot rows can be chosen (there are at least `capacity` of them), so sort those
    # alone: cost grows with the rows looked up, not the table. Key: count descending, then currently hot
    # first; the stable sort over ascending candidate IDs then prefers the smaller ID.
    candidates = torch.nonzero((counts > 0) | current).flatten()
    key = counts[candidates] * 2 + current[candidates].long()
    order = torch.argsort(key, descending=True, stable=True)
    mask = torch.zeros_like(current)
    mask[candidates[order[:capacity]]] = True
    return mask


def rebalanced_rows(counts: Tensor, current: Tensor, num_rows: int) -> Tensor:
    """New hot rows (slot order) of a table: the ``len(current)`` most counted rows (see
    :func:`rebalanced_mask`), every staying row in its slot, incoming rows (ascending ID) in the slots of the
    evicted ones (ascending slot)."""
    current = current.long().cpu()
    mask = torch.zeros(num_rows, dtype=torch.bool)
    mask[current] = True
    chosen = rebalanced_mask(counts, mask)
    staying = chosen[current]
    incoming = torch.nonzero(chosen & ~mask).flatten()
    rows = current.clone()
    rows[~staying] = incoming
    return rows


def hot_slots(hot_rows: Tensor, num_rows: int) -> Tensor:
    """Per row of a table: its slot in the hot shard, or ``-1`` when it is cold."""
    slots = torch.full((num_rows,), -1, dtype=torch.int64)
    slots[hot_rows.long()] = torch.arange(hot_rows.numel())
    return slots


def split_rows(full: Tensor, hot_rows: Tensor) -> tuple[Tensor, Tensor]:
    """A table's rows (first dimension) as ``(hot shard, cold shard)``: the hot rows in slot order, and the
    whole table as the cold shard."""
    return full[hot_rows.to(full.device).long()], full


def merge_rows(hot_part: Tensor | None, cold_part: Tensor | None, hot_rows: Tensor) -> Tensor:
    """Inverse of :func:`split_rows`: the table's rows in row-ID order, hot rows taken from the hot shard. A
    table without a cold shard is all hot; one without a hot shard is the cold shard."""
    if cold_part is None:
        if hot_part is None:
            raise ValueError("merge_rows needs a hot or a cold part")
        full = hot_part.new_empty(hot_part.shape)
    else:
        full = cold_part.clone()
    if hot_part is not None:
        full[hot_rows.to(full.device).long()] = hot_part.to(full.device)
    return full
