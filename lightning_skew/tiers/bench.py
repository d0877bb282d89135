"""``lightning-skew bench`` variant of Bagpipe's lookahead on the plain-PyTorch GPU path (needs CUDA)."""

from __future__ import annotations

from lightning_skew.bench.helpers import HOT_COLD_BUDGET_BYTES, gpu_peak, profiled_hot_rows, reset_gpu_peak
from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.hotcold.plain import place_hot_cold
from lightning_skew.tiers.prefetch import LookaheadDataModule, LookaheadPrefetch

#: Batches each step looks ahead (the tier simulator's default window).
LOOKAHEAD_WINDOW = 64


def fit_with_lookahead_prefetch(recipe: Recipe, accelerator: str = "gpu", window: int = LOOKAHEAD_WINDOW
                                ) -> TrainedRun:
    """As ``gpu_hotcold_plain`` (hot rows in GPU memory with plain PyTorch embedding bags, cold rows in host
    memory, the hot/cold variants' 8 MB hot set), with the data wrapped in :class:`LookaheadDataModule` and
    :class:`LookaheadPrefetch` moving each step's cold rows into the hot shard before it runs. Extras: rows
    moved per step, peak GPU memory."""
    reset_gpu_peak(accelerator)  # first: a machine without CUDA fails before the profile
    place_hot_cold(recipe.model, profiled_hot_rows(recipe).hot_rows(recipe.datamodule), HOT_COLD_BUDGET_BYTES)
    prefetch = LookaheadPrefetch()
    data = LookaheadDataModule(recipe.datamodule, window=window)
    run = fit_with_lightning(Recipe(recipe.model, data, recipe.epochs), callbacks=[prefetch], strategy="auto",
                             accelerator=accelerator)
    steps = max(len(run.clock.ends), 1)
    run.extras = {"rows_moved_per_step": prefetch.rows_moved / steps, **gpu_peak(accelerator)}
    return run


register_variant("gpu_hotcold_plain_lookahead", "as gpu_hotcold_plain, with Bagpipe's lookahead: each step's cold "
                 f"rows moved into the GPU hot shard, looking {LOOKAHEAD_WINDOW} batches ahead")(
    fit_with_lookahead_prefetch)
