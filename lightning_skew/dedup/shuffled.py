"""ShuffledWindows: the training inputs shuffled within windows of batches, sessions scattered (the order without
RecD), as a DataModule wrapper: the baseline that dedup is measured against."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lightning_skew.core.batch import Batch, concat_batches, select_inputs
from lightning_skew.data.base import WrappedDataModule

__all__ = ["ShuffledWindows"]


class _ShuffledLoader:
    def __init__(self, loader: Any, window: int, seed: int) -> None:
        self.loader, self.window, self.seed = loader, window, seed

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        pending: list[Batch] = []
        for index, batch in enumerate(self.loader):
            pending.append(batch)
            if len(pending) == self.window:
                yield from self._mixed(pending, index)
                pending = []
        if pending:
            yield from self._mixed(pending, -1)

    def _mixed(self, batches: list[Batch], index: int) -> Iterator[Batch]:
        joined = concat_batches(batches)
        order = torch.randperm(int(joined.labels.numel()), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + index))
        start = 0
        for batch in batches:
            size = int(batch.labels.numel())
            yield select_inputs(joined, order[start:start + size])
            start += size


class ShuffledWindows(WrappedDataModule):
    """The wrapped data's training inputs shuffled within windows of ``window`` batches: the same batch sizes and
    count, the inputs of a session scattered over the window (the order a user without RecD trains in).

    Deterministic (``seed`` and the window's position); validation and test data pass through unchanged.

    Args:
        datamodule: the data to shuffle (a lightning-skew ``RecDataModule``).
        window: batches whose inputs are mixed together (16 batches of 2048 hold about 32k inputs).
        seed: seed of the shuffles.
    """

    def __init__(self, datamodule: Any, window: int = 16, seed: int = 0) -> None:
        super().__init__(datamodule)
        if window < 1:
            raise ValueError(f"ShuffledWindows: window must be at least 1 batch, got {window}")
        self.window, self.seed = window, seed

    def train_dataloader(self) -> _ShuffledLoader:
        return _ShuffledLoader(self.datamodule.train_dataloader(), self.window, self.seed)
