"""Repacking: filter a stream of batches and pack the kept inputs into full batches again.

Dropping inputs inside a step leaves a smaller batch, which a CPU or GPU runs less efficiently per input.
Dropping them in the data pipeline and refilling each batch from the following inputs keeps every step full,
so an epoch with a share ``d`` of its inputs dropped takes about ``1 - d`` of the steps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torchrec.datasets.utils import Batch

from lightning_skew.core.batch import concat_batches, select_inputs
from lightning_skew.core.decisions import SkewBatch
from lightning_skew.core.distributed import all_gather_ints
from lightning_skew.data.base import RecDataModule, WrappedDataModule

__all__ = ["RepackedDataModule", "RepackedLoader", "repack_batches"]


def _size(batch: Batch) -> int:
    return int(batch.labels.shape[0])


def _pick(batch: Batch, index: Tensor | None) -> Batch:
    return batch if index is None else select_inputs(batch, index.to(batch.labels.device))


def _hot(batch: Batch) -> bool:
    return isinstance(batch, SkewBatch) and batch.is_hot


def _agreed(batch: Batch, all_hot: bool) -> Batch:
    """``batch`` with ``is_hot`` as all ranks agreed (a rank's joined batch is hot only if every rank's is)."""
    if isinstance(batch, SkewBatch) and batch.is_hot and not all_hot:
        return SkewBatch.of(batch, False, batch.num_hot, batch.hot_rows)
    return batch


def repack_batches(batches: Iterable[Batch], keep: Callable[[Batch], Tensor | None],
                   batch_size: int | None = None, min_fill: float = 1.0) -> Iterator[tuple[Batch, int]]:
    """Yield ``(batch, inputs_read)``: the inputs that ``keep`` leaves of ``batches``, in order, packed into
    batches of ``batch_size`` (default: the first batch's size), each with the number of inputs read from
    ``batches`` since the previous one.

    ``keep(batch)`` returns the positions of the inputs to train (at least one), or ``None`` for all. Each
    input is copied at most once on its way (selected from the batch it came in, then joined with the others
    of its output batch). The last batch of the stream holds what is left (fewer inputs).

    ``min_fill`` (in (0, 1]): a batch is yielded as soon as it holds at least ``min_fill * batch_size`` inputs,
    so one that loses only a few inputs goes on as it is (a selection, or no copy at all when none was
    dropped) instead of being topped up from the next one. With ``1.0`` every batch but the last is full, and
    a single dropped input makes every later batch a join of two pieces; a little below 1 avoids that cost.

    Under a process group every rank yields the same number of batches, so steps stay in lockstep: all ranks
    yield when any rank holds enough (a rank with fewer kept inputs yields a smaller batch), and at the end
    each rank yields what it holds; a rank that holds nothing then repeats the last input it read (one input,
    so no rank runs an empty step). Collective: every rank must iterate, over the same number of batches.

    :class:`~lightning_skew.core.decisions.SkewBatch` decisions survive: a batch joined only from hot inputs stays
    hot when it is hot on every rank (agreed in the same exchange), else it is marked cold.
    """
    if not 0 < min_fill <= 1:
        raise ValueError(f"repack_batches: min_fill must lie in (0, 1], got {min_fill}")
    pending: list[Batch] = []  # kept inputs not yet yielded, in order
    held = 0
    enough = 0
    read = 0
    last: Batch | None = None
    for batch in batches:
        size = _size(batch)
        if size == 0:
            continue
        if batch_size is None:
            batch_size = size
        if batch_size < 1:
            raise ValueError(f"repack_batches: batch_size must be positive, got {batch_size}")
        enough = enough or max(1, math.ceil(min_fill * batch_size))
        read += size
        last = batch
        index = keep(batch)
        if index is not None and index.numel() == 0:
            raise ValueError("repack_batches: keep() returned no inputs; it must keep at least one")
        count = size if index is None else index.numel()
        hot = all(_hot(piece) for piece in pending) and _hot(batch)
        agreed = all_gather_ints([held + count, int(hot)])
        if int(agreed[:, 0].max()) < enough:
            pending.append(_pick(batch, index))
            held += count
            continue
        room = batch_size - held  # held <= batch_size; a rank short of a full batch yields what it has
        if room >= count:
            pending.append(_pick(batch, index))
            rest: list[Batch] = []
        else:
            index = torch.arange(size) if index is None else index
            if room:
                pending.append(select_inputs(batch, index[:room].to(batch.labels.device)))
            rest = [select_inputs(batch, index[room:].to(batch.labels.device))]
        yield _agreed(concat_batches(pending), bool(agreed[:, 1].min())), read
        pending, held, read = rest, count - min(room, count), 0
    if last is None:
        return
    while True:
        # A rank holding nothing repeats its last input: that input's batch decides its hotness.
        hot = all(_hot(piece) for piece in pending) if pending else _hot(last)
        agreed = all_gather_ints([held, int(hot)])
        if int(agreed[:, 0].max()) == 0:
            break
        if pending:  # at most one full batch is left after the loop
            out = concat_batches(pending)
            pending, held = [], 0
        else:  # another rank still holds inputs: repeat this rank's last input read
            out = select_inputs(last, torch.tensor([_size(last) - 1], device=last.labels.device))
        yield _agreed(out, bool(agreed[:, 1].min())), read
        read = 0


class RepackedLoader:
    """A training loader whose batches went through :func:`repack_batches` with ``skipper.kept_inputs``.

    Wrap any training loader with it (``trainer.fit(model, RepackedLoader(loader, skipper))``), or wrap a
    DataModule in :class:`RepackedDataModule`. For each batch yielded it tells the skipper how many inputs it
    read for it (``skipper.record_read``). It has no length: how many batches an epoch holds depends on how
    many inputs are dropped, and Lightning ends the epoch when they run out.

    Args:
        loader: the training loader (any iterable of torchrec Batches).
        skipper: the :class:`~lightning_skew.stale.skipper.StaleEmbeddingSkipper` that decides what to keep.
        min_fill: see :func:`repack_batches`; ``None`` takes the skipper's ``repack_min_fill``.
    """

    def __init__(self, loader: Iterable[Batch], skipper: Any, min_fill: float | None = None) -> None:
        self.loader = loader
        self.skipper = skipper
        self.min_fill = skipper.repack_min_fill if min_fill is None else min_fill
        # (inputs, loader batches) read for each batch yielded and not yet taken by a RepackedDataModule
        self.reads: deque[tuple[int, int]] = deque()
        self.track_reads = False

    def __iter__(self) -> Iterator[Batch]:
        counted = _Counted(self.loader)
        for batch, read in repack_batches(counted, self.skipper.kept_inputs, min_fill=self.min_fill):
            self.skipper.record_read(read)
            batches = counted.take()
            if self.track_reads:
                self.reads.append((read, batches))
            yield batch


class _Counted:
    """An iterable that counts the items it hands out since the last :meth:`take`."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = items
        self.count = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.count += 1
            yield item

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class RepackedDataModule(WrappedDataModule):
    """Wraps a :class:`~lightning_skew.data.base.RecDataModule` so that its training batches go through the
    trainer's :class:`~lightning_skew.stale.skipper.StaleEmbeddingSkipper` in the data pipeline: inputs on
    stale rows are left out and the kept ones packed into full batches (:class:`RepackedLoader`).

    The skipper is the one among ``trainer.callbacks`` (give it ``repack=True``); validation and test loaders,
    feature shapes and checkpoint state are the inner module's. The inner module is told how many of its
    batches each trained batch consumed (``on_before_batch_transfer`` once per inner batch), so a wrapped
    :class:`~lightning_skew.popularity.PopularityDataModule` keeps its position.

    Args:
        datamodule: the DataModule to wrap.
        min_fill: see :func:`repack_batches`; ``None`` takes the skipper's ``repack_min_fill``.

    Example (YAML)::

        data:
          class_path: lightning_skew.RepackedDataModule
          init_args:
            datamodule: {class_path: lightning_skew.SyntheticDataModule}
        trainer:
          callbacks: [{class_path: lightning_skew.StaleEmbeddingSkipper, init_args: {repack: true}}]
    """

    def __init__(self, datamodule: RecDataModule, min_fill: float | None = None) -> None:
        super().__init__(datamodule)
        if min_fill is not None and not 0 < min_fill <= 1:
            raise ValueError(f"RepackedDataModule: min_fill must lie in (0, 1], got {min_fill}")
        self.min_fill = min_fill
        self._loader: RepackedLoader | None = None

    def _skipper(self) -> Any:
        from lightning_skew.stale.skipper import StaleEmbeddingSkipper

        found = [c for c in (self.trainer.callbacks if self.trainer else []) if isinstance(c, StaleEmbeddingSkipper)]
        if len(found) != 1:
            raise RuntimeError(f"RepackedDataModule needs exactly one StaleEmbeddingSkipper among the trainer's "
                               f"callbacks to decide which inputs to keep; found {len(found)}")
        if not found[0].repack:
            raise RuntimeError("RepackedDataModule with StaleEmbeddingSkipper(repack=False): the skipper would drop "
                               "inputs a second time inside the step; give it repack=True")
        return found[0]

    def train_dataloader(self) -> RepackedLoader:
        self._loader = RepackedLoader(self.datamodule.train_dataloader(), self._skipper(), self.min_fill)
        self._loader.track_reads = True  # on_before_batch_transfer takes them
        return self._loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and self._loader is not None and self._loader.reads:
            _, inner_batches = self._loader.reads.popleft()
            for _ in range(inner_batches):  # counts each inner batch read; checks (or clamps) the IDs once
                batch = self.datamodule.on_before_batch_transfer(batch, dataloader_idx)
            return batch
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)
