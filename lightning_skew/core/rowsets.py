"""Sets of embedding rows per feature (hot rows, stale rows) and how an input's lookups fall into them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["RowSet", "is_one_hot", "lookup_members", "lookups_in"]


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
    _joined: dict[tuple[str, ...], tuple[Tensor, Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

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

    def joined_masks(self, keys: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """For features in ``keys`` order: all their masks end to end, each feature's offset into that, and
        whether the set names the feature at all (cached per key order)."""
        if keys not in self._joined:
            known = torch.tensor([key in self.feature_names for key in keys], dtype=torch.bool)
            masks = [self.mask(key) for key in keys if key in self.feature_names] or [torch.zeros(1, dtype=torch.bool)]
            sizes = [self.mask(key).numel() if key in self.feature_names else 0 for key in keys]
            offsets = torch.cumsum(torch.tensor([0, *sizes[:-1]], dtype=torch.int64), 0)
            self._joined[keys] = (torch.cat(masks), offsets, known)
        return self._joined[keys]

    def __len__(self) -> int:
        """Member rows over all tables."""
        return sum(int(self.mask(name).sum()) for name in self.feature_names)


def is_one_hot(sparse: KeyedJaggedTensor) -> bool:
    """Whether every feature of every input has exactly one ID (Criteo's layout): a ``[features, batch]`` grid,
    on which the batch operations, lookup checks and hot/cold routing take a path without segments."""
    lengths = sparse.lengths()
    return sparse.values().numel() == lengths.numel() == len(sparse.keys()) * sparse.stride() \
        and bool((lengths == 1).all())


def lookup_members(sparse: KeyedJaggedTensor, rowset: RowSet) -> Tensor:
    """Per lookup of ``sparse`` (in the order of its values): whether it hits a row of ``rowset``.

    Features that ``rowset`` does not name hit nothing. One gather over all features' masks joined end to end.
    """
    keys = tuple(sparse.keys())
    joined, offsets, known = rowset.joined_masks(keys)
    counts = torch.tensor(sparse.length_per_key(), dtype=torch.int64)
    index = (sparse.values().long().cpu() + torch.repeat_interleave(offsets, counts)).clamp_(max=joined.numel() - 1)
    member = joined[index]
    if not bool(known.all()):
        member &= torch.repeat_interleave(known, counts)
    return member


def lookups_in(sparse: KeyedJaggedTensor, rowset: RowSet) -> tuple[Tensor, Tensor]:
    """Per input of the batch: how many of its lookups hit rows of ``rowset``, and how many lookups it has.

    Features of ``sparse`` that ``rowset`` does not name count as lookups outside the set. An input whose
    ``hits == lookups`` touches only member rows (a "hot input" when the set is the hot rows). One gather over
    all features' masks joined end to end, so the cost grows with the lookups, not the features.

    Returns:
        ``(hits, lookups)``, two int64 tensors of shape ``[batch_size]``.
    """
    keys = tuple(sparse.keys())
    batch_size = sparse.stride()
    lengths = sparse.lengths()
    joined, offsets, known = rowset.joined_masks(keys)
    if is_one_hot(sparse):
        # One ID per feature and input (one-hot features, as in Criteo): a [features, batch] grid, no segments.
        grid = sparse.values().long().view(len(keys), batch_size) + offsets[:, None]
        member = joined[grid.clamp_(max=joined.numel() - 1)]
        if not bool(known.all()):
            member &= known[:, None]
        return member.sum(0), torch.full((batch_size,), len(keys), dtype=torch.int64)
    lengths = lengths.long()
    lookups = lengths.view(len(keys), batch_size).sum(0)
    member = lookup_members(sparse, rowset)
    # Per (feature, input) segment sums of ``member`` from its running sum, then summed over features.
    ends = torch.cumsum(lengths, 0)
    running = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(member, 0, dtype=torch.int64)])
    hits = (running[ends] - running[ends - lengths]).view(len(keys), batch_size).sum(0)
    return hits, lookups
