"""Rebalancing a hot/cold placement: new hot rows from counted lookups, and the row moves between shards."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_skew.core.distributed import all_reduce_sum, distributed
from lightning_skew.hotcold.collection import HotColdEmbeddingBagCollection
from lightning_skew.hotcold.placement import Placement, feature_groups, rebalanced_rows
from lightning_skew.hotcold.state import SEPARATOR, flatten_optimizer_state, inner_weight_key
from lightning_skew.torchrec.checkpoint import read_rows, write_rows

__all__ = ["all_reduced_counts", "move_rows", "plan_rebalance"]

#: One table's move: collection path, table, hot slots, rows leaving them, rows arriving in them.
Move = tuple[str, str, Tensor, Tensor, Tensor]


def all_reduced_counts(collection: HotColdEmbeddingBagCollection) -> Tensor:
    """The collection's counted lookups per row (tables end to end), summed over ranks. Collective."""
    size = sum(t.spec.num_rows for t in collection.placement.tables)
    counts = collection.counts if collection.counts is not None else torch.zeros(size, dtype=torch.int64)
    return all_reduce_sum(counts)


def plan_rebalance(collections: dict[str, HotColdEmbeddingBagCollection]
                   ) -> tuple[dict[str, Placement], list[Move], dict[str, float]]:
    """Each split table's new hot rows (its most counted, same count; staying rows keep their slots), the rows
    that move, and the figures: rows moved, the counted lookups' hot share before and after. Collective."""
    moved, hot_before, hot_after, total = 0, 0, 0, 0
    new_placements: dict[str, Placement] = {}
    moves: list[Move] = []
    for path, collection in sorted(collections.items()):
        counts = all_reduced_counts(collection)
        tables = collection.placement.tables
        starts = torch.cumsum(torch.tensor([0] + [t.spec.num_rows for t in tables]), 0).tolist()
        per_table = [counts[starts[i]:starts[i + 1]].cpu() for i in range(len(tables))]
        # Tables that share a feature move alike: each takes its group's counts (one of them counted its lookups).
        for group in feature_groups([t.spec for t in tables]):
            if len(group) > 1:
                summed = torch.stack([per_table[i] for i in group]).sum(0)
                for i in group:
                    per_table[i] = summed
        new_rows = []
        for table, table_counts in zip(tables, per_table, strict=True):
            rows = rebalanced_rows(table_counts, table.hot_rows, table.spec.num_rows)
            slots = torch.nonzero(rows != table.hot_rows).flatten()
            if slots.numel():
                moves.append((path, table.spec.name, slots, table.hot_rows[slots], rows[slots]))
            moved += int(slots.numel())
            hot_before += int(table_counts[table.hot_rows].sum())
            hot_after += int(table_counts[rows].sum())
            total += int(table_counts.sum())
            new_rows.append(rows)
        new_placements[path] = collection.placement.with_hot_rows(new_rows)
    figures = {"rows_moved": float(moved),
               "hot_lookup_share_before": hot_before / total if total else float("nan"),
               "hot_lookup_share_after": hot_after / total if total else float("nan")}
    return new_placements, moves, figures


def move_rows(state: dict[str, Any], optimizer_state: dict[str, Any], moves: list[Move],
              collections: dict[str, HotColdEmbeddingBagCollection]) -> None:
    """Swap rows between hot slots and the cold tables, in a module's ``state`` (live shards) and its fused
    optimizer's ``state_dict()``: each evicted row's hot copy goes back to its place in the cold table, each
    incoming row's cold copy into the freed slot. Cost grows with the rows moved. Collective: every rank moves
    the same rows in the same order."""
    if not moves:
        return
    optimizer = flatten_optimizer_state(optimizer_state["state"])
    shapes = _global_shapes(optimizer)  # ranks list only their own tables' optimizer state
    for path, table, slots, evicted, incoming in moves:
        collection = collections[path]
        # The hot slots and the cold shard: two inner tables, or one (stacked: the cold shard from row num_hot).
        hot_inner, cold_inner, cold_start = collection.row_homes(table)
        inner = collection.inner_tables()
        hot_key = inner_weight_key(path, collection.part_attribute(inner[hot_inner][1]), hot_inner)
        cold_key = inner_weight_key(path, collection.part_attribute(inner[cold_inner][1]), cold_inner)
        pairs = [(state[hot_key], state[cold_key], tuple(state[hot_key].size()), tuple(state[cold_key].size()),
                  state[hot_key].dtype)]
        for key in sorted(k for k in shapes if k.startswith(hot_key + SEPARATOR)):
            name = key.split(SEPARATOR, 1)[1]
            cold_state = f"{cold_key}{SEPARATOR}{cold_inner}{name[len(hot_inner):]}"
            pairs.append((optimizer.get(key), optimizer.get(cold_state), shapes[key][0], shapes[cold_state][0],
                          shapes[key][1]))
        for hot, cold, hot_shape, cold_shape, dtype in pairs:  # every read before any write (stacked: one tensor)
            leaving = read_rows(hot, slots, hot_shape, dtype)
            arriving = read_rows(cold, incoming + cold_start, cold_shape, dtype)
            write_rows(cold, evicted + cold_start, leaving)
            write_rows(hot, slots, arriving)


def _global_shapes(tensors: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every key any rank holds (ranks hold different keys). Collective."""
    local = {key: (tuple(value.size()), value.dtype) for key, value in tensors.items()}
    if not distributed():
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {key: value for part in gathered for key, value in part.items()}
