"""Sets of embedding rows per feature (hot rows, stale rows) and how an input's lookups fall into them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["RowSet", "lookups_in"]


@dataclass(frozen=True)
class RowSet:
    """A set of rows of each feature's embedding table, in the dataset's own ID space.

    Args:
        feature_names: KeyedJaggedTensor keys, one table per feature.
        num_rows: rows of each feature's table.
        rows: per feature, the member row IDs (any order, no duplicates needed).
    """

    feature_names: list[str]
    num_rows: list[int]
    rows: list[Tensor]
    _masks: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.feature_names) == len(self.num_rows) == len(self.rows)):
            raise ValueError(f"RowSet needs one entry per feature: {len(self.feature_names)} names, "
                             f"{len(self.num_rows)} table sizes, {len(self.rows)} row lists")
        for name, size, members in zip(self.feature_names, self.num_rows, self.rows, strict=True):
            if members.numel() and (int(members.min()) < 0 or int(members.max()) >= size):
                raise ValueError(f"RowSet: feature {name!r} lists rows outside [0, {size})")

    @classmethod
    def from_masks(cls, feature_names: list[str], masks: list[Tensor]) -> RowSet:
        """Build from one boolean mask per feature (``True`` = member)."""
        return cls(list(feature_names), [m.numel() for m in masks],
                   [torch.nonzero(m, as_tuple=False).flatten() for m in masks])

    def mask(self, feature: str) -> Tensor:
        """Boolean membership of every row of ``feature``'s table (cached)."""
        if feature not in self._masks:
            index = self.feature_names.index(feature)
            mask = torch.zeros(self.num_rows[index], dtype=torch.bool)
            mask[self.rows[index].long()] = True
            self._masks[feature] = mask
        return self._masks[feature]

    def __len__(self) -> int:
        """Member rows over all tables."""
        return sum(int(self.mask(name).sum()) for name in self.feature_names)


def lookups_in(sparse: KeyedJaggedTensor, rowset: RowSet) -> tuple[Tensor, Tensor]:
    """Per input of the batch: how many of its lookups hit rows of ``rowset``, and how many lookups it has.

    Features of ``sparse`` that ``rowset`` does not name count as lookups outside the set. An input whose
    ``hits == lookups`` touches only member rows (a "hot input" when the set is the hot rows).

    Returns:
        ``(hits, lookups)``, two int64 tensors of shape ``[batch_size]``.
    """
    batch_size = sparse.stride()
    hits = torch.zeros(batch_size, dtype=torch.int64)
    lookups = torch.zeros(batch_size, dtype=torch.int64)
    for key, jagged in sparse.to_dict().items():
        lengths = jagged.lengths().long()
        owner = torch.repeat_interleave(torch.arange(batch_size), lengths)
        lookups += lengths
        if key in rowset.feature_names:
            member = rowset.mask(key)[jagged.values().long()]
            hits.index_add_(0, owner, member.long())
    return hits, lookups
