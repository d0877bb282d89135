"""Lightning strategies that run TorchRec sharding."""

from lightning_skew.strategies.hotcold import HotColdStrategy
from lightning_skew.strategies.torchrec import TorchRecStrategy

__all__ = ["HotColdStrategy", "TorchRecStrategy"]
