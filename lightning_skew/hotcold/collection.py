"""An EmbeddingBagCollection split into a hot and a cold collection by a :class:`~lightning_skew.hotcold.placement.Placement`.

:class:`HotColdEmbeddingBagCollection` takes the place of a TorchRec ``EmbeddingBagCollection`` inside any
model. It holds two ordinary collections, ``hot`` (the hot shards: tables that fit entirely, and the hot
rows of split tables, ``<table>__hot``) and ``cold`` (whole tables in row-ID order, ``<table>__cold``), which
TorchRec shards and places like any other (fast memory for ``hot``, host memory for ``cold``). Its forward
takes the model's ``KeyedJaggedTensor`` in the dataset's ID space, sends each lookup of a hot row to its hot
slot and every other lookup to the cold table unchanged, and sums the hot and cold pooled embeddings of each
feature, so the model sees exactly the output of the original collection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lightning_skew.core.decisions import hot_only_in_step, routed_in_step
from lightning_skew.core.tables import TablePart, WatchedTable
from lightning_skew.hotcold.placement import (
    COLD,
    HOT,
    SPLIT,
    Placement,
    TableSpec,
    hot_slots,
    merge_rows,
    split_rows,
)
from lightning_skew.hotcold.router import COLD_SUFFIX, HOT_SUFFIX, STACKED, STACKED_SUFFIX, LookupRouter
from lightning_skew.hotcold.routing import RoutedLookups, routed_lookups
from lightning_skew.torchrec.upstream import (
    apply_optimizer_in_backward,
    in_backward_optimizer_classes,
    in_backward_optimizer_kwargs,
)

__all__ = ["HOT_SUFFIX", "COLD_SUFFIX", "LAYOUTS", "STACKED_SUFFIX", "HotColdEmbeddingBagCollection", "table_specs"]

#: How a collection holds its parts (see :class:`HotColdEmbeddingBagCollection`).
LAYOUTS = ("separate", "fused", "stacked")
PARTS = (HOT, COLD, STACKED)


def table_specs(ebc: EmbeddingBagCollection) -> list[TableSpec]:
    """The tables of a collection as the placement sees them."""
    return [TableSpec(cfg.name, tuple(cfg.feature_names), cfg.num_embeddings, cfg.embedding_dim)
            for cfg in ebc.embedding_bag_configs()]


def _part_config(cfg: EmbeddingBagConfig, suffix: str, rows: int) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=cfg.name + suffix, embedding_dim=cfg.embedding_dim, num_embeddings=rows,
                              feature_names=[f + suffix for f in cfg.feature_names], data_type=cfg.data_type,
                              pooling=cfg.pooling, weight_init_max=cfg.weight_init_max,
                              weight_init_min=cfg.weight_init_min)


class HotColdEmbeddingBagCollection(nn.Module):
    """A TorchRec ``EmbeddingBagCollection`` re-laid out as a hot and a cold collection.

    Built from an existing collection (its weights and embedding optimizer carry over) and a placement of
    its tables. Each table ``t`` becomes ``t__hot`` in :attr:`hot`, ``t__cold`` in :attr:`cold`, or both when
    split. Only sum pooling is supported (a mean over a bag split in two parts is not the sum of the parts).

    ``layout`` says how the parts are held:

    * ``"separate"``: two collections, ``hot`` and ``cold`` (a hot-only step leaves ``cold`` out entirely).
    * ``"fused"``: both parts' tables in one collection, :attr:`parts` (``hot`` and ``cold`` are ``None``):
      TorchRec shards it as one module, so a step runs one input and one output distribution for both; the
      planner still places every inner table by its own constraints (hot tables in fast memory, cold ones in host
      memory: TorchRec groups the tables of one kernel together). A hot-only step sends the cold tables no lookup.
    * ``"stacked"``, for parts in the same memory: as ``"fused"``, but a split table is one inner table,
      ``t__hotcold``: its hot slots first, then the whole table by row ID (the cold shard) below them. A lookup
      goes to its slot or to ``num_hot + ID``; every feature stays one key, so no feature's pooled output needs
      its hot and cold sums added (the cost of the other layouts on a CPU).

    Attributes:
        skipped_cold: forwards that left :attr:`cold` out entirely, inside
            :func:`~lightning_skew.core.decisions.hot_only_step` (a batch whose lookups all hit hot rows on every
            rank; a sharded collection is a collective, so every rank must agree). A batch that looks up a cold row inside it is an error.
        counts: lookups per row of every table end to end (in table order) counted in training forwards
            when counting is on (see :meth:`start_counting`), for rebalancing.

    Args:
        ebc: the collection to replace (plain, not sharded yet).
        placement: the hot rows of each of its tables.
        layout: ``"separate"``, ``"fused"`` or ``"stacked"`` (above).
    """

    def __init__(self, ebc: EmbeddingBagCollection, placement: Placement, layout: str = "separate") -> None:
        super().__init__()
        configs = list(ebc.embedding_bag_configs())
        if [t.spec for t in placement.tables] != table_specs(ebc):
            raise ValueError("the placement describes other tables than the collection: "
                             f"{[t.spec.name for t in placement.tables]} vs {[c.name for c in configs]}")
        for cfg in configs:
            if cfg.pooling != PoolingType.SUM:
                raise ValueError(f"table {cfg.name!r} pools by {cfg.pooling.name}; hot/cold placement supports sum "
                                 "pooling only (a mean over a split bag is not the sum of its parts)")
        self._configs = configs
        self._is_weighted = ebc.is_weighted()
        self._embedding_names = [n for names in get_embedding_names_by_table(configs) for n in names]
        self._lengths_per_embedding = [cfg.embedding_dim for cfg in configs for _ in cfg.feature_names]
        self._column_offsets = dict(zip(self._embedding_names, _exclusive_cumsum(self._lengths_per_embedding),
                                        strict=True))
        self._total_dim = sum(self._lengths_per_embedding)
        self.placement = placement
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        weights = {cfg.name: ebc.embedding_bags[cfg.name].weight for cfg in configs}
        # The inner tables: (config, original table, part), hot ones first in the separate and fused layouts.
        inner: list[tuple[EmbeddingBagConfig, str, str]] = []
        for cfg, table in zip(configs, placement.tables, strict=True):
            if layout == "stacked" and table.kind == SPLIT:
                inner.append((_part_config(cfg, STACKED_SUFFIX, table.num_hot + cfg.num_embeddings), cfg.name, STACKED))
                continue
            if table.num_hot:
                inner.append((_part_config(cfg, HOT_SUFFIX, table.num_hot), cfg.name, HOT))
            if table.num_hot < cfg.num_embeddings:
                inner.append((_part_config(cfg, COLD_SUFFIX, cfg.num_embeddings), cfg.name, COLD))
        if layout != "stacked":  # hot tables first (the order the planner and the output follow)
            inner.sort(key=lambda entry: entry[2] != HOT)
        device = next(iter(weights.values())).device
        by_part = {part: [c for c, _, p in inner if p == part] for part in PARTS}
        self.parts = EmbeddingBagCollection([c for c, _, _ in inner], is_weighted=self._is_weighted,
                                            device=device) if layout != "separate" else None
        self.hot = EmbeddingBagCollection(by_part[HOT], is_weighted=self._is_weighted, device=device) \
            if by_part[HOT] and layout == "separate" else None
        self.cold = EmbeddingBagCollection(by_part[COLD], is_weighted=self._is_weighted, device=device) \
            if by_part[COLD] and layout == "separate" else None
        self._has_part = {part: bool(cfgs) for part, cfgs in by_part.items()}
        self._inner_tables = {c.name: (table, part) for c, table, part in inner}
        # Inner embedding name -> original embedding name (keys of the pooled output).
        self._original_name: dict[str, str] = {}
        by_table = dict(zip([c.name for c in configs], get_embedding_names_by_table(configs), strict=True))
        for (_, table, _), names in zip(inner, get_embedding_names_by_table([c for c, _, _ in inner]), strict=True):
            self._original_name.update(zip(names, by_table[table], strict=True))
        with torch.no_grad():
            for cfg in configs:
                for name, rows in self.split_table(cfg.name, weights[cfg.name].detach()).items():
                    self.holder(self._inner_tables[name][1]).embedding_bags[name].weight.copy_(rows)
        self._carry_optimizer(ebc)
        self.placement_version = 0  # bumped by every set_placement: lookups routed before it are stale
        self.routed_forwards = 0  # forwards that took lookups routed ahead of the step
        self.skipped_cold = 0  # forwards that left the cold collection out
        self.counts: Tensor | None = None
        self._counting = False
        self._set_routing(placement)

    # -- set-up -------------------------------------------------------------------------------------------

    def _carry_optimizer(self, ebc: EmbeddingBagCollection) -> None:
        """Give each part's table the embedding optimizer its original table carried (if any)."""
        for cfg in self._configs:
            original = ebc.embedding_bags[cfg.name].weight
            optimizer = self._part_optimizer(cfg.name, in_backward_optimizer_classes(original))
            if optimizer is None:
                continue
            for name, (table, part) in self._inner_tables.items():
                if table == cfg.name:
                    weight = self.holder(part).embedding_bags[name].weight
                    apply_optimizer_in_backward(optimizer, [weight], in_backward_optimizer_kwargs(original)[0])

    def part_attribute(self, part: str) -> str:
        """The attribute of this module whose collection holds ``part``'s (``hot``, ``cold`` or ``stacked``) inner
        tables: ``parts`` unless the layout is ``separate``, then the part's own name. State keys start with it."""
        return part if self.layout == "separate" else "parts"

    def holder(self, part: str) -> nn.Module | None:
        """The collection (sharded or not) holding ``part``'s inner tables; ``None`` when the part has none."""
        return getattr(self, self.part_attribute(part)) if self._has_part[part] else None

    def _part_optimizer(self, table: str, classes: list[type]) -> type | None:
        """The optimizer class a part of ``table`` gets from the ``classes`` its original carried (none: none)."""
        return classes[0] if classes else None

    def _set_routing(self, placement: Placement) -> None:
        #: the split of lookups between the parts, for the placement in force (:class:`LookupRouter`)
        self.router = LookupRouter(placement, stacked=self.layout == "stacked")
        self._columns: dict[tuple, tuple[int, Tensor] | None] = {}

    def set_placement(self, placement: Placement) -> None:
        """Route lookups by ``placement`` from now on. It must keep every table's hot row count (the shards'
        shapes); moving the rows' contents is the caller's job (see the strategy)."""
        if not placement.same_shapes(self.placement):
            raise ValueError("a new placement must keep each table's hot row count; re-shard to change it")
        self.router.move(self.placement, placement)
        self.placement = placement
        self.placement_version += 1

    def start_counting(self) -> None:
        """Count lookups per row in training forwards from now on (drops earlier counts)."""
        self._counting = True
        if self.counts is not None:
            self.counts.zero_()

    @property
    def counting(self) -> bool:
        """Whether training forwards count lookups (see :meth:`start_counting`)."""
        return self._counting

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The original collection's tables (the dataset's ID space)."""
        return list(self._configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    # -- forward ------------------------------------------------------------------------------------------

    def _count(self, index: Tensor) -> None:
        """Add one lookup to ``counts`` for each row in ``index`` (rows of all tables end to end)."""
        if self.counts is None:
            self.counts = torch.zeros(self.router.codes.numel(), dtype=torch.int64, device=index.device)
        elif self.counts.device != index.device:  # counts restored from a checkpoint
            self.counts = self.counts.to(index.device)
        self.counts.index_add_(0, index, torch.ones_like(index))

    def _output_columns(self, pooled: KeyedTensor) -> tuple[int, Tensor] | None:
        """Where a part's pooled values go in the output: ``None`` when they are all its columns in order (a part
        that holds every feature), else ``(width, index)``: the output seen as blocks of ``width`` columns, and the
        block of each of the part's blocks (whole features when every feature has one width; an index over
        blocks of several columns adds much faster than one over single columns)."""
        keys = tuple(pooled.keys())
        cache_key = (keys, pooled.values().device)
        if cache_key not in self._columns:
            starts = [self._column_offsets[self._original_name[key]] for key in keys]
            widths = pooled.length_per_key()
            if len(set(widths)) == 1 and all(start % widths[0] == 0 for start in starts) \
                    and self._total_dim % widths[0] == 0:
                width, index = widths[0], torch.tensor([start // widths[0] for start in starts])
            else:
                width = 1
                index = torch.cat([torch.arange(start, start + w) for start, w in zip(starts, widths, strict=True)])
            identity = index.numel() * width == self._total_dim and bool((index == torch.arange(index.numel())).all())
            self._columns[cache_key] = None if identity else (width, index.to(pooled.values().device))
        return self._columns[cache_key]

    def _pool(self, part: nn.Module, features: KeyedJaggedTensor) -> KeyedTensor:
        """One part's pooled embeddings of its lookups (the part's own collection, sharded or not)."""
        return part(features)

    def route(self, features: KeyedJaggedTensor) -> RoutedLookups:
        """``features`` split ahead of the step for the placement as it stands (:meth:`LookupRouter.route`, in the
        data pipeline): a forward inside :func:`~lightning_skew.core.decisions.routed_step` takes it without
        splitting (a GPU step then holds none of the split's host syncs)."""
        if self._counting:
            raise RuntimeError("lookups cannot be routed ahead while the collection counts them for rebalancing")
        return routed_lookups(self.router, features, self.placement_version)

    def _lookups(self, features: KeyedJaggedTensor) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor | None, Any]:
        """``(hot, cold, cold lookups)`` of the batch (stacked: the one KeyedJaggedTensor, ``None``, and the count,
        a tensor unless routed ahead), routed ahead or split here."""
        routed = routed_in_step(self, features)
        if routed is not None and routed.version == self.placement_version:
            self.routed_forwards += 1
            return routed.hot, routed.cold, routed.cold_lookups
        # Split here (counted when a training forward counts lookups for rebalancing).
        return self.router.route(features, self._count if self.training and self._counting else None)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        hot, cold, cold_lookups = self._lookups(features)
        hot_only = hot_only_in_step()
        if hot_only:
            if int(cold_lookups):  # (a host value unless the step had to route; then only in hot-only steps)
                raise RuntimeError(f"a batch marked hot looks up {int(cold_lookups)} cold rows; its hot set is not "
                                   "inside the placement's hot rows")
            self.skipped_cold += 1
        pooled = []
        if self.layout == "stacked":  # every feature one key: the pooled values are the output as they are
            pooled.append(self._pool(self.parts, hot))
        elif self.layout == "fused":
            # One lookup of both parts' tables: the two KeyedJaggedTensors hold other keys and the same batch, so
            # joined they are one after the other (a hot-only batch's cold bags are all empty).
            pooled.append(self._pool(self.parts, _join_keys(hot, cold)))
        else:
            if self.hot is not None:
                pooled.append(self._pool(self.hot, hot))
            if self.cold is not None and not hot_only:
                pooled.append(self._pool(self.cold, cold))
        values = None
        for part in pooled:
            part_values, placed = part.values(), self._output_columns(part)
            if placed is None:  # the part covers every output column in order: add it whole
                values = part_values if values is None else values + part_values
                continue
            if values is None:
                values = part_values.new_zeros((features.stride(), self._total_dim))
            width, index = placed
            batch_size = features.stride()
            values = values.view(batch_size, -1, width).index_add(
                1, index, part_values.view(batch_size, -1, width)).view(batch_size, self._total_dim)
        if values is None:  # every table cold and the cold part skipped
            values = torch.zeros((features.stride(), self._total_dim), device=features.values().device)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_embedding, values=values)

    # -- state in the dataset's ID space ------------------------------------------------------------------

    def watched_tables(self) -> list[WatchedTable]:
        """The original tables in row-ID order (see :func:`~lightning_skew.core.tables.watched_tables`): a hot
        row is read from its slot in :attr:`hot`, any other row from :attr:`cold`, as the placement stands now."""
        return [WatchedTable(cfg.name, list(cfg.feature_names), cfg.num_embeddings, cfg.embedding_dim,
                             lambda name=cfg.name: self._table_parts(name)) for cfg in self._configs]

    def _table_parts(self, table: str) -> list[TablePart]:
        placement = self.placement.table(table)
        slots = hot_slots(placement.hot_rows, placement.spec.num_rows)
        if table + STACKED_SUFFIX in self._inner_tables:  # slots first, then every row at its ID below them
            rows = torch.arange(placement.spec.num_rows)
            return [TablePart(self.parts, f"embedding_bags.{table}{STACKED_SUFFIX}.weight",
                              torch.where(slots >= 0, slots, placement.num_hot + rows))]
        parts = []
        if table + HOT_SUFFIX in self._inner_tables:
            parts.append(TablePart(self.holder(HOT), f"embedding_bags.{table}{HOT_SUFFIX}.weight", slots))
        if table + COLD_SUFFIX in self._inner_tables:
            rows = torch.arange(placement.spec.num_rows)
            parts.append(TablePart(self.holder(COLD), f"embedding_bags.{table}{COLD_SUFFIX}.weight",
                                   torch.where(slots >= 0, -1, rows)))
        return parts

    def inner_tables(self) -> dict[str, tuple[str, str]]:
        """Inner table name -> (original table, ``hot``, ``cold`` or ``stacked``)."""
        return dict(self._inner_tables)

    def row_homes(self, table: str) -> tuple[str, str, int]:
        """Where a split table's rows live: the inner table of its hot slots, the inner table of its cold shard,
        and the row at which the cold shard starts in it (``num_hot`` when stacked below the slots, else 0)."""
        if table + STACKED_SUFFIX in self._inner_tables:
            return table + STACKED_SUFFIX, table + STACKED_SUFFIX, self.placement.table(table).num_hot
        return table + HOT_SUFFIX, table + COLD_SUFFIX, 0

    def merge_table(self, table: str, hot_part: Tensor | None, cold_part: Tensor | None,
                    stacked: Tensor | None = None) -> Tensor:
        """A table's rows (weights or per-row optimizer state) in row-ID order, from its shard parts (or from its
        stacked inner table: the hot slots, then the cold shard)."""
        hot_rows = self.placement.table(table).hot_rows
        if stacked is not None:
            hot_part, cold_part = stacked[: hot_rows.numel()], stacked[hot_rows.numel():]
        return merge_rows(hot_part, cold_part, hot_rows)

    def split_table(self, table: str, full: Tensor) -> dict[str, Tensor]:
        """A table's rows in row-ID order as its parts: ``{inner table name: rows}``."""
        hot_part, cold_part = split_rows(full, self.placement.table(table).hot_rows)
        if table + STACKED_SUFFIX in self._inner_tables:
            return {table + STACKED_SUFFIX: torch.cat([hot_part, cold_part])}
        parts = {}
        if table + HOT_SUFFIX in self._inner_tables:
            parts[table + HOT_SUFFIX] = hot_part
        if table + COLD_SUFFIX in self._inner_tables:
            parts[table + COLD_SUFFIX] = cold_part
        return parts


def _join_keys(first: KeyedJaggedTensor, second: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The keys of ``first`` then those of ``second`` (the same batch, other keys) as one KeyedJaggedTensor."""
    weights = first.weights_or_none()
    return KeyedJaggedTensor(keys=first.keys() + second.keys(), values=torch.cat([first.values(), second.values()]),
                             lengths=torch.cat([first.lengths(), second.lengths()]),
                             weights=None if weights is None else torch.cat([weights, second.weights()]),
                             stride=first.stride())


def _exclusive_cumsum(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
