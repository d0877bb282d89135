"""Popularity batching: hot-only and cold batches (FAE), interleaved, or hot/cold micro-batches (Hotline)."""

from lightning_skew.popularity.datamodule import PopularityBatch, PopularityDataModule

__all__ = ["PopularityBatch", "PopularityDataModule"]
