"""Sparse IDs outside their tables: finding them in a batch (per-feature bounds), refusing or clamping them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["OUT_OF_RANGE_POLICIES", "OutOfRangeIds", "check_policy", "clamp_out_of_range", "find_out_of_range",
           "out_of_range_error"]

#: What a batch with IDs outside their tables does: ``"error"`` refuses it, ``"clamp"`` maps them to row 0.
OUT_OF_RANGE_POLICIES: tuple[str, ...] = ("error", "clamp")


@dataclass(frozen=True)
class OutOfRangeIds:
    """The IDs of one feature of a batch that fall outside its table ``[0, num_rows)``.

    Attributes:
        feature: The feature (KeyedJaggedTensor key).
        num_rows: Rows of its table.
        low: The smallest ID of the feature in the batch.
        high: The largest ID of the feature in the batch.
        count: How many of the feature's IDs lie outside the table.
    """

    feature: str
    num_rows: int
    low: int
    high: int
    count: int

    @property
    def offending(self) -> list[int]:
        """The extreme offending IDs: the smallest when negative, the largest when past the table."""
        return [x for x, bad in ((self.low, self.low < 0), (self.high, self.high >= self.num_rows)) if bad]

    def describe(self) -> str:
        ids = " and ".join(str(x) for x in self.offending)
        return (f"feature {self.feature!r} has ID {ids} outside its table of {self.num_rows} rows "
                f"[0, {self.num_rows}) ({self.count} such IDs in this batch)")


def check_policy(policy: str) -> str:
    if policy not in OUT_OF_RANGE_POLICIES:
        raise ValueError(f"out_of_range_ids must be one of {OUT_OF_RANGE_POLICIES}, got {policy!r}")
    return policy


def _offsets(lengths: list[int]) -> list[int]:
    return [0, *accumulate(lengths)][:-1]


def find_out_of_range(sparse: KeyedJaggedTensor, num_rows: Mapping[str, int]) -> list[OutOfRangeIds]:
    """Every feature of ``sparse`` listed in ``num_rows`` whose IDs leave ``[0, num_rows[feature])``.

    Cheap when all IDs are in range: one min/max per feature (a single reduction over a ``[features, n]``
    view when every feature has as many IDs, as in one-hot batches) and the transfer of those bounds to the
    host. Features ``num_rows`` does not list are not checked.
    """
    values = sparse.values()
    if values.numel() == 0:
        return []
    keys, lengths = sparse.keys(), sparse.length_per_key()
    if len(set(lengths)) == 1 and num_rows.keys() >= set(keys):
        checked = list(range(len(keys)))
        low, high = values.view(len(keys), lengths[0]).aminmax(dim=1)
    else:
        checked = [i for i, key in enumerate(keys) if key in num_rows and lengths[i] > 0]
        if not checked:
            return []
        offsets = _offsets(lengths)
        bounds = [values[offsets[i]: offsets[i] + lengths[i]].aminmax() for i in checked]
        low, high = torch.stack([b.min for b in bounds]), torch.stack([b.max for b in bounds])
    lows, highs = low.tolist(), high.tolist()
    found = []
    for i, lo, hi in zip(checked, lows, highs, strict=True):
        size = int(num_rows[keys[i]])
        if lo < 0 or hi >= size:
            offset = sum(lengths[:i])
            ids = values[offset: offset + lengths[i]]
            count = int(((ids < 0) | (ids >= size)).sum())
            found.append(OutOfRangeIds(keys[i], size, int(lo), int(hi), count))
    return found


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
    """The error a refused batch raises: every offending feature, its table size and IDs, and what to do."""
    return ValueError(
        f"{where}: {'; '.join(bad.describe() for bad in found)}. Embedding kernels would not stop on them "
        "(FBGEMM maps each such ID to row 0 and trains on), so the batch is refused. Fix the data, or the table "
        "sizes (num_embeddings_per_feature), or set out_of_range_ids='clamp' on the DataModule "
        "(data.init_args.out_of_range_ids: clamp) to map such IDs to row 0, counted and logged."
    )
