"""Deduplicated lookups: the distinct bags of some features of a batch, and which input each one serves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["DedupedLookups"]


@dataclass
class DedupedLookups:
    """The lookups of some features (``features``) sent once per distinct bag (RecD's inverse-indexed form).

    ``bags`` has every key of the batch's ``sparse_features`` and ``U`` inputs: input ``u`` holds one distinct
    combination of the bags of ``features`` and no lookup of the other keys. Input ``i`` of the batch is served by
    ``bags`` input ``inverse[i]``; the batch's own ``sparse_features`` holds empty bags for ``features``. So a model
    that pools ``bags`` (``[U, ...]``) and expands the rows of ``features`` with ``inverse`` (``index_select``)
    computes exactly what pooling the full batch computes, looking each distinct bag up once.

    ``merged`` (optional) serves both in one lookup: the batch's ``sparse_features`` with the bags of ``features``
    replaced by the distinct bags in inputs ``[0, U)`` and empty bags after, so a model pools it once and expands
    the rows of ``features`` with ``inverse``. Built with the batch in the data pipeline; it does not survive
    :meth:`select` or :meth:`concat` (a model then pools ``bags`` apart).

    Args:
        bags: the distinct bags (a KeyedJaggedTensor with all keys, ``U`` inputs).
        inverse: ``[batch_size]`` int64, the ``bags`` input that serves each input of the batch.
        features: the deduplicated keys (a subset of ``bags.keys()``).
        merged: the one-lookup form described above, or ``None``.
    """

    bags: KeyedJaggedTensor
    inverse: Tensor
    features: tuple[str, ...]
    merged: KeyedJaggedTensor | None = None

    @property
    def num_distinct(self) -> int:
        return self.bags.stride()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DedupedLookups:
        return DedupedLookups(self.bags.to(device, non_blocking=non_blocking),
                              self.inverse.to(device, non_blocking=non_blocking), self.features,
                              None if self.merged is None else self.merged.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DedupedLookups:
        return DedupedLookups(self.bags.pin(), self.inverse.pin_memory(), self.features,
                              None if self.merged is None else self.merged.pin())

    def select(self, index: Tensor) -> DedupedLookups:
        """The deduplicated lookups of inputs ``index`` of the batch (the bags stay: a bag no input uses any more
        gets no gradient, which leaves its rows as they are under the embedding optimizers TorchRec runs on CPU)."""
        return DedupedLookups(self.bags, self.inverse[index.to(self.inverse.device)], self.features)

    @staticmethod
    def concat(parts: Sequence[DedupedLookups]) -> DedupedLookups:
        """The deduplicated lookups of batches joined in order (all with the same keys and ``features``)."""
        from lightning_skew.core.batch import _concat_kjts

        features = parts[0].features
        if any(part.features != features for part in parts):
            raise ValueError(f"concat_batches: deduplicated features differ: {[p.features for p in parts]}")
        offsets = torch.tensor([0] + [part.bags.stride() for part in parts[:-1]]).cumsum(0).tolist()
        inverse = torch.cat([part.inverse + offset for part, offset in zip(parts, offsets, strict=True)])
        return DedupedLookups(_concat_kjts([part.bags for part in parts]), inverse, features)
