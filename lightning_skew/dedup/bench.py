"""``lightning-skew bench`` variant of deduplicated features (RecD): the user-level features pooled once per session."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.core.batch import Batch, concat_batches, deduped_lookups, select_inputs
from lightning_skew.data.base import WrappedDataModule
from lightning_skew.dedup.datamodule import DedupDataModule
from lightning_skew.dedup.lookups import dedup_factors

# The user-level features of the session recipes (the synthetic sessions and MovieLens with history).
USER_FEATURES = ("user_id", "history")

# Batches whose inputs the shuffled baseline mixes (about 32k inputs at the recipe's batch size).
SHUFFLE_WINDOW_BATCHES = 16

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


class _ShuffledLoader:
    def __init__(self, loader: Any, window: int, seed: int) -> None:
        self.loader, self.window, self.seed = loader, window, seed

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        pending: list[Batch] = []
        for index, batch in enumerate(self.loader):
            pending.append(batch)
            if len(pending) == self.window:
                yield from self._mixed(pending, index)
                pending = []
        if pending:
            yield from self._mixed(pending, -1)

    def _mixed(self, batches: list[Batch], index: int) -> Iterator[Batch]:
        joined = concat_batches(batches)
        order = torch.randperm(int(joined.labels.numel()), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + index))
        start = 0
        for batch in batches:
            size = int(batch.labels.numel())
            yield select_inputs(joined, order[start:start + size])
            start += size


class ShuffledWindows(WrappedDataModule):
    """The wrapped data's training inputs shuffled within windows of ``window`` batches (the order a user without
    RecD trains in: sessions scattered), the same batch sizes and count; for the bench's shuffled baseline."""

    def __init__(self, datamodule: Any, window: int = SHUFFLE_WINDOW_BATCHES, seed: int = 0) -> None:
        super().__init__(datamodule)
        self.window, self.seed = window, seed

    def train_dataloader(self) -> _ShuffledLoader:
        return _ShuffledLoader(self.datamodule.train_dataloader(), self.window, self.seed)


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
register_variant("lightning_shuffled", f"Lightning, training inputs shuffled within windows of "
                 f"{SHUFFLE_WINDOW_BATCHES} batches (sessions scattered: the order without RecD)")(
    lambda recipe: fit_with_lightning(Recipe(recipe.model, ShuffledWindows(recipe.datamodule), recipe.epochs)))
