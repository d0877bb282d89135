"""Lightning strategies that run TorchRec sharding, and the plain-PyTorch hot/cold placement beside them."""

from lightning_skew.strategies.hotcold import HotColdStrategy
from lightning_skew.strategies.plain_hot_cold import PlainHotColdEmbeddingBagCollection, place_hot_cold
from lightning_skew.strategies.torchrec import TorchRecStrategy

__all__ = ["HotColdStrategy", "PlainHotColdEmbeddingBagCollection", "TorchRecStrategy", "place_hot_cold"]
