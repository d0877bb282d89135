"""One rank of a small run under TorchRecStrategy or HotColdStrategy, started by the tests as a process.

Writes into ``--out``: per-step global losses, whole tables and fused-optimizer state in the dataset's ID
space (rank zero), the placement, the rebalance records and an unsharded export.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_skew.hotcold.state import flatten_optimizer_state
from lightning_skew.hotcold.strategy import HotColdStrategy
from lightning_skew.popularity.datamodule import PopularityDataModule
from lightning_skew.profile.sources import ProfiledHotRows
from lightning_skew.torchrec.checkpoint import gather_unsharded
from lightning_skew.torchrec.strategy import TorchRecStrategy

from _support.small import RecordLosses, make_data, make_model

ROW_BYTES = 4 * (8 + 1)  # dim 8, rowwise_adagrad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["torchrec", "hotcold"], default="hotcold")
    parser.add_argument("--budget-rows", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--rebalance-every", type=int, default=None)
    parser.add_argument("--popularity", action="store_true", help="FAE batches from a PopularityDataModule")
    parser.add_argument("--layout", default=None, help="HotColdStrategy(layout=...)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = make_data(world_size)
    # With popularity batching, the batches and the placement share one hot-set source (exact counts, one pass).
    hot_rows = ProfiledHotRows(budget_bytes=args.budget_rows * ROW_BYTES, embedding_dim=8, sample_fraction=1.0) \
        if args.popularity else None
    if args.popularity:
        data = PopularityDataModule(data, schedule="fae", hot_rows=hot_rows, shuffle=False)
    model = make_model(data, "rowwise_adagrad")
    if args.strategy == "torchrec":
        strategy = TorchRecStrategy()
    else:
        strategy = HotColdStrategy(budget_bytes=args.budget_rows * ROW_BYTES, hot_rows=hot_rows, sample_fraction=0.5,
                                   rebalance_every_n_steps=args.rebalance_every, layout=args.layout)
    record = RecordLosses()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_epochs=args.epochs,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(out), callbacks=[record], num_sanity_val_steps=0, deterministic=True)
    trainer.fit(model, data, ckpt_path=args.resume)
    strategy.export_unsharded_checkpoint(out / "export.ckpt")
    if isinstance(strategy, HotColdStrategy):
        _, optimizer = strategy.gather_tables()
        extra = {"placements": {p: pl_.state_dict() for p, pl_ in strategy.placements.items()},
                 "rebalances": strategy.rebalances,
                 "skipped_cold": [c.skipped_cold for c in strategy.collections().values()]}
    else:
        optimizer = gather_unsharded(flatten_optimizer_state(strategy.fused_optimizer.state_dict()["state"]))
        extra = {}
    if trainer.is_global_zero:
        torch.save({"optimizer": optimizer, **extra}, out / "state.pt")
        (out / "losses.json").write_text(json.dumps(record.losses))
        (out / "profiling_passes.json").write_text(json.dumps(ProfiledHotRows.profiling_passes))


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
