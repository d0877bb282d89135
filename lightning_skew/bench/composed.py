"""The ``all`` variant: popularity batching, hot/cold placement and stale skipping in one Trainer."""

from __future__ import annotations

from lightning_skew.bench.helpers import HOT_COLD_BUDGET_BYTES, gpu_peak, profiled_hot_rows, reset_gpu_peak
from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.hotcold.strategy import HotColdStrategy
from lightning_skew.popularity.datamodule import PopularityDataModule
from lightning_skew.stale.repack import RepackedDataModule
from lightning_skew.stale.skipper import StaleEmbeddingSkipper


def fit_with_everything(recipe: Recipe, accelerator: str = "cpu") -> TrainedRun:
    """Interleaved popularity batches, HotColdStrategy and repacked stale skipping in one Trainer, one hot-set
    source for all three. samples/s counts the inputs read; extras: the drop share, steps that skipped the cold
    part, and peak GPU memory on CUDA."""
    reset_gpu_peak(accelerator)  # first: a machine without CUDA fails before the profile
    source = profiled_hot_rows(recipe)
    skipper = StaleEmbeddingSkipper(hot_rows=source, evaluate_every_n_steps=100, target_drop_fraction=0.3,
                                    repack=True)
    data = RepackedDataModule(PopularityDataModule(recipe.datamodule, schedule="interleave", hot_rows=source))
    strategy = HotColdStrategy(budget_bytes=HOT_COLD_BUDGET_BYTES, hot_rows=source)
    run = fit_with_lightning(Recipe(recipe.model, data, recipe.epochs), callbacks=[skipper], strategy=strategy,
                             accelerator=accelerator)
    if len(skipper.pulled_per_batch) == len(run.clock.samples):
        run.clock.samples = skipper.pulled_per_batch  # samples/s counts the inputs read, dropped ones included
    run.extras = {"drop_share": skipper.inputs_dropped / max(skipper.inputs_seen, 1),
                  "cold_skipped_steps": float(sum(c.skipped_cold for c in strategy.collections().values())),
                  **gpu_peak(accelerator)}
    return run


register_variant("all", "interleaved popularity batches + HotColdStrategy + stale skipping (repack, 30%), "
                        "one hot-set source profiled once")(fit_with_everything)
register_variant("gpu_all", "as all, on the GPU: hot rows in GPU memory, cold rows in host memory (fused_uvm)")(
    lambda recipe: fit_with_everything(recipe, accelerator="gpu"))
