"""Stale-embedding skipping (Slipstream): find rows that stopped moving and skip the inputs that only touch them."""

from lightning_skew.stale.repack import RepackedDataModule, RepackedLoader
from lightning_skew.stale.skipper import StaleEmbeddingSkipper

__all__ = ["RepackedDataModule", "RepackedLoader", "StaleEmbeddingSkipper"]
