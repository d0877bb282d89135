"""Where dedup's time goes on this machine: the host pass per batch, the model's own step with and without dedup,
and what one history table costs per batch with uniform IDs, whole and deduplicated. The figures of docs/benchmarks.md §9 and docs/dedup.md.

    .venv/bin/python scripts/dedup_costs.py           # both measurements
"""

from __future__ import annotations

import itertools
import statistics
import time

import lightning.pytorch as pl
import torch

from lightning_skew import TorchRecStrategy
from lightning_skew.bench import build_recipe

CACHED_BATCHES = 40


class _StepEnds(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


class _Replay:
    """The same cached batches for every step: the model's step without data generation or dedup's host pass."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def model_step_ms(recipe: str, samples_arg: str) -> float:
    """Median step (ms) of the recipe's model on cached batches, after 5 steps of warm-up."""
    built = build_recipe(["--config", recipe, samples_arg, "65536"])
    built.datamodule.setup("fit")
    batches = list(itertools.islice(iter(built.datamodule.train_dataloader()), CACHED_BATCHES))
    ends = _StepEnds()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[ends])
    trainer.fit(built.model, train_dataloaders=_Replay(batches))
    return statistics.median(b - a for a, b in zip(ends.ends[5:], ends.ends[6:], strict=False)) * 1e3


def host_pass_ms(features: tuple[str, ...] = ("user_id", "history")) -> float:
    """``dedup_batch`` on batches of the session recipe (ms per batch, 10th percentile of 90 calls)."""
    from lightning_skew.dedup import dedup_batch

    built = build_recipe(["--config", "recipes/dlrm_synthetic_sessions.yaml",
                          "--data.init_args.num_train_samples", "65536"])
    built.datamodule.setup("fit")
    batches = list(itertools.islice(iter(built.datamodule.train_dataloader()), 6))
    times = []
    for _ in range(15):
        for batch in batches:
            began = time.perf_counter()
            dedup_batch(batch, features)
            times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 10] * 1e3


def table_ms(lengths: torch.Tensor, rows: int = 100_000, dim: int = 16, repeats: int = 30) -> float:
    """Forward + backward (row-wise Adagrad) of one FBGEMM CPU table, uniform IDs, bags of ``lengths`` (ms)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    table = SplitTableBatchedEmbeddingBagsCodegen([(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                  optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05)
    ids = torch.randint(0, rows, (int(lengths.sum()),))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        table(ids, offsets).sum().backward()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 4] * 1e3


def main() -> None:
    print(f"host pass (dedup_batch), session recipe: {host_pass_ms():.2f} ms per batch of 2048")
    base = model_step_ms("recipes/dlrm_synthetic_sessions.yaml", "--data.init_args.num_train_samples")
    dedup = model_step_ms("recipes/dlrm_synthetic_dedup.yaml", "--data.init_args.datamodule.init_args.num_train_samples")
    print(f"model step on cached batches: {base:.1f} ms without dedup, {dedup:.1f} ms with it ({base / dedup:.3f}x)")
    batch, history = 2048, 35
    deduped = torch.zeros(batch, dtype=torch.long)
    deduped[: batch // 10] = history  # one distinct bag in ten, the others empty
    print(f"one history table, uniform IDs: {table_ms(torch.full((batch,), history)):.2f} ms per batch, "
          f"{table_ms(deduped):.2f} ms deduplicated")


if __name__ == "__main__":
    main()
