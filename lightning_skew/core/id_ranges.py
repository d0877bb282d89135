"""Sparse IDs outside their tables: found on the host before a batch moves (one vectorized comparison against the
tables the model holds), refused with the feature, table, size and ID named, or clamped on request."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.decisions import frozen_lookups
from lightning_skew.core.tables import TableSize, table_sizes

__all__ = ["OUT_OF_RANGE_POLICIES", "OutOfRangeIds", "TableBounds", "batch_source", "check_policy",
           "check_table_ids", "clamp_out_of_range", "find_out_of_range", "model_bounds", "out_of_range_error"]

#: What a batch with IDs outside their tables does: ``"error"`` refuses it, ``"clamp"`` maps them to row 0.
OUT_OF_RANGE_POLICIES: tuple[str, ...] = ("error", "clamp")

_NO_BOUND = torch.iinfo(torch.int64).max  # features no table looks up are not checked


@dataclass(frozen=True)
class OutOfRangeIds:
    """The IDs of one feature of a batch that fall outside its table ``[0, num_rows)``.

    Attributes:
        feature: The feature (KeyedJaggedTensor key).
        num_rows: Rows of its table.
        low: The smallest ID of the feature in the batch.
        high: The largest ID of the feature in the batch.
        count: How many of the feature's IDs lie outside the table.
        table: The table's name, where known (the model's table; the smallest when the feature feeds several).
    """

    feature: str
    num_rows: int
    low: int
    high: int
    count: int
    table: str | None = None

    @property
    def offending(self) -> list[int]:
        """The extreme offending IDs: the smallest when negative, the largest when past the table."""
        return [x for x, bad in ((self.low, self.low < 0), (self.high, self.high >= self.num_rows)) if bad]

    def describe(self) -> str:
        ids = " and ".join(str(x) for x in self.offending)
        table = "" if self.table is None else f"; table {self.table!r}"
        return (f"feature {self.feature!r} has ID {ids} outside its table of {self.num_rows} rows "
                f"[0, {self.num_rows}) ({self.count} such IDs in this batch{table})")


def check_policy(policy: str) -> str:
    if policy not in OUT_OF_RANGE_POLICIES:
        raise ValueError(f"out_of_range_ids must be one of {OUT_OF_RANGE_POLICIES}, got {policy!r}")
    return policy


def _offsets(lengths: Sequence[int]) -> list[int]:
    return [0, *accumulate(lengths)][:-1]


class TableBounds:
    """Per feature, the table its IDs must fit: ``{feature: (table name or None, rows)}``.

    :meth:`find` checks a whole ``KeyedJaggedTensor`` with one comparison of its values against a per-lookup bound
    (the last row of the feature's table repeated ``length_per_key`` times, kept while the keys and lengths repeat,
    as in one-hot batches): no per-feature loop unless something is out of range. It runs on host tensors only: a batch
    already on an accelerator is not checked (reading the answer would make the host wait for the device).

    Args:
        tables: per feature, ``(table, rows)``.
    """

    def __init__(self, tables: Mapping[str, tuple[str | None, int]]) -> None:
        self.tables = dict(tables)
        self._bound_key: tuple[tuple[str, ...], tuple[int, ...]] | None = None
        self._bound: Tensor | None = None
        self._last_checked: KeyedJaggedTensor | None = None  # the last KJT found clean (checked once per batch)

    @classmethod
    def of_tables(cls, tables: Sequence[TableSize]) -> TableBounds:
        """Bounds from table shapes; a feature that feeds several tables must fit the smallest."""
        bounds: dict[str, tuple[str | None, int]] = {}
        for table in tables:
            for feature in table.features:
                if feature not in bounds or table.num_rows < bounds[feature][1]:
                    bounds[feature] = (table.name, table.num_rows)
        return cls(bounds)

    def __bool__(self) -> bool:
        return bool(self.tables)

    def _per_lookup_bound(self, keys: Sequence[str], lengths: Sequence[int]) -> Tensor:
        """Per lookup, the last row of its feature's table."""
        key = (tuple(keys), tuple(lengths))
        if key != self._bound_key or self._bound is None:
            sizes = torch.tensor([self.tables.get(k, (None, _NO_BOUND))[1] for k in keys], dtype=torch.int64)
            self._bound = torch.repeat_interleave(sizes - 1, torch.tensor(lengths, dtype=torch.int64))
            self._bound_key = key
        return self._bound

    def find(self, sparse: KeyedJaggedTensor) -> list[OutOfRangeIds]:
        """Every feature of ``sparse`` whose IDs leave its table (``[]`` when all fit, or on a non-host batch)."""
        values = sparse.values()
        if values.numel() == 0 or values.device.type != "cpu" or not self.tables:
            return []
        keys, lengths = sparse.keys(), sparse.length_per_key()
        last_row = self._per_lookup_bound(keys, lengths)
        # An ID lies in [0, rows) exactly when both it and (rows - 1 - ID) are >= 0: one sign test of their OR.
        if int(torch.bitwise_or(values, last_row - values).min()) >= 0:
            return []
        found = []
        for key, offset, length in zip(keys, _offsets(lengths), lengths, strict=True):
            if key not in self.tables or length == 0:
                continue
            table, size = self.tables[key]
            ids = values[offset: offset + length]
            bad = (ids < 0) | (ids >= size)
            if bool(bad.any()):
                found.append(OutOfRangeIds(key, size, int(ids.min()), int(ids.max()), int(bad.sum()), table))
        return found

    def check(self, batch: Any, where: str | Callable[[], str], policy: str = "error",
              on_clamp: Callable[[list[OutOfRangeIds]], None] | None = None) -> Any:
        """``batch`` when the IDs of its ``sparse_features`` (and frozen lookups, if any) fit their tables; else a
        ``ValueError`` naming ``where`` and every offending feature, or (``policy="clamp"``) a copy with those IDs on
        row 0, ``on_clamp`` told what was found. A batch found clean once is not checked again."""
        sparse = getattr(batch, "sparse_features", None)
        if not isinstance(sparse, KeyedJaggedTensor) or sparse is self._last_checked:
            return batch
        found = self.find(sparse)
        frozen = frozen_lookups(batch)
        frozen_found = self.find(frozen) if isinstance(frozen, KeyedJaggedTensor) else []
        if found or frozen_found:
            if policy == "error":
                raise out_of_range_error(found + frozen_found, where() if callable(where) else where)
            if on_clamp is not None:
                on_clamp(found + frozen_found)
            changes: dict[str, Any] = {"sparse_features": clamp_out_of_range(sparse, found)}
            if frozen_found:
                changes["frozen_sparse"] = clamp_out_of_range(frozen, frozen_found)
            batch = dataclasses.replace(batch, **changes)
        self._last_checked = batch.sparse_features
        return batch


def find_out_of_range(sparse: KeyedJaggedTensor, num_rows: Mapping[str, int]) -> list[OutOfRangeIds]:
    """Every feature of ``sparse`` listed in ``num_rows`` whose IDs leave ``[0, num_rows[feature])``; features
    ``num_rows`` does not list are not checked."""
    return TableBounds({k: (None, int(v)) for k, v in num_rows.items()}).find(sparse)


def clamp_out_of_range(sparse: KeyedJaggedTensor, found: list[OutOfRangeIds]) -> KeyedJaggedTensor:
    """A copy of ``sparse`` whose IDs outside their tables (as :func:`find_out_of_range` found them) are row 0,
    as FBGEMM's bounds check does; lengths, weights and strides are kept. ``sparse`` itself is not changed."""
    if not found:
        return sparse
    keys, lengths = sparse.keys(), sparse.length_per_key()
    offsets = _offsets(lengths)
    values = sparse.values().clone()
    position = {key: i for i, key in enumerate(keys)}
    for bad in found:
        i = position[bad.feature]
        ids = values[offsets[i]: offsets[i] + lengths[i]]
        ids[(ids < 0) | (ids >= bad.num_rows)] = 0
    variable = sparse.variable_stride_per_key()
    return KeyedJaggedTensor(
        keys=keys, values=values, weights=sparse.weights_or_none(), lengths=sparse.lengths(),
        offsets=sparse.offsets_or_none(), stride=None if variable else sparse.stride(),
        stride_per_key_per_rank=sparse.stride_per_key_per_rank() if variable else None,
        length_per_key=lengths,
    )


def out_of_range_error(found: list[OutOfRangeIds], where: str) -> ValueError:
    """The error a refused batch raises: every offending feature, its table, size and IDs, and what to do."""
    return ValueError(
        f"{where}: {'; '.join(bad.describe() for bad in found)}. Embedding kernels would not stop on them "
        "(FBGEMM maps each such ID to row 0 and trains on), so the batch is refused. Fix the data, or the model's "
        "table sizes (e.g. num_embeddings_per_feature), or with a lightning-skew DataModule set "
        "out_of_range_ids='clamp' (data.init_args.out_of_range_ids: clamp) to map such IDs to row 0, counted and "
        "logged."
    )


# One TableBounds per model, shared by whoever checks its batches (strategy, DataModule, model hook), so that a
# batch is compared once. Weak keys: a model that is dropped takes its bounds with it.
_BOUNDS: weakref.WeakKeyDictionary[nn.Module, TableBounds] = weakref.WeakKeyDictionary()


def model_bounds(module: nn.Module, refresh: bool = False) -> TableBounds:
    """The :class:`TableBounds` of the tables ``module`` holds (:func:`~lightning_skew.core.tables.table_sizes`),
    found once per module (``refresh``: find them again, e.g. once the module's tables are built or re-laid out)."""
    bounds = _BOUNDS.get(module)
    if not bounds or refresh:  # (a module without tables yet may build them later, in configure_model)
        bounds = _BOUNDS[module] = TableBounds.of_tables(table_sizes(module))
    return bounds


def batch_source(trainer: Any) -> str:
    """Where a Trainer's current batch came from, for error messages: the DataModule (and the data it wraps) and
    the stage."""
    datamodule = getattr(trainer, "datamodule", None)
    name = "the dataloader" if datamodule is None else type(datamodule).__name__
    inner = getattr(datamodule, "unwrapped", datamodule)
    if inner is not datamodule:
        name += f" around {type(inner).__name__}"
    stage = getattr(getattr(trainer, "state", None), "stage", None)
    return name + (f" ({stage.value} batch)" if stage is not None else "")


def check_table_ids(module: nn.Module, batch: Any, where: str | None = None) -> Any:
    """Refuse ``batch`` when an ID of its ``sparse_features`` lies outside the table of ``module`` it looks up
    (``ValueError`` naming the feature, table, size and ID); else return it. Host-side: call it before the batch
    moves, e.g. in your LightningModule's ``on_before_batch_transfer`` under a strategy of your own (lightning-skew's
    strategies, DataModules and ``DLRMModule`` call it already)."""
    try:
        trainer = module.trainer if isinstance(module, pl.LightningModule) else None
    except RuntimeError:  # not attached to a Trainer
        trainer = None
    return model_bounds(module).check(batch, where if where is not None else (lambda: batch_source(trainer)))
