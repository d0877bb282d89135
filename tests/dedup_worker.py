"""One rank of a short TorchRecStrategy fit on synthetic sessions (or, with ``--movielens ROOT``, MovieLens-100k with
a history feature, from its recipe), with or without deduplicated user features, started by tests/test_dedup.py.
Writes ``plain_rank0.pt`` (or with ``--dedup``, ``dedup_rank0.pt``): the loss of every step and the unsharded
weights."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_skew import DedupDataModule, Sessions, SyntheticDataModule, TorchRecStrategy
from lightning_skew.models.dlrm import DLRMModule

TABLE_ROWS = [300, 2000, 40]
GLOBAL_BATCH = 256
SESSIONS = Sessions(mean_samples=6.0, max_history=12, mean_history=8.0, num_users=500, num_items=800)


def make_data(batch_size: int, num_batches: int = 6) -> SyntheticDataModule:
    return SyntheticDataModule(num_embeddings_per_feature=TABLE_ROWS, num_dense=4,
                               num_train_samples=GLOBAL_BATCH * num_batches, num_val_samples=GLOBAL_BATCH,
                               num_test_samples=GLOBAL_BATCH, batch_size=batch_size, seed=5, sessions=SESSIONS)


def make_model(data: SyntheticDataModule) -> DLRMModule:
    torch.manual_seed(0)
    return DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                      embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1],
                      embedding_optimizer="rowwise_adagrad", embedding_lr=0.05)


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.deduped: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))
        self.deduped.append(getattr(batch, "deduped", None) is not None)


RECIPE_WITH_HISTORY = Path(__file__).resolve().parents[1] / "recipes" / "dlrm_movielens_history.yaml"


def movielens_data(root: str, batch_size: int):
    from lightning_skew.profile.command import build_datamodule

    return build_datamodule(["--config", str(RECIPE_WITH_HISTORY), "--data.init_args.root", root,
                             "--data.init_args.batch_size", str(batch_size)])[0]


def run(out: Path, dedup: bool, movielens: str | None = None) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = make_data(GLOBAL_BATCH // world_size) if movielens is None else movielens_data(
        movielens, GLOBAL_BATCH // world_size)
    model = make_model(data)
    record = RecordLosses()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=TorchRecStrategy(), max_epochs=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(out), callbacks=[record],
                         num_sanity_val_steps=0, limit_val_batches=0, max_steps=6)
    trainer.fit(model, DedupDataModule(data, ["user_id", "history"]) if dedup else data)
    weights = trainer.strategy.unsharded_state_dict()
    if trainer.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"losses": record.losses, "deduped": record.deduped, "weights": weights},
                   out / f"{'dedup' if dedup else 'plain'}_rank0.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dedup", action="store_true")
    parser.add_argument("--movielens", default=None, help="a folder with ml-100k-history.inter and ml-100k.item")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    run(Path(args.out), args.dedup, args.movielens)


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
