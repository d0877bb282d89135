"""Lightning callbacks of lightning-skew."""

from lightning_skew.callbacks.monitor import SamplesPerSecond
from lightning_skew.callbacks.stale import StaleEmbeddingSkipper

__all__ = ["SamplesPerSecond", "StaleEmbeddingSkipper"]
