"""One rank of a small TorchRecStrategy run, started by the tests as a separate process (like torchrun).

Writes what the tests compare into ``--out``: per-step global losses, the unsharded export, the gathered
fused-optimizer state and per-rank predictions on the first validation batch.
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
from lightning_skew.torchrec.checkpoint import gather_unsharded
from lightning_skew.torchrec.strategy import TorchRecStrategy

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--embedding-optimizer", default="rowwise_adagrad")
    parser.add_argument("--sharding-types", default=None, help="comma-separated TorchRec sharding types")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if os.environ.get("WORKER_TRACEBACK_AFTER"):  # debugging a hang: dump every thread's stack, then exit
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["WORKER_TRACEBACK_AFTER"]), exit=True)
    out = Path(args.out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = make_data(world_size)
    model = make_model(data, args.embedding_optimizer)
    record = RecordLosses()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=TorchRecStrategy(
                         sharding_types=args.sharding_types.split(",") if args.sharding_types else None),
                         max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out), callbacks=[record],
                         num_sanity_val_steps=0, deterministic=True)
    trainer.fit(model, data, ckpt_path=args.resume)
    strategy: TorchRecStrategy = trainer.strategy
    strategy.export_unsharded_checkpoint(out / "export.ckpt")
    fused = {f"{param}/{name}": value for param, states in strategy.fused_optimizer.state_dict()["state"].items()
             for name, value in states.items()}
    fused_full = gather_unsharded(fused)
    model.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        predictions = torch.sigmoid(model(batch))  # every rank calls: sharded lookups are collective
    torch.save({"batch": batch, "predictions": predictions}, out / f"predictions_rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        torch.save(fused_full, out / "fused_state.pt")
        (out / "losses.json").write_text(json.dumps(record.losses))


if __name__ == "__main__":
    from launch import finish_rank

    main()
    finish_rank()
