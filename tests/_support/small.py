"""The small synthetic DLRM setup most tests fit (five tables, a global batch of 64), a loss recorder, and the quiet
single-process Trainer the in-process fits use."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.models.dlrm import DLRMModule

TABLE_ROWS = [300, 2000, 40, 1000, 7]
GLOBAL_BATCH = 64


def make_data(world_size: int) -> SyntheticDataModule:
    return SyntheticDataModule(num_embeddings_per_feature=TABLE_ROWS, num_dense=5,
                               num_train_samples=GLOBAL_BATCH * 8, num_val_samples=GLOBAL_BATCH * 2,
                               num_test_samples=GLOBAL_BATCH, batch_size=GLOBAL_BATCH // world_size, seed=3)


def make_model(data: SyntheticDataModule, embedding_optimizer: str) -> DLRMModule:
    torch.manual_seed(0)
    return DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                      embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1],
                      embedding_optimizer=embedding_optimizer, embedding_lr=0.05)


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A one-process CPU Trainer that logs, prints, checkpoints and sanity-checks nothing unless ``kwargs`` say so
    (they override every default, ``strategy`` included: a TorchRecStrategy unless given)."""
    from lightning_skew.torchrec.strategy import TorchRecStrategy

    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                                    enable_progress_bar=False, enable_model_summary=False,
                                    enable_checkpointing=False, num_sanity_val_steps=0)
    if "strategy" not in kwargs:
        defaults["strategy"] = TorchRecStrategy()
    return pl.Trainer(**{**defaults, **kwargs})
