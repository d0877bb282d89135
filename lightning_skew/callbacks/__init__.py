"""Lightning callbacks of lightning-skew."""

from lightning_skew.callbacks.monitor import SamplesPerSecond

__all__ = ["SamplesPerSecond"]
