"""``lightning-skew bench`` variant of deduplicated features (RecD): the user-level features pooled once per session."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.core.batch import deduped_lookups
from lightning_skew.dedup.datamodule import DedupDataModule
from lightning_skew.dedup.lookups import dedup_factors

# The user-level features of the session recipes (the synthetic sessions and MovieLens with history).
USER_FEATURES = ("user_id", "history")

# Per-feature factors are measured on one batch in this many (each costs a pass over the distinct bags).
FACTOR_EVERY_N_BATCHES = 20


class DedupFactors(pl.Callback):
    """Records what deduplication leaves: distinct combinations / inputs of each batch, and per feature distinct
    bags / inputs (on one batch in ``every_n_batches``)."""

    def __init__(self, every_n_batches: int = FACTOR_EVERY_N_BATCHES) -> None:
        self.every_n_batches = every_n_batches
        self.distinct = 0
        self.inputs = 0
        self.per_feature: dict[str, list[float]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        lookups = deduped_lookups(batch)
        if lookups is None:
            return
        size = int(lookups.inverse.numel())
        self.distinct += lookups.num_distinct
        self.inputs += size
        if batch_idx % self.every_n_batches == 0:
            for name, share in dedup_factors(lookups.bags, list(lookups.features)).items():
                self.per_feature.setdefault(name, []).append(share * lookups.num_distinct / max(size, 1))

    def factors(self) -> dict[str, float]:
        out = {"dedup_factor": self.distinct / max(self.inputs, 1)}
        out.update({f"dedup_{name}": sum(v) / len(v) for name, v in self.per_feature.items()})
        return out


def user_features(recipe: Recipe, features: Sequence[str] | None = None) -> list[str]:
    names = recipe.datamodule.sparse_feature_names
    chosen = [name for name in (features or USER_FEATURES) if name in names]
    if not chosen:
        raise ValueError(f"the dedup variant deduplicates the user-level features {list(features or USER_FEATURES)}, "
                         f"but the recipe's data has none of them ({names}); use a session recipe, e.g. "
                         "recipes/dlrm_synthetic_sessions.yaml")
    return chosen


def fit_with_dedup(recipe: Recipe, features: Sequence[str] | None = None, consecutive: bool = True) -> TrainedRun:
    """Lightning with the recipe's DataModule in :class:`DedupDataModule`; extras report the dedup factors."""
    wrapped = DedupDataModule(recipe.datamodule, user_features(recipe, features), consecutive=consecutive)
    factors = DedupFactors()
    run = fit_with_lightning(Recipe(recipe.model, wrapped, recipe.epochs), callbacks=[factors])
    run.extras = {**run.extras, **factors.factors()}
    return run


register_variant("dedup", "Lightning, user_id and history sent and pooled once per session in a batch (RecD)")(
    lambda recipe: fit_with_dedup(recipe))
register_variant("dedup_batch", "as dedup, equal bags merged anywhere in the batch (not only within a session)")(
    lambda recipe: fit_with_dedup(recipe, consecutive=False))
