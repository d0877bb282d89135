"""One rank of a PopularityDataModule run over gloo, started by tests/test_popularity.py (like torchrun).

Prints one JSON line: per epoch, the ``is_hot`` flag of every delivered batch, the batch sizes, the inputs
delivered (as signatures) and the epoch's statistics.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.distributed as dist

from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.popularity.datamodule import PopularityDataModule


def signatures(batch) -> list[list[float]]:
    ids = batch.sparse_features.values().view(len(batch.sparse_features.keys()), -1).t().double()
    return torch.cat([batch.dense_features.double(), ids], dim=1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", default="fae", help="comma-separated schedules, run one after the other")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--window-batches", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    world_size = dist.get_world_size()
    inner = SyntheticDataModule(num_embeddings_per_feature=[60, 25, 40], num_dense=2, num_train_samples=1024,
                                num_val_samples=64, num_test_samples=64, batch_size=64 // world_size,
                                popularity_exponent=1.4, seed=5)
    runs, hot_rows = [], None
    for schedule in args.schedules.split(","):
        data = PopularityDataModule(inner, schedule=schedule, hot_rows_budget=20, window_batches=args.window_batches,
                                    seed=1)
        data.setup("fit")
        loader = data.train_dataloader()
        epochs = []
        for _ in range(args.epochs):
            flags, sizes, inputs = [], [], []
            for batch in loader:
                flags.append(bool(batch.is_hot))
                sizes.append(int(batch.labels.numel()))
                inputs.extend(signatures(batch))
                # a collective per step, as a sharded model's forward makes: a rank with fewer steps would hang
                dist.all_reduce(torch.ones(1))
            epochs.append({"flags": flags, "sizes": sizes, "inputs": inputs,
                           "stats": data.epoch_stats[max(data.epoch_stats)].metrics()})
        runs.append({"schedule": schedule, "epochs": epochs})
        hot_rows = [rows.tolist() for rows in data.hot_rows.rows]
    print(json.dumps({"rank": dist.get_rank(), "runs": runs, "hot_rows": hot_rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
