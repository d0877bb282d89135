"""``lightning-skew bench`` variants of hot/cold placement: HotColdStrategy, the plain-PyTorch path, on CPU and GPU."""

from __future__ import annotations

from typing import Any

from lightning_skew.bench.helpers import HOT_COLD_BUDGET_BYTES, gpu_peak, profiled_hot_rows, reset_gpu_peak
from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.stats import median
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.hotcold.plain import place_hot_cold
from lightning_skew.hotcold.strategy import HotColdStrategy
from lightning_skew.popularity.datamodule import PopularityDataModule

# Hot rows get HOT_COLD_BUDGET_BYTES (the popularity variants' 8 MB). On CPU both parts live in host memory (the
# hot shard is compact); the gpu_* variants need CUDA and FBGEMM's CUDA build (gpu_hotcold_plain only CUDA).


def fit_with_hot_cold(recipe: Recipe, accelerator: str = "cpu", schedule: str | None = None,
                      **strategy_options: Any) -> TrainedRun:
    """Lightning with :class:`HotColdStrategy` (hot set from a 5% profile of the training batches at setup; with
    ``schedule``, the PopularityDataModule and the strategy share one source, profiled once). Extras: hot rows,
    hot bytes, the hot share of the profiled lookups where known, forwards that skipped the cold part, and peak
    GPU memory on CUDA."""
    datamodule = recipe.datamodule
    if schedule is not None:
        source = profiled_hot_rows(recipe)
        strategy_options.setdefault("hot_rows", source)
        datamodule = PopularityDataModule(datamodule, schedule=schedule, hot_rows=source)
    strategy = HotColdStrategy(budget_bytes=HOT_COLD_BUDGET_BYTES, **strategy_options)
    reset_gpu_peak(accelerator)
    run = fit_with_lightning(Recipe(recipe.model, datamodule, recipe.epochs), strategy=strategy,
                             accelerator=accelerator)
    placements = list(strategy.placements.values())
    run.extras = {"hot_rows": float(sum(t.num_hot for p in placements for t in p.tables)),
                  "hot_mb": sum(p.hot_bytes for p in placements) / 1e6,
                  "cold_skipped_steps": float(sum(c.skipped_cold for c in strategy.collections().values())),
                  **gpu_peak(accelerator)}
    if strategy.rebalances:
        run.extras.update(rebalances=float(len(strategy.rebalances)),
                          rebalance_s=median(r["rebalance_seconds"] for r in strategy.rebalances),
                          rows_moved=median(r["rows_moved"] for r in strategy.rebalances))
    return run


def fit_with_plain_hot_cold(recipe: Recipe, accelerator: str = "cpu") -> TrainedRun:
    """Lightning on one device without TorchRec sharding (``strategy="auto"``), the model placed by
    :func:`~lightning_skew.hotcold.plain.place_hot_cold`: hot rows with the model, cold rows in host
    memory, plain PyTorch embedding bags (the path for GPUs without FBGEMM's CUDA build). The hot set is the
    hot/cold variants' (5% profile, 8 MB), taken before the timed steps."""
    reset_gpu_peak(accelerator)  # first: a machine without CUDA fails before the profile
    placements = place_hot_cold(recipe.model, profiled_hot_rows(recipe).hot_rows(recipe.datamodule),
                                HOT_COLD_BUDGET_BYTES)
    run = fit_with_lightning(recipe, strategy="auto", accelerator=accelerator)
    run.extras = {"hot_rows": float(sum(t.num_hot for p in placements.values() for t in p.tables)),
                  "hot_mb": sum(p.hot_bytes for p in placements.values()) / 1e6, **gpu_peak(accelerator)}
    return run


register_variant("hotcold", "Lightning, HotColdStrategy: hot rows in a compact shard (CPU: both in host memory)")(
    fit_with_hot_cold)
register_variant("hotcold_rebalance", "as hotcold, rebalancing every 100 steps from the lookups counted")(
    lambda recipe: fit_with_hot_cold(recipe, rebalance_every_n_steps=100))
register_variant("hotcold_fae", "as hotcold, FAE batches: hot-only batches never touch the cold shard")(
    lambda recipe: fit_with_hot_cold(recipe, schedule="fae"))
register_variant("hotcold_plain", "Lightning without sharding, hot/cold split with plain PyTorch embedding bags "
                 "(CPU: both in host memory)")(fit_with_plain_hot_cold)
register_variant("gpu_hotcold", "GPU, HotColdStrategy: hot rows in GPU memory, cold in host memory (fused_uvm)")(
    lambda recipe: fit_with_hot_cold(recipe, accelerator="gpu"))
register_variant("gpu_hotcold_plain", "GPU without FBGEMM's CUDA build: hot rows in GPU memory (plain PyTorch "
                 "embedding bags), cold rows looked up in host memory")(
    lambda recipe: fit_with_plain_hot_cold(recipe, accelerator="gpu"))
register_variant("gpu_hotcold_fae", "as gpu_hotcold, FAE batches (hot batches stay in GPU memory)")(
    lambda recipe: fit_with_hot_cold(recipe, accelerator="gpu", schedule="fae"))
