"""How many inputs stale skipping could drop without touching a row that still learns, on a synthetic recipe.

An input can be dropped at no cost to the rows it looks up only when every one of its lookups hits a row that
has settled. This script ranks the rows of the recipe's training stream by how often they are looked up (on
``--rank-batches`` batches spread over the epoch), then, on ``--measure-batches`` other batches, prints for the
top ``N`` rows: the share of lookups they take, the share of inputs whose lookups all fall among them (the most
the all-lookups rule could drop with those rows stale), the share with all but two or half of them among them, and
how many lookups the ``N``-th row gets in one epoch (how settled the least popular of them can be).

    python scripts/stale_ceiling.py --config recipes/dlrm_synthetic.yaml

Reads only the data (nothing is trained); about a minute on 2 cores.
"""

from __future__ import annotations

import argparse

import torch
import yaml

from lightning_skew.data.synthetic import SyntheticDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="recipes/dlrm_synthetic.yaml")
    parser.add_argument("--rank-batches", type=int, default=180)
    parser.add_argument("--measure-batches", type=int, default=40)
    parser.add_argument("--top", default="25000,50000,100000,200000,400000")
    args = parser.parse_args()
    with open(args.config) as handle:
        data = yaml.safe_load(handle)["data"]
    if not data["class_path"].endswith("SyntheticDataModule"):
        raise SystemExit(f"{args.config}: this script reads SyntheticDataModule recipes, not {data['class_path']}")
    datamodule = SyntheticDataModule(**data["init_args"])
    datamodule.setup("fit")
    stream = datamodule.stream("train")
    names = datamodule.sparse_feature_names
    offsets = torch.tensor([0, *datamodule.num_embeddings_per_feature]).cumsum(0)

    def global_ids(index: int) -> torch.Tensor:
        """[batch, features] row IDs over all tables (one-hot features)."""
        by_key = stream.batch_at(index).sparse_features.to_dict()
        return torch.stack([by_key[name].values().long() + offsets[i] for i, name in enumerate(names)], dim=1)

    points = torch.linspace(0, len(stream) - 1, args.rank_batches + args.measure_batches).long().tolist()
    every = len(points) // args.measure_batches  # every `every`-th point measures, the others rank
    measuring = {i for i in range(0, len(points), every)[:args.measure_batches]}
    measured = [p for i, p in enumerate(points) if i in measuring]
    ranked = [p for i, p in enumerate(points) if i not in measuring]
    counts = torch.zeros(int(offsets[-1]), dtype=torch.long)
    for index in ranked:
        counts += torch.bincount(global_ids(index).flatten(), minlength=counts.numel())
    order = torch.argsort(counts, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    ids = torch.cat([global_ids(index) for index in measured])
    per_epoch = stream.num_samples / (len(ranked) * stream.batch_size)
    print(f"{args.config}: {counts.numel():,} rows, {len(names)} features; ranked on {len(ranked)} batches, "
          f"measured on {ids.shape[0]:,} inputs")
    most, half = len(names) - 2, len(names) // 2
    print(f"| top rows | lookups on them | inputs with all lookups on them | >= {most} of {len(names)} | "
          f">= {half} of {len(names)} | lookups of the last of them per epoch |")
    print("|---:|---:|---:|---:|---:|---:|")
    for top in (int(t) for t in args.top.split(",")):
        inside = rank[ids] < top
        hits = inside.sum(dim=1)
        print(f"| {top:,} | {inside.float().mean():.1%} | {(hits == len(names)).float().mean():.1%} | "
              f"{(hits >= most).float().mean():.1%} | {(hits >= half).float().mean():.1%} | "
              f"{float(counts[order[min(top, order.numel()) - 1]]) * per_epoch:,.0f} |")


if __name__ == "__main__":
    main()
