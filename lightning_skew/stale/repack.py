"""Repacking: filter a stream of batches and pack the kept inputs into full batches again.

Dropping inputs inside a step leaves a smaller batch, which a CPU or GPU runs less efficiently per input.
Dropping them in the data pipeline and refilling each batch from the following inputs keeps every step full,
so an epoch with a share ``d`` of its inputs dropped takes about ``1 - d`` of the steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torchrec.datasets.utils import Batch

from lightning_skew.popularity.datamodule import _gather_counts, concat_batches, select_inputs

__all__ = ["RepackedLoader", "repack_batches"]


def _size(batch: Batch) -> int:
    return int(batch.labels.shape[0])


def _pick(batch: Batch, index: Tensor | None) -> Batch:
    return batch if index is None else select_inputs(batch, index.to(batch.labels.device))


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
        if int(_gather_counts([held + count]).max()) < enough:
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
        yield concat_batches(pending), read
        pending, held, read = rest, count - min(room, count), 0
    if last is None:
        return
    while int(_gather_counts([held]).max()) > 0:
        if pending:  # at most one full batch is left after the loop
            yield concat_batches(pending), read
            pending, held = [], 0
        else:  # another rank still holds inputs: repeat this rank's last input read
            yield select_inputs(last, torch.tensor([_size(last) - 1], device=last.labels.device)), read
        read = 0


class RepackedLoader:
    """A training loader whose batches went through :func:`repack_batches` with a filter's ``kept_inputs``
    (and ``min_fill``).

    For each batch yielded it appends the number of inputs read from ``loader`` to ``filter.pulled_per_batch``,
    when the filter has that list. It has no length: how many batches an epoch holds depends on
    how many inputs are dropped, and Lightning ends the epoch when they run out.
    """

    def __init__(self, loader: Iterable[Batch], filter: Any, min_fill: float = 1.0) -> None:
        self.loader = loader
        self.filter = filter
        self.min_fill = min_fill

    def __iter__(self) -> Iterator[Batch]:
        reads = getattr(self.filter, "pulled_per_batch", None)
        for batch, read in repack_batches(self.loader, self.filter.kept_inputs, min_fill=self.min_fill):
            if reads is not None:
                reads.append(read)
            yield batch
