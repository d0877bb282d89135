"""What a run reports beside its speed, read from the parts it trained with, through their public attributes.

Each technique keeps its own counters (the skipper's inputs dropped, the hot/cold strategy's placements and
rebalances, the popularity DataModule's epoch statistics, DedupFactors' factors, the lookahead's rows moved); the
bench only reads them after the fit. Nothing here runs during a step.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_skew.dedup.factors import DedupFactors
from lightning_skew.hotcold.plain_callback import PlainHotColdPlacement
from lightning_skew.hotcold.strategy import HotColdStrategy
from lightning_skew.popularity.datamodule import PopularityDataModule
from lightning_skew.stale.skipper import StaleEmbeddingSkipper
from lightning_skew.tiers.prefetch import LookaheadPrefetch


def data_chain(datamodule: Any) -> Iterator[Any]:
    """``datamodule`` and every DataModule it wraps, outermost first."""
    seen = 0
    while datamodule is not None and seen < 16:
        yield datamodule
        datamodule = getattr(datamodule, "datamodule", None)
        seen += 1


def epoch_seconds(ends: list[float]) -> float:
    """Wall time of the steps that ended at ``ends``; the first step's start is not recorded, so that step is
    taken as long as the mean of the others."""
    return (ends[-1] - ends[0]) * len(ends) / max(len(ends) - 1, 1)


def read_inputs(trainer: pl.Trainer) -> list[int] | None:
    """Inputs read from the data for each step where a part drops inputs in the data pipeline (the repacking
    skipper's ``pulled_per_batch``), else ``None``: samples/s then counts the inputs read, dropped ones included."""
    for callback in trainer.callbacks:
        if isinstance(callback, StaleEmbeddingSkipper) and callback.repack:
            return list(callback.pulled_per_batch)
    return None


def _placement_extras(placements: dict[str, Any]) -> dict[str, float]:
    return {"hot_rows": float(sum(t.num_hot for p in placements.values() for t in p.tables)),
            "hot_mb": sum(p.hot_bytes for p in placements.values()) / 1e6}


def run_extras(trainer: pl.Trainer, ends: list[float]) -> dict[str, float]:
    """The figures the run's parts kept: popularity batching's profile time and hot-input share, the hot/cold
    placement and its rebalances, the skipper's drop and freeze shares, dedup factors, lookahead moves, and peak
    GPU memory on CUDA."""
    extras: dict[str, float] = {}
    epoch_s = epoch_seconds(ends) if ends else float("nan")
    for data in data_chain(trainer.datamodule):
        if isinstance(data, PopularityDataModule):
            profile = getattr(getattr(data, "hot_rows_source", None), "profile", None)
            if profile is not None:
                extras.update(profile_s=profile.seconds, profile_share_of_epoch=profile.seconds / epoch_s)
            stats = data.epoch_stats.get(0)
            extras["hot_input_share"] = stats.hot_input_share if stats else float("nan")
    strategy = trainer.strategy
    if isinstance(strategy, HotColdStrategy):
        extras.update(_placement_extras(strategy.placements))
        extras["cold_skipped_steps"] = float(sum(c.skipped_cold for c in strategy.collections().values()))
        if strategy.rebalances:
            extras.update(rebalances=float(len(strategy.rebalances)),
                          rebalance_s=statistics.median(r["rebalance_seconds"] for r in strategy.rebalances),
                          rows_moved=statistics.median(r["rows_moved"] for r in strategy.rebalances))
    steps = max(len(ends), 1)
    for callback in trainer.callbacks:
        if isinstance(callback, PlainHotColdPlacement):
            extras.update(_placement_extras(callback.placements))
        elif isinstance(callback, StaleEmbeddingSkipper):
            extras.update(drop_share=callback.inputs_dropped / max(callback.inputs_seen, 1),
                          frozen_share=callback.lookups_frozen / max(callback.lookups_seen, 1),
                          stale_rows=float(len(callback.stale)) if callback.stale is not None else 0.0,
                          reactivated=float(callback.reactivated), threshold=callback.threshold,
                          skipper_share_of_run=callback.seconds / epoch_s)
        elif isinstance(callback, DedupFactors):
            extras.update(callback.factors())
        elif isinstance(callback, LookaheadPrefetch):
            extras["rows_moved_per_step"] = callback.rows_moved / steps
    if strategy.root_device.type == "cuda":
        extras["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
    return extras
