"""``lightning-skew bench`` variants of stale-embedding skipping (Slipstream): targets, profiled candidates, repacking."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_skew.bench.helpers import epoch_seconds, profiled_hot_rows
from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.core.monitor import batch_size_of
from lightning_skew.stale.repack import RepackedDataModule
from lightning_skew.stale.skipper import StaleEmbeddingSkipper

# Candidates are the most looked-up rows of each window, the threshold is searched for the target share of
# dropped inputs. Run on uniform IDs with --data.init_args.uniform true.
STALE_EVALUATE_EVERY_N_STEPS = 100


class _ReadInputs(pl.Callback):
    """Records each step's batch size before the skipper shrinks it: a variant's samples/s counts inputs read."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.sizes.append(batch_size_of(batch))


def fit_with_stale_skipping(recipe: Recipe, target_drop_fraction: float, profiled: bool = False,
                            min_stale_lookups: int | None = None, repack: bool = False) -> TrainedRun:
    """Lightning with :class:`StaleEmbeddingSkipper`; samples/s counts the inputs read (dropped ones included),
    extras report the measured drop share, the stale rows and threshold at the end, and the callback's time.
    ``profiled`` takes the candidates from a 5% :class:`AccessProfile` (the popularity variants' hot set);
    ``repack`` drops in the data pipeline and trains full batches (each step then counts the inputs read for it)."""
    read = _ReadInputs()
    hot_rows = profiled_hot_rows(recipe) if profiled else None
    skipper = StaleEmbeddingSkipper(hot_rows=hot_rows, evaluate_every_n_steps=STALE_EVALUATE_EVERY_N_STEPS,
                                    target_drop_fraction=target_drop_fraction, min_stale_lookups=min_stale_lookups,
                                    repack=repack)
    if repack:  # the data pipeline drops: the DataModule's training batches go through the skipper
        recipe = Recipe(recipe.model, RepackedDataModule(recipe.datamodule), recipe.epochs)
    run = fit_with_lightning(recipe, callbacks=[read, skipper])
    sizes = skipper.pulled_per_batch if repack else read.sizes
    if len(sizes) == len(run.clock.samples):
        run.clock.samples = sizes
    epoch_s = epoch_seconds(run.clock.ends)
    run.extras = {"drop_share": skipper.inputs_dropped / max(skipper.inputs_seen, 1),
                  "stale_rows": float(len(skipper.stale)) if skipper.stale is not None else 0.0,
                  "threshold": skipper.threshold, "skipper_share_of_run": skipper.seconds / epoch_s}
    return run


for _percent in (10, 30, 50):
    register_variant(f"stale{_percent}", f"Lightning, inputs on stale rows dropped, target {_percent}% (Slipstream)")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(recipe, fraction))
    register_variant(f"stale{_percent}p", f"as stale{_percent}, candidates from an access profile's hot rows")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(recipe, fraction, profiled=True))
    register_variant(f"stale{_percent}p_half", f"as stale{_percent}p, an input dropped when half its lookups are stale")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(
            recipe, fraction, profiled=True, min_stale_lookups=len(recipe.datamodule.sparse_feature_names) // 2))
    register_variant(f"stale{_percent}p_repack", f"as stale{_percent}p, dropped in the data pipeline, full batches")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(recipe, fraction, profiled=True, repack=True))
    register_variant(f"stale{_percent}p_half_repack", f"as stale{_percent}p_half, dropped in the data pipeline, "
                     "full batches")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(
            recipe, fraction, profiled=True, min_stale_lookups=len(recipe.datamodule.sparse_feature_names) // 2,
            repack=True))
