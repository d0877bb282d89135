"""DedupFactors: a callback that records what deduplication leaves of each training batch (RecD's dedup factor)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_skew.core.decisions import deduped_lookups
from lightning_skew.dedup.lookups import dedup_factors

__all__ = ["DedupFactors"]


class DedupFactors(pl.Callback):
    """Counts, over the training batches a :class:`~lightning_skew.DedupDataModule` deduplicated, the distinct
    combinations per input (the dedup factor: 1.0 = nothing shared, 0.1 = one bag per ten inputs), and per
    feature the distinct bags per input on one batch in ``every_n_batches``.

    The counts are host work on the batch's deduplicated lookups (already on the host), read at the start of a
    step; :meth:`factors` gives them as ``{"dedup_factor": ..., "dedup_<feature>": ...}``, and they are logged at
    the end of every training epoch. Batches that were not deduplicated are not counted.

    Args:
        every_n_batches: per-feature factors are measured on one batch in this many (each costs a pass over the
            distinct bags).
    """

    def __init__(self, every_n_batches: int = 20) -> None:
        if every_n_batches < 1:
            raise ValueError(f"DedupFactors: every_n_batches must be at least 1, got {every_n_batches}")
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

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.inputs:
            pl_module.log_dict(self.factors(), on_step=False, on_epoch=True, sync_dist=False)

    def factors(self) -> dict[str, float]:
        """The dedup factor of all batches counted, and each feature's mean over the batches measured."""
        out = {"dedup_factor": self.distinct / max(self.inputs, 1)}
        out.update({f"dedup_{name}": sum(v) / len(v) for name, v in self.per_feature.items()})
        return out
