"""One rank of a short TorchRecStrategy run with StaleEmbeddingSkipper, started by tests/test_stale.py.

Writes ``stale_rank<r>.json``: at every step the threshold and a digest of the stale set in force, and the
batch sizes that training_step saw.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.models.dlrm import DLRMModule
from lightning_skew.stale.repack import RepackedDataModule
from lightning_skew.stale.skipper import StaleEmbeddingSkipper
from lightning_skew.torchrec.strategy import TorchRecStrategy

TABLE_ROWS = [300, 2000, 40, 1000, 7]
GLOBAL_BATCH = 256


class SizedDLRM(DLRMModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen_sizes: list[int] = []
        self.weighted = 0  # inputs trained at a weight above 1

    def training_step(self, batch, batch_idx):
        self.seen_sizes.append(int(batch.labels.numel()))
        weights = getattr(batch, "weights", None)
        self.weighted += 0 if weights is None else int((weights > 1).sum())
        return super().training_step(batch, batch_idx)


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


class RecordDecisions(pl.Callback):
    def __init__(self, skipper: StaleEmbeddingSkipper) -> None:
        self.skipper = skipper
        self.decisions: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stale = self.skipper.stale
        rows = [r.tolist() for r in stale.rows] if stale is not None else []
        self.decisions.append({"step": trainer.global_step, "threshold": self.skipper.threshold,
                               "stale_rows": sum(len(r) for r in rows), "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--checkpoint", action="store_true", help="save <out>/epoch<N> at the end")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--repack", action="store_true", help="drop in the data pipeline (full batches)")
    parser.add_argument("--keep-one-in", type=int, default=1, help="keep one droppable input in k at weight k")
    parser.add_argument("--freeze", action="store_true", help="serve stale lookups without gradient")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = SyntheticDataModule(num_embeddings_per_feature=TABLE_ROWS, num_dense=5, popularity_exponent=1.3,
                               num_train_samples=GLOBAL_BATCH * 12, num_val_samples=GLOBAL_BATCH,
                               num_test_samples=GLOBAL_BATCH, batch_size=GLOBAL_BATCH // world_size, seed=3)
    torch.manual_seed(0)
    model = SizedDLRM(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                      embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1],
                      embedding_optimizer="rowwise_adagrad", embedding_lr=0.05)
    skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=3, target_drop_fraction=0.3, tolerance=0.05,
                                    sample_batches=3, repack=args.repack, keep_one_in=args.keep_one_in,
                                    freeze_stale_lookups=args.freeze)
    record, losses = RecordDecisions(skipper), RecordLosses()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=TorchRecStrategy(), max_epochs=args.epochs,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=args.out, callbacks=[skipper, record, losses],
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, RepackedDataModule(data) if args.repack else data, ckpt_path=args.resume)
    if args.checkpoint:
        trainer.save_checkpoint(Path(args.out) / f"epoch{args.epochs}")
    out = {"evaluations": skipper.evaluations, "decisions": record.decisions, "seen_sizes": model.seen_sizes,
           "losses": losses.losses, "dropped": skipper.inputs_dropped, "frozen": skipper.lookups_frozen,
           "weighted": model.weighted}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"stale_rank{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
