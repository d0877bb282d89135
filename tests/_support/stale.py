"""Hand-made two-feature batches, a DLRM that records the batch sizes it trains on, and a quiet fit of them: what
the stale-embedding tests share."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.models.dlrm import DLRMModule
from lightning_skew.stale.repack import RepackedLoader
from lightning_skew.stale.skipper import StaleEmbeddingSkipper

ROWS = 100
FEATURES = ["a", "b"]


def kjt(ids: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    keys = list(ids)
    lengths = [len(row) for key in keys for row in ids[key]]
    values = [v for key in keys for row in ids[key] for v in row]
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.long),
                             lengths=torch.tensor(lengths, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------


class SizedDLRM(DLRMModule):
    """Records the batch size that training_step sees."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen_sizes: list[int] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.seen_sizes.append(int(batch.labels.numel()))
        return super().training_step(batch, batch_idx)


def make_model() -> SizedDLRM:
    torch.manual_seed(0)
    return SizedDLRM([ROWS, ROWS], FEATURES, 3, embedding_dim=4, dense_arch_layer_sizes=[8, 4],
                     over_arch_layer_sizes=[8, 1], embedding_optimizer="sgd", embedding_lr=0.1)


def make_batches(steps: int, used: list[range], used_b: list[range] | None = None, batch: int = 256,
                 seed: int = 0) -> list[Batch]:
    """``steps`` batches; in step ``s`` feature a's IDs are uniform over ``used[s * len(used) // steps]``, feature
    b's over the same (or ``used_b``, phased alike)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        spans = {f: phases[step * len(phases) // steps]
                 for f, phases in zip(FEATURES, (used, used_b or used), strict=True)}
        ids = {f: (span.start + torch.randint(0, len(span), (batch,), generator=gen)).tolist()
               for f, span in spans.items()}
        batches.append(Batch(torch.rand(batch, 3, generator=gen), kjt({f: [[i] for i in v] for f, v in ids.items()}),
                             torch.randint(0, 2, (batch,), generator=gen).float()))
    return batches


def fit(model: pl.LightningModule, batches: list[Batch], callbacks: list[pl.Callback], epochs: int = 1,
        root: Path | None = None, ckpt_path: str | None = None) -> pl.Trainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(root) if root else None, callbacks=callbacks,
                             num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
        loader = DataLoader(batches, batch_size=None)
        repacking = [c for c in callbacks if isinstance(c, StaleEmbeddingSkipper) and c.repack]
        if repacking:  # drop in the data pipeline: the loader goes through the skipper
            loader = RepackedLoader(loader, repacking[0])
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer
