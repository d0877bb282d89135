"""Lightning callbacks of lightning-skew."""

from lightning_skew.callbacks.hot_cold_placement import PlainHotColdPlacement
from lightning_skew.callbacks.monitor import SamplesPerSecond
from lightning_skew.callbacks.stale import StaleEmbeddingSkipper

__all__ = ["PlainHotColdPlacement", "SamplesPerSecond", "StaleEmbeddingSkipper"]
