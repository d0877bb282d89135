"""Planning a hot/cold placement for a module: its collections, row sizes, the hot set's fit, the plan applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from lightning_skew.core.rowsets import RowSet
from lightning_skew.hotcold.collection import table_specs
from lightning_skew.hotcold.placement import Placement, TableSpec, feature_groups, plan_placement
from lightning_skew.profile.budget import row_bytes
from lightning_skew.torchrec.optim import embedding_modules, embedding_optimizer_names

__all__ = ["bytes_per_row", "embedding_bag_collections", "hot_set_inside", "place_collections"]


def embedding_bag_collections(module: nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    """``(path, collection)`` of every TorchRec ``EmbeddingBagCollection`` of ``module``, with unique table names;
    a clear error when there is none."""
    found = [(name, m) for name, m in embedding_modules(module) if isinstance(m, EmbeddingBagCollection)]
    if not found:
        raise MisconfigurationException(
            f"{type(module).__name__} holds no TorchRec EmbeddingBagCollection; there is nothing to place hot or cold "
            "(hot/cold placement splits TorchRec collections; plain torch.nn.EmbeddingBag tables are not placed: "
            "hold them in an EmbeddingBagCollection, docs/models.md)")
    names = [spec.name for _, ebc in found for spec in table_specs(ebc)]
    if len(set(names)) != len(names):
        raise MisconfigurationException(f"hot/cold placement needs unique table names across collections: {names}")
    return found


def bytes_per_row(module: nn.Module, specs: list[TableSpec], optimizer: str | None = None) -> list[int]:
    """Fast-memory bytes of one row of each table: fp32 weights plus the state of the module's embedding
    optimizer (``optimizer`` when the module carries none yet; plain SGD when neither is known)."""
    names = embedding_optimizer_names(module) or ({optimizer} if optimizer else set())
    return [max((row_bytes(spec.embedding_dim, 4, n) for n in names), default=row_bytes(spec.embedding_dim, 4, "sgd"))
            for spec in specs]


def place_collections(module: nn.Module, found: list[tuple[str, EmbeddingBagCollection]], hot_set: RowSet,
                      budget_bytes: int, sizes: list[int],
                      build: Callable[[EmbeddingBagCollection, Placement], nn.Module]) -> None:
    """Plan one placement of all tables of ``found`` (``hot_set`` cut to ``budget_bytes``, ``sizes`` bytes per
    row) and replace each collection in ``module`` by ``build(collection, its part of the placement)``."""
    specs = [spec for _, ebc in found for spec in table_specs(ebc)]
    placement = plan_placement(specs, _grouped_rows(specs, [_table_rows(hot_set, spec) for spec in specs]),
                               budget_bytes, sizes)
    start = 0
    for name, ebc in found:
        count = len(ebc.embedding_bag_configs())
        part = Placement(placement.tables[start:start + count], placement.budget_bytes,
                         placement.bytes_per_row[start:start + count])
        start += count
        _replace(module, name, build(ebc, part))


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, name, new)


def _fits(feature_rows: int, spec: TableSpec) -> bool:
    """A feature's ID range fits its table: equal, or within a table that several features share."""
    return feature_rows == spec.num_rows or (len(spec.feature_names) > 1 and feature_rows <= spec.num_rows)


def _table_rows(hot_set: RowSet, spec: TableSpec) -> Tensor:
    """The hot rows of a table: the union of its features' hot rows."""
    rows = []
    for feature in spec.feature_names:
        if feature not in hot_set.feature_names:
            raise ValueError(f"the hot set has no feature {feature!r} of table {spec.name!r} "
                             f"(it names {hot_set.feature_names}); was it made for other tables?")
        index = hot_set.feature_names.index(feature)
        if not _fits(hot_set.num_rows[index], spec):
            raise ValueError(f"the hot set gives feature {feature!r} {hot_set.num_rows[index]} rows but table "
                             f"{spec.name!r} has {spec.num_rows}")
        rows.append(hot_set.rows[index].long())
    return torch.unique(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.int64)


def _grouped_rows(specs: list[TableSpec], rows: list[Tensor]) -> list[Tensor]:
    """Every table's hot rows made the union of its group's (tables that share a feature: one routing serves the
    feature's lookups, so they must be placed alike); refused when a group's tables differ in size."""
    out = list(rows)
    for group in feature_groups(specs):
        if len(group) == 1:
            continue
        sizes = {specs[i].num_rows for i in group}
        if len(sizes) > 1:
            raise MisconfigurationException(
                f"hot/cold placement: tables {[specs[i].name for i in group]} share features but differ in size "
                f"({sorted(sizes)} rows); a feature's lookups are routed once, so its tables must have as many rows")
        union = torch.unique(torch.cat([rows[i] for i in group]))
        for i in group:
            out[i] = union
    return out


def hot_set_inside(hot_set: RowSet, placements: Any) -> bool:
    """Whether every row of ``hot_set`` is hot in the placements (features they do not place are ignored)."""
    for placement in placements:
        for table in placement.tables:
            for feature in table.spec.feature_names:
                if feature in hot_set.feature_names:
                    rows = hot_set.rows[hot_set.feature_names.index(feature)].long()
                    if rows.numel() and not bool(table.hot[rows].all()):
                        return False
    return True
