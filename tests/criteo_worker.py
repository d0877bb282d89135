"""One rank of a small CriteoDataModule fit under TorchRecStrategy, started by the tests as a separate process.

Writes ``--out/rank{r}.json``: the sizes of the training batches the rank stepped on, of the validation batches it
scored, and the labels' sum of each, so that the test sees every rank step together on every input once.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl

from lightning_skew.data.criteo import CriteoDataModule
from lightning_skew.models.dlrm import DLRMModule
from lightning_skew.torchrec.strategy import TorchRecStrategy


class RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.train: list[int] = []
        self.val: list[int] = []
        self.val_ids: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train.append(len(batch.labels))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(len(batch.labels))
        # The line index of numbered lines: hashing puts a present value v on row 1 + v (row 0 is the missing row).
        self.val_ids.extend((batch.sparse_features["C1"].values() - 1).tolist())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = CriteoDataModule(train_paths=[args.train], val_paths=[args.val], batch_size=args.batch_size,
                            max_rows_per_table=1000)
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    record = RecordBatches()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=TorchRecStrategy(), max_epochs=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[record], num_sanity_val_steps=0)
    trainer.fit(model, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"train": record.train, "val": record.val, "val_ids": record.val_ids, "metrics": metrics}))


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
