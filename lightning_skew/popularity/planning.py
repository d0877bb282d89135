"""Planning one epoch of popularity batches from the inner stream, the same on every rank (one small exchange
per window or batch): the regrouped schedules (fae, interleave) and stitched batches (Hotline)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from lightning_skew.core.batch import Batch, concat_batches, select_inputs, slice_inputs
from lightning_skew.core.distributed import all_gather_ints, all_reduce_sum
from lightning_skew.core.lookups import hot_input_mask
from lightning_skew.core.rowsets import RowSet
from lightning_skew.popularity.schedules import (
    EpochStats,
    PopularityBatch,
    fae_order,
    interleave_order,
    stitch_batch,
    window_generator,
)

__all__ = ["STITCH_AGREEMENT_BATCHES", "Lookahead", "plan_regrouped", "plan_stitched"]

#: One planned batch: how to make it (lazily), and whether it is the epoch's last.
Planned = tuple[Callable[[], PopularityBatch], bool]


class Lookahead:
    """An iterator that knows whether it has another item (one item read ahead)."""

    _END = object()

    def __init__(self, items: Iterable[Any]) -> None:
        self._items = iter(items)
        self._next = next(self._items, self._END)

    @property
    def exhausted(self) -> bool:
        return self._next is self._END

    def take(self, count: int | None) -> list[Any]:
        """Up to ``count`` items (all that are left when ``None``)."""
        taken: list[Any] = []
        while self._next is not self._END and (count is None or len(taken) < count):
            taken.append(self._next)
            self._next = next(self._items, self._END)
        return taken



class _Arranged:
    """A window's inputs reordered by ``order``, built on first use (a resumed epoch skips whole windows unbuilt)."""

    def __init__(self, joined: Batch, order: torch.Tensor) -> None:
        self._joined: Batch | None = joined
        self._order = order
        self._batch: Batch | None = None

    def inputs(self, start: int, stop: int) -> Batch:
        if self._batch is None:
            assert self._joined is not None
            self._batch = select_inputs(self._joined, self._order)
            self._joined = None  # the reordered copy replaces it
        return slice_inputs(self._batch, start, stop)


#: Inner batches ``stitch`` reads ahead to agree on their ``is_hot`` over the ranks in one exchange.
STITCH_AGREEMENT_BATCHES = 32


def plan_stitched(inner: Lookahead, hot_rows: RowSet, stats: EpochStats,
                  agree_every: int = STITCH_AGREEMENT_BATCHES) -> Iterator[Planned]:
    local = torch.zeros(2, dtype=torch.int64)  # hot inputs, inputs: summed over ranks once, at the end
    while not inner.exhausted:
        window = inner.take(agree_every)
        masks = [hot_input_mask(batch.sparse_features, hot_rows) for batch in window]
        counts = [int(mask.sum()) for mask in masks]
        whole = [count == mask.numel() for count, mask in zip(counts, masks, strict=True)]
        local += torch.tensor([sum(counts), sum(mask.numel() for mask in masks)])
        stats.hot_batches += sum(whole)
        stats.cold_batches += len(whole) - sum(whole)
        if inner.exhausted:
            stats.hot_inputs, stats.inputs = (int(v) for v in all_reduce_sum(local))
        # A step may leave the cold rows out only when every rank's batch is hot: the window's flags are agreed in
        # one exchange (padded: a rank with fewer batches left counts as cold for the rest).
        agreed = all_gather_ints([int(w) for w in whole] + [0] * (agree_every - len(whole))).min(0).values
        for i, (batch, mask) in enumerate(zip(window, masks, strict=True)):
            yield (lambda batch=batch, mask=mask, all_hot=bool(agreed[i]): stitch_batch(batch, mask, hot_rows,
                                                                                        all_hot)), \
                inner.exhausted and i == len(window) - 1


def plan_regrouped(inner: Lookahead, hot_rows: RowSet, stats: EpochStats, epoch: int, schedule: str,
                   batch_size: int | None, window_batches: int | None, shuffle: bool, seed: int) -> Iterator[Planned]:
    window_index = 0
    more = True
    while more:
        window = inner.take(window_batches)
        joined = concat_batches(window) if window else None
        mask = torch.zeros(0, dtype=torch.bool) if joined is None else hot_input_mask(joined.sparse_features,
                                                                                      hot_rows)
        first = int(window[0].labels.numel()) if window else 0
        counts = all_gather_ints([int(mask.sum()), mask.numel(), first, int(not inner.exhausted)])
        more = bool(counts[:, 3].any())  # some rank has inputs left: every rank reads another window
        if int(counts[:, 1].max()) == 0:
            return
        if batch_size is None:
            batch_size = int(counts[:, 2].max())
        min_hot, kept = int(counts[:, 0].min()), int(counts[:, 1].min())
        num_hot = min_hot // batch_size
        num_cold = math.ceil((kept - num_hot * batch_size) / batch_size)
        stats.inputs += int(counts[:, 1].sum())
        stats.hot_inputs += int(counts[:, 0].sum())
        stats.hot_inputs_in_cold_batches += int(counts[:, 0].sum()) - num_hot * batch_size * len(counts)
        stats.inputs_dropped += int(counts[:, 1].sum()) - kept * len(counts)
        stats.hot_batches += num_hot
        stats.cold_batches += num_cold
        # The order is drawn first: it must match on every rank; the shuffles after it need not.
        generator = window_generator(seed, epoch, window_index)
        if schedule == "fae":
            order = fae_order(num_hot, num_cold)
        else:
            order = interleave_order(num_hot, num_cold, generator if shuffle else None)
        hot_index = torch.nonzero(mask).flatten()
        cold_index = torch.nonzero(~mask).flatten()
        if shuffle:
            hot_index = hot_index[torch.randperm(hot_index.numel(), generator=generator)]
        pool = torch.cat([cold_index, hot_index[num_hot * batch_size:]])  # cold inputs and surplus hot ones
        if shuffle:
            pool = pool[torch.randperm(pool.numel(), generator=generator)]
        pool = pool[: kept - num_hot * batch_size]
        # The window's inputs in delivery order (hot batches' inputs, then the cold batches'), gathered once when
        # its first batch is made; every batch is then a contiguous slice of it (a gather per batch would read
        # the whole window's layout each time).
        arranged = _Arranged(joined, torch.cat([hot_index[: num_hot * batch_size], pool]))
        taken = {True: 0, False: 0}
        for step, is_hot in enumerate(order.tolist()):
            start = (0 if is_hot else num_hot * batch_size) + taken[is_hot] * batch_size
            stop = min(start + batch_size, num_hot * batch_size if is_hot else kept)
            taken[is_hot] += 1
            yield (lambda start=start, stop=stop, is_hot=is_hot, arranged=arranged: PopularityBatch.of(
                arranged.inputs(start, stop), is_hot=is_hot, num_hot=stop - start if is_hot else 0,
                hot_rows=hot_rows)), \
                not more and step == len(order) - 1
        window_index += 1
