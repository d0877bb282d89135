"""One rank of a 2-process ColumnarDataModule fit under TorchRecStrategy, started by the tests like torchrun.

Writes, per rank, the sizes of the batches it trained and validated on and the validation metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl

from lightning_skew import ColumnarDataModule, DLRMModule, TorchRecStrategy

from _support.columnar_files import AVAZU_CATEGORICAL


class BatchSizes(pl.Callback):
    def __init__(self) -> None:
        self.train: list[int] = []
        self.val: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train.append(len(batch.labels))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(len(batch.labels))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = ColumnarDataModule(train_paths=args.train, val_paths=args.val, label="click",
                              sparse_features=AVAZU_CATEGORICAL, encoding="hash", num_embeddings=500,
                              missing_values=["-1"], batch_size=64)
    pl.seed_everything(0)
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       embedding_dim=8, over_arch_layer_sizes=[16, 1])
    sizes = BatchSizes()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=TorchRecStrategy(), max_epochs=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[sizes])
    trainer.fit(model, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"train": sizes.train, "val": sizes.val, "metrics": metrics}))


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
