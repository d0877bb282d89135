"""``lightning-skew bench`` variants of popularity batching: FAE's hot-only batches, interleaved, Hotline's stitch."""

from __future__ import annotations

from lightning_skew.bench.helpers import epoch_seconds, profiled_hot_rows
from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.popularity.datamodule import PopularityDataModule


def fit_with_popularity_batches(recipe: Recipe, schedule: str) -> TrainedRun:
    """One Lightning epoch on :class:`PopularityDataModule` batches, its hot rows from a 5% batch-sampled
    :class:`AccessProfile` taken in set-up. Reports the profiling time, also as a share of the epoch."""
    source = profiled_hot_rows(recipe)
    batches = PopularityDataModule(recipe.datamodule, schedule=schedule, hot_rows=source)
    run = fit_with_lightning(Recipe(recipe.model, batches, recipe.epochs))
    epoch_s = epoch_seconds(run.clock.ends)
    stats = batches.epoch_stats.get(0)
    run.extras = {"profile_s": source.profile.seconds, "profile_share_of_epoch": source.profile.seconds / epoch_s,
                  "hot_input_share": stats.hot_input_share if stats else float("nan")}
    return run


for _schedule, _what in (("fae", "cold batches, then hot-only batches (FAE)"),
                         ("interleave", "hot-only and cold batches interleaved"),
                         ("stitch", "every batch split into a hot and a cold micro-batch (Hotline)")):
    register_variant(_schedule, f"Lightning, {_what}")(
        lambda recipe, schedule=_schedule: fit_with_popularity_batches(recipe, schedule))
