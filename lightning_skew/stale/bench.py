"""``lightning-skew bench`` variants of stale-embedding skipping (Slipstream): targets, profiled candidates, repacking."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_skew.bench.helpers import epoch_seconds, gpu_peak, profiled_hot_rows, reset_gpu_peak
from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.core.monitor import batch_size_of
from lightning_skew.stale.repack import RepackedDataModule
from lightning_skew.stale.skipper import StaleEmbeddingSkipper
from lightning_skew.torchrec.strategy import TorchRecStrategy

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


def fit_with_skipper(recipe: Recipe, skipper: StaleEmbeddingSkipper, **fit_options: Any) -> TrainedRun:
    """Lightning with ``skipper``; samples/s counts the inputs read (dropped ones included), extras report the
    measured drop share, the share of lookups served without gradient, the stale rows and threshold at the end,
    and the callback's time. With ``skipper.repack`` the DataModule's training batches go through it
    (:class:`RepackedDataModule`) and each step counts the inputs read for it. ``fit_options`` (``strategy``,
    ``accelerator``) go to :func:`fit_with_lightning`."""
    read = _ReadInputs()
    if skipper.repack:
        recipe = Recipe(recipe.model, RepackedDataModule(recipe.datamodule), recipe.epochs)
    run = fit_with_lightning(recipe, callbacks=[read, skipper], **fit_options)
    sizes = skipper.pulled_per_batch if skipper.repack else read.sizes
    if len(sizes) == len(run.clock.samples):
        run.clock.samples = sizes
    epoch_s = epoch_seconds(run.clock.ends)
    run.extras = {**run.extras, "drop_share": skipper.inputs_dropped / max(skipper.inputs_seen, 1),
                  "frozen_share": skipper.lookups_frozen / max(skipper.lookups_seen, 1),
                  "stale_rows": float(len(skipper.stale)) if skipper.stale is not None else 0.0,
                  "reactivated": float(skipper.reactivated),
                  "threshold": skipper.threshold, "skipper_share_of_run": skipper.seconds / epoch_s}
    return run


def fit_with_stale_skipping(recipe: Recipe, target_drop_fraction: float, profiled: bool = False,
                            min_stale_lookups: int | None = None, repack: bool = False, **options: Any) -> TrainedRun:
    """:func:`fit_with_skipper` with a skipper of the bench's window and the given target; ``profiled`` takes the
    candidates from a 5% :class:`AccessProfile` (the popularity variants' hot set); ``options`` go to the skipper."""
    hot_rows = profiled_hot_rows(recipe) if profiled else None
    return fit_with_skipper(recipe, StaleEmbeddingSkipper(
        hot_rows=hot_rows, evaluate_every_n_steps=STALE_EVALUATE_EVERY_N_STEPS,
        target_drop_fraction=target_drop_fraction, min_stale_lookups=min_stale_lookups, repack=repack, **options))


register_variant("stale", "Lightning with StaleEmbeddingSkipper() exactly as its defaults (the setting a user gets)")(
    lambda recipe: fit_with_skipper(recipe, StaleEmbeddingSkipper()))

for _percent in (10, 20, 30, 50):
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

# Quality-keeping settings (issue 13): keep one droppable input in k at weight k, freeze the stale lookups.
for _percent in (30, 50, 70):
    for _k in (2, 4, 8):
        register_variant(f"stale{_percent}_k{_k}", f"as stale{_percent}, one droppable input in {_k} kept at weight "
                         f"{_k}")(lambda recipe, fraction=_percent / 100, k=_k: fit_with_stale_skipping(
                             recipe, fraction, keep_one_in=k))
        register_variant(f"stale{_percent}_k{_k}_freeze", f"as stale{_percent}_k{_k}, stale lookups of the other "
                         "inputs served without gradient")(lambda recipe, fraction=_percent / 100, k=_k:
                                                           fit_with_stale_skipping(recipe, fraction, keep_one_in=k,
                                                                                   freeze_stale_lookups=True))
        register_variant(f"stale{_percent}_k{_k}_repack", f"as stale{_percent}_k{_k}, dropped in the data pipeline")(
            lambda recipe, fraction=_percent / 100, k=_k: fit_with_stale_skipping(recipe, fraction, keep_one_in=k,
                                                                                  repack=True))
    register_variant(f"stale{_percent}_freeze", f"as stale{_percent}, stale lookups of the kept inputs served "
                     "without gradient")(lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(
                         recipe, fraction, freeze_stale_lookups=True))
    for _k in (2, 4):
        register_variant(f"stale{_percent}_half_k{_k}_repack", f"as stale{_percent}_k{_k}_repack, an input droppable "
                         "when half its lookups are stale")(
            lambda recipe, fraction=_percent / 100, k=_k: fit_with_stale_skipping(
                recipe, fraction, min_stale_lookups=len(recipe.datamodule.sparse_feature_names) // 2,
                keep_one_in=k, repack=True))

# Skipping updates at a fixed, low threshold (rows that moved less than t per element over the window): the
# stale set no longer follows a drop target, so only rows that really settled are frozen.
for _name, _threshold in (("0001", 0.001), ("0003", 0.003), ("001", 0.01)):
    register_variant(f"freeze_t{_name}", f"stale lookups (change below {_threshold} per window) served without "
                     "gradient; inputs whose lookups are all stale dropped")(
        lambda recipe, t=_threshold: fit_with_skipper(recipe, StaleEmbeddingSkipper(
            evaluate_every_n_steps=STALE_EVALUATE_EVERY_N_STEPS, threshold=t, freeze_stale_lookups=True)))


def fit_on_gpu_with_skipper(recipe: Recipe, compute_kernel: str, skipper: StaleEmbeddingSkipper) -> TrainedRun:
    """:func:`fit_with_skipper` on one GPU, every table with ``compute_kernel`` (the twins of ``gpu_hbm`` and
    ``gpu_host``): where the embedding update is most of a step, skipping updates may pay where on a CPU it
    does not."""
    reset_gpu_peak("gpu")  # first: a machine without CUDA fails before anything runs
    run = fit_with_skipper(recipe, skipper, strategy=TorchRecStrategy(compute_kernel=compute_kernel),
                           accelerator="gpu")
    run.extras.update(gpu_peak("gpu"))
    return run


for _kernel, _twin in (("fused", "gpu_hbm"), ("fused_uvm", "gpu_host")):
    register_variant(f"{_twin}_stale", f"as {_twin}, with StaleEmbeddingSkipper() at its defaults")(
        lambda recipe, kernel=_kernel: fit_on_gpu_with_skipper(recipe, kernel, StaleEmbeddingSkipper()))
    register_variant(f"{_twin}_freeze_t001", f"as {_twin}, with freeze_t001's skipper (stale lookups served "
                     "without gradient)")(
        lambda recipe, kernel=_kernel: fit_on_gpu_with_skipper(recipe, kernel, StaleEmbeddingSkipper(
            evaluate_every_n_steps=STALE_EVALUATE_EVERY_N_STEPS, threshold=0.01, freeze_stale_lookups=True)))
