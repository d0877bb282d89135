"""Popularity schedules (pure): the order of hot and cold batches, stitched batches, and what an epoch did."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_skew.core.batch import Batch, select_inputs
from lightning_skew.core.decisions import SkewBatch
from lightning_skew.core.hashing import mix_seed
from lightning_skew.core.rowsets import RowSet

__all__ = ["SCHEDULES", "EpochStats", "PopularityBatch", "fae_order", "interleave_order", "stitch_batch",
           "window_generator"]

SCHEDULES: tuple[str, ...] = ("fae", "interleave", "stitch")

#: The batch popularity batching delivers (the shared batch type: it says whether it is hot).
PopularityBatch = SkewBatch


@dataclass
class EpochStats:
    """What popularity batching did in one epoch (all ranks together; batches are per rank, equal on all)."""

    epoch: int
    inputs: int = 0  # inputs read from the inner loader, summed over ranks
    hot_inputs: int = 0  # of those, inputs whose every lookup hits a hot row
    hot_batches: int = 0
    cold_batches: int = 0
    hot_inputs_in_cold_batches: int = 0  # hot inputs that did not fill a hot batch on every rank
    inputs_dropped: int = 0  # read but not delivered: ranks read unequal numbers of inputs
    hot_rows: int = 0  # size of the hot set in force

    @property
    def hot_input_share(self) -> float:
        return self.hot_inputs / self.inputs if self.inputs else 0.0

    def metrics(self, prefix: str = "popularity/") -> dict[str, float]:
        values = {name: float(value) for name, value in asdict(self).items() if name != "epoch"}
        values["hot_input_share"] = self.hot_input_share
        return {f"{prefix}{name}": value for name, value in values.items()}


def fae_order(num_hot: int, num_cold: int) -> Tensor:
    """FAE's schedule as ``is_hot`` per step: all cold batches, then all hot batches."""
    return torch.cat([torch.zeros(num_cold, dtype=torch.bool), torch.ones(num_hot, dtype=torch.bool)])


def interleave_order(num_hot: int, num_cold: int, generator: torch.Generator | None = None) -> Tensor:
    """Hot batches spread evenly among cold ones: hot batch ``k`` at step ``floor((k + u) T / H)``.

    ``T = H + C`` and ``u`` in ``[0, 1)`` is drawn from ``generator`` (0 without one), so any ``L``
    consecutive steps hold ``L H / T`` hot batches, give or take one.
    """
    total = num_hot + num_cold
    order = torch.zeros(total, dtype=torch.bool)
    if num_hot:
        phase = float(torch.rand((), generator=generator, dtype=torch.float64)) if generator is not None else 0.0
        steps = torch.floor((torch.arange(num_hot, dtype=torch.float64) + phase) * total / num_hot).long()
        order[steps.clamp(max=total - 1)] = True
    return order


def stitch_batch(batch: Batch, hot_mask: Tensor, hot_rows: RowSet | None = None,
                 all_hot: bool | None = None) -> PopularityBatch:
    """One mini-batch reordered hot inputs first (Hotline): ``num_hot`` is the split point.

    ``all_hot`` says whether the batch is hot on every rank (default: this batch's inputs are all hot).
    """
    order = torch.cat([torch.nonzero(hot_mask).flatten(), torch.nonzero(~hot_mask).flatten()])
    num_hot = int(hot_mask.sum())
    is_hot = num_hot == hot_mask.numel() if all_hot is None else all_hot
    return PopularityBatch.of(select_inputs(batch, order), is_hot=is_hot, num_hot=num_hot, hot_rows=hot_rows)


def window_generator(seed: int, epoch: int, window: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, epoch, window))
