"""Deduplicated features (RecD): a session's repeated user-level bags looked up and pooled once per batch."""

from lightning_skew.dedup.datamodule import DedupDataModule, DedupingCollate
from lightning_skew.dedup.factors import DedupFactors
from lightning_skew.dedup.lookups import dedup_batch, dedup_factors, distinct_inputs, split_deduped
from lightning_skew.dedup.shuffled import ShuffledWindows

__all__ = ["DedupDataModule", "DedupFactors", "DedupingCollate", "ShuffledWindows", "dedup_batch", "dedup_factors", "distinct_inputs", "split_deduped"]
