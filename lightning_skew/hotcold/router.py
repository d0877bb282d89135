"""Routing lookups to the hot and cold tables of a placement: which table, which row, and the two KeyedJaggedTensors.

:class:`LookupRouter` is the split of :class:`~lightning_skew.hotcold.collection.HotColdEmbeddingBagCollection`
without the module: a table of codes (each row's hot slot, or cold) and the features' tables, small and plain, so
the same split runs inside the collection's forward, in ``batch_to_device`` on the host, or in DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.rowsets import is_one_hot
from lightning_skew.hotcold.placement import COLD, HOT, SPLIT, Placement, hot_slots

__all__ = ["COLD_SUFFIX", "HOT_SUFFIX", "STACKED", "STACKED_SUFFIX", "LookupRouter"]

HOT_SUFFIX, COLD_SUFFIX, STACKED_SUFFIX = "__hot", "__cold", "__hotcold"
#: The part of a split table held as one inner table: its hot slots, then its cold shard below them.
STACKED = "stacked"


class LookupRouter:
    """Sends each lookup of a batch to its hot slot (a hot row) or to its own ID in the cold table (any other row),
    for one placement.

    Args:
        placement: the hot rows of each table of one collection.
        stacked: whether split tables are stacked (:meth:`stack`): their cold rows then sit below the hot slots.
    """

    def __init__(self, placement: Placement, stacked: bool = False) -> None:
        tables = placement.tables
        sizes = [t.spec.num_rows for t in tables]
        starts = torch.cumsum(torch.tensor([0, *sizes[:-1]], dtype=torch.int64), 0).tolist()
        self.table_offset = dict(zip([t.spec.name for t in tables], starts, strict=True))
        self.feature_table = {f: t.spec.name for t in tables for f in t.spec.feature_names}
        self.has_hot = {f: t.kind != COLD for t in tables for f in t.spec.feature_names}
        self.has_cold = {f: t.kind != HOT for t in tables for f in t.spec.feature_names}
        # Per row of every table end to end: its hot slot, or -1 (cold: the cold table holds it at its own ID).
        self.codes = torch.cat([hot_slots(t.hot_rows, t.spec.num_rows) for t in tables])
        # Stacked: each feature's one key, and where a cold row's ID starts in its table (below the hot slots).
        self.stacked = stacked
        self.stacked_key = {f: f + (STACKED_SUFFIX if t.kind == SPLIT else HOT_SUFFIX if t.kind == HOT else COLD_SUFFIX)
                            for t in tables for f in t.spec.feature_names} if stacked else {}
        self.cold_base = {f: t.num_hot if t.kind == SPLIT else 0 for t in tables for f in t.spec.feature_names}
        self._routes: dict[tuple, tuple] = {}
        self._stacks: dict[tuple, tuple] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_routes": {}, "_stacks": {}}  # per-device copies are rebuilt where it is used

    def move(self, old: Placement, new: Placement) -> None:
        """Follow a new placement with the same hot row counts: only the codes of rows whose slot changed are
        rewritten, in the codes and in their per-device copies."""
        changes = []
        for before, after in zip(old.tables, new.tables, strict=True):
            slots = torch.nonzero(before.hot_rows != after.hot_rows).flatten()
            if slots.numel():
                offset = self.table_offset[before.spec.name]
                changes.append((before.hot_rows[slots] + offset, after.hot_rows[slots] + offset, slots))
        codes = {id(self.codes): self.codes}
        codes.update({id(route[3]): route[3] for route in self._routes.values()})
        codes.update({id(stack[3]): stack[3] for stack in self._stacks.values()})
        for evicted, incoming, slots in changes:
            for tensor in codes.values():
                tensor[evicted.to(tensor.device)] = -1
                tensor[incoming.to(tensor.device)] = slots.to(tensor.device)

    def _check_features(self, keys: tuple[str, ...]) -> None:
        missing = [f for f in self.feature_table if f not in keys]
        if missing:
            raise KeyError(f"the batch lacks features {missing} of the hot/cold embedding collection")

    def _route(self, keys: tuple[str, ...], device: torch.device) -> tuple:
        cache_key = (keys, device)
        if cache_key not in self._routes:
            self._check_features(keys)
            known = torch.tensor([k in self.feature_table for k in keys], dtype=torch.bool)
            offsets = torch.tensor([self.table_offset[self.feature_table[k]] if k in self.feature_table else 0
                                    for k in keys], dtype=torch.int64)
            hot_index = [i for i, k in enumerate(keys) if self.has_hot.get(k, False)]
            cold_index = [i for i, k in enumerate(keys) if self.has_cold.get(k, False)]
            self._routes[cache_key] = (
                bool(known.all()), known.to(device), offsets.to(device),
                self.codes.to(device),
                torch.tensor(hot_index, dtype=torch.int64, device=device), [keys[i] + HOT_SUFFIX for i in hot_index],
                torch.tensor(cold_index, dtype=torch.int64, device=device),
                [keys[i] + COLD_SUFFIX for i in cold_index])
        return self._routes[cache_key]

    def split(self, features: KeyedJaggedTensor, count: Callable[[Tensor], None] | None = None
              ) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
        """The batch's lookups as ``(hot, cold)`` KeyedJaggedTensors of shard slots (features ``f__hot``,
        ``f__cold``), order within each bag kept. Features the placement does not hold are left out. ``count``, if
        given, is called with every lookup's row (tables end to end) of the features it holds."""
        keys = tuple(features.keys())
        values, lengths = features.values(), features.lengths()
        weights = features.weights_or_none()
        (all_known, known, offsets, codes, hot_index, hot_keys, cold_index,
         cold_keys) = self._route(keys, values.device)
        batch_size = features.stride()
        if all_known and is_one_hot(features):
            return self._split_one_hot(features, offsets, codes, hot_index, hot_keys, cold_index, cold_keys,
                                       count)
        per_key = lengths.view(len(keys), batch_size).sum(1)
        index = values.long() + torch.repeat_interleave(offsets, per_key, output_size=values.numel())
        if not all_known:
            member = torch.repeat_interleave(known, per_key, output_size=values.numel())
            index = torch.where(member, index, torch.zeros_like(index))
        code = codes[index]
        is_hot = code >= 0
        is_cold = ~is_hot if all_known else ~is_hot & member
        if not all_known:
            is_hot = is_hot & member
        if count is not None:
            count(index if all_known else index[member])
        # Hot lookups per (feature, input) bag: differences of the running count at the bag offsets. A bag of a
        # feature of this collection holds only known lookups, so its cold count is the rest.
        running = torch.cat([index.new_zeros(1), torch.cumsum(is_hot, 0)])
        bag_offsets = torch.cat([index.new_zeros(1), torch.cumsum(lengths.long(), 0)])  # torch only: no FBGEMM op
        hot_lengths = running[bag_offsets].diff().view(len(keys), batch_size)
        cold_lengths = lengths.view(len(keys), batch_size) - hot_lengths
        # A hot lookup goes to its slot in the hot shard, a cold one to its own ID in the cold table.
        hot = KeyedJaggedTensor(keys=hot_keys, values=code[is_hot],
                                lengths=hot_lengths.index_select(0, hot_index).flatten().to(lengths.dtype),
                                weights=None if weights is None else weights[is_hot], stride=batch_size)
        cold = KeyedJaggedTensor(keys=cold_keys, values=values.long()[is_cold],
                                 lengths=cold_lengths.index_select(0, cold_index).flatten().to(lengths.dtype),
                                 weights=None if weights is None else weights[is_cold], stride=batch_size)
        return hot, cold

    def _split_one_hot(self, features: KeyedJaggedTensor, offsets: Tensor, codes: Tensor, hot_index: Tensor,
                       hot_keys: list[str], cold_index: Tensor, cold_keys: list[str],
                       count: Callable[[Tensor], None] | None) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
        """:meth:`split` for one lookup per (feature, input), as in Criteo: a ``[features, batch]`` grid
        whose hot mask is itself the hot bags' lengths (no segment sums)."""
        values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
        batch_size = features.stride()
        grid = values.long().view(-1, batch_size)
        index = grid + offsets[:, None]
        code = codes[index]
        is_hot = code >= 0
        if count is not None:
            count(index.flatten())
        hot_mask, cold_mask = is_hot.flatten(), ~is_hot.flatten()
        hot_lengths = is_hot.to(lengths.dtype)
        # A hot lookup goes to its slot in the hot shard, a cold one to its own ID in the cold table.
        hot = KeyedJaggedTensor(keys=hot_keys, values=code.flatten()[hot_mask],
                                lengths=hot_lengths.index_select(0, hot_index).flatten(),
                                weights=None if weights is None else weights[hot_mask], stride=batch_size)
        cold = KeyedJaggedTensor(keys=cold_keys, values=grid.flatten()[cold_mask],
                                 lengths=(1 - hot_lengths).index_select(0, cold_index).flatten(),
                                 weights=None if weights is None else weights[cold_mask], stride=batch_size)
        return hot, cold

    def _stack_route(self, keys: tuple[str, ...], device: torch.device) -> tuple:
        cache_key = (keys, device)
        if cache_key not in self._stacks:
            self._check_features(keys)
            held = [i for i, k in enumerate(keys) if k in self.feature_table]
            offsets = torch.tensor([self.table_offset[self.feature_table[keys[i]]] for i in held], dtype=torch.int64)
            bases = torch.tensor([self.cold_base[keys[i]] for i in held], dtype=torch.int64)
            self._stacks[cache_key] = (len(held) == len(keys), held, offsets.to(device), self.codes.to(device),
                                       bases.to(device), [self.stacked_key[keys[i]] for i in held])
        return self._stacks[cache_key]

    def stack(self, features: KeyedJaggedTensor, count: Callable[[Tensor], None] | None = None
              ) -> tuple[KeyedJaggedTensor, Tensor]:
        """The batch's lookups for stacked split tables: every feature one key (``f__hotcold`` for a split table,
        ``f__hot`` or ``f__cold`` for a wholly hot or cold one), bags and weights as they are, each lookup of a hot
        row at its slot and of a cold row at ``num_hot + ID``; and how many lookups hit cold rows (a 0-dim
        tensor: nothing is read back). Features the placement does not hold are left out. ``count`` as in
        :meth:`split`."""
        all_held, held, offsets, codes, bases, stacked_keys = self._stack_route(tuple(features.keys()),
                                                                               features.values().device)
        if not all_held:
            features = features.permute(held)
        values, lengths = features.values(), features.lengths()
        if is_one_hot(features):  # a [features, batch] grid: per-feature offsets broadcast, no segments
            grid = values.long().view(len(held), -1)
            index, base = grid + offsets[:, None], bases[:, None].expand_as(grid)
        else:
            per_key = lengths.view(len(held), -1).sum(1)
            index = values.long() + torch.repeat_interleave(offsets, per_key, output_size=values.numel())
            base, grid = torch.repeat_interleave(bases, per_key, output_size=values.numel()), values.long()
        code = codes[index]
        if count is not None:
            count(index.flatten())
        cold = code < 0
        stacked = KeyedJaggedTensor(keys=stacked_keys, values=torch.where(cold, grid + base, code).flatten(),
                                    lengths=lengths, weights=features.weights_or_none(), stride=features.stride())
        return stacked, cold.sum()

    def route(self, features: KeyedJaggedTensor, count: Callable[[Tensor], None] | None = None
              ) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor | None, Tensor | int]:
        """The batch's lookups for this router's layout and how many hit cold rows: ``(stacked, None, cold lookups)``
        when split tables are stacked (:meth:`stack`; the count a 0-dim tensor), else ``(hot, cold, cold lookups)``
        (:meth:`split`)."""
        if self.stacked:
            stacked, cold_lookups = self.stack(features, count)
            return stacked, None, cold_lookups
        hot, cold = self.split(features, count)
        return hot, cold, cold.values().numel()
