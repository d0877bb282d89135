"""Where hot/cold placement's time goes when both parts share one memory (CPU): the model's step on the same cached
batches under plain TorchRec sharding and under each hot/cold layout (``separate``: two sharded collections; ``fused``:
one; ``stacked``: one, a split table's hot slots and cold shard in one table), the steps of all four interleaved so that the machine's drift hits all alike; then the routing of one batch and the
sum of each feature's hot and cold pooled parts, alone. The figures of docs/benchmarks.md §6.

    .venv/bin/python scripts/hot_cold_costs.py          # default recipe, 8 MB of hot rows
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from lightning_skew.bench import build_recipe
from lightning_skew.bench.runner import dense_optimizer, ensure_process_group
from lightning_skew.core.lookups import count_lookups, top_rows
from lightning_skew.hotcold.collection import HotColdEmbeddingBagCollection, table_specs
from lightning_skew.hotcold.planning import bytes_per_row, embedding_bag_collections, place_collections
from lightning_skew.hotcold.routing import route_batch, routed_batch_step
from lightning_skew.hotcold.state import hot_cold_collections
from lightning_skew.torchrec.sharding import shard_module

RECIPE = ["--config", "recipes/dlrm_synthetic.yaml", "--data.init_args.num_train_samples", str(2048 * 48)]
BUDGET_BYTES = 8_000_000
CACHED_BATCHES, WARMUP, ROUNDS = 40, 5, 3


def _build(layout: str):
    """The recipe's model sharded as ``layout`` says (``plain`` or a hot/cold layout), its dense optimizer, its
    hot/cold collections, and its DataModule."""
    built = build_recipe(RECIPE)
    module, data = built.model, built.datamodule
    data.setup("fit")
    if layout != "plain":
        found = embedding_bag_collections(module)
        sizes = bytes_per_row(module, [spec for _, ebc in found for spec in table_specs(ebc)])
        counts = None
        for _, batch in zip(range(4), data.train_dataloader(), strict=False):  # a profile of 4 batches
            counts = count_lookups(batch.sparse_features, data.sparse_feature_names, data.num_embeddings_per_feature,
                                   counts)
        rows_fit = BUDGET_BYTES // max(sizes)
        hot = top_rows(counts, data.sparse_feature_names, rows_fit)
        place_collections(module, found, hot, BUDGET_BYTES, sizes,
                          lambda ebc, part: HotColdEmbeddingBagCollection(ebc, part, layout))
    dmp = shard_module(module, torch.device("cpu"))
    dmp.train()
    return dmp, dense_optimizer(module.configure_optimizers()), hot_cold_collections(module), data


def model_steps_ms() -> dict[str, float]:
    """Median step (ms) of each layout over the same cached batches, the layouts' steps interleaved."""
    ensure_process_group()
    layouts = {name: _build(name) for name in ("plain", "separate", "fused", "stacked")}
    data = layouts["plain"][3]
    batches = [batch for _, batch in zip(range(CACHED_BATCHES), data.train_dataloader(), strict=False)]
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(ROUNDS):
        for batch in batches:
            for name, (dmp, optimizer, collections, _) in layouts.items():
                began = time.perf_counter()
                routed = route_batch(collections, batch) if collections else batch
                with routed_batch_step(collections, routed):
                    loss = F.binary_cross_entropy_with_logits(dmp(routed), routed.labels.float())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                times[name].append(time.perf_counter() - began)
    return {name: statistics.median(spent[WARMUP:]) * 1e3 for name, spent in times.items()}


def routing_ms(layout: str) -> float:
    """Routing one batch ahead of the step (ms, median of 60 calls) for ``layout``."""
    _, _, collections, data = _build(layout)
    batch = next(iter(data.train_dataloader()))
    spent = []
    for _ in range(60):
        began = time.perf_counter()
        route_batch(collections, batch)
        spent.append(time.perf_counter() - began)
    return statistics.median(spent[10:]) * 1e3


def combine_ms(batch_size: int = 2048, dim: int = 16, split: int = 18, hot_only: int = 5, cold_only: int = 3
               ) -> float:
    """Forward and backward (ms) of summing each feature's hot and cold pooled parts as the collection does (one
    ``index_add`` over blocks of ``dim`` columns), for ``split`` split tables and some wholly hot or cold ones."""
    features = split + hot_only + cold_only
    order = list(range(split + hot_only)) + list(range(split)) + list(range(split + hot_only, features))
    index = torch.tensor(order)
    parts = torch.randn(batch_size, len(order) * dim, requires_grad=True)
    grad = torch.ones(batch_size, features * dim)
    spent = []
    for _ in range(60):
        began = time.perf_counter()
        out = parts.new_zeros(batch_size, features, dim).index_add(1, index, parts.view(batch_size, -1, dim))
        out.view(batch_size, -1).backward(grad)
        spent.append(time.perf_counter() - began)
    return statistics.median(spent[10:]) * 1e3


if __name__ == "__main__":
    steps = model_steps_ms()
    print("model step on cached batches (median ms): " + ", ".join(
        f"{name} {ms:.2f} ({steps['plain'] / ms:.3f}x of plain)" for name, ms in steps.items()))
    print("routing one batch (median ms): " + ", ".join(f"{layout} {routing_ms(layout):.2f}"
                                                      for layout in ("separate", "stacked")))
    print(f"summing the hot and cold parts, separate and fused layouts (forward + backward): {combine_ms():.2f} ms")
