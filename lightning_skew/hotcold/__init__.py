"""Hot/cold placement (FAE): popular rows in fast memory, the rest in host memory, rebalanced as popularity drifts."""

from lightning_skew.hotcold.plain import PlainHotColdEmbeddingBagCollection, place_hot_cold
from lightning_skew.hotcold.plain_callback import PlainHotColdPlacement
from lightning_skew.hotcold.strategy import HotColdStrategy

__all__ = ["HotColdStrategy", "PlainHotColdEmbeddingBagCollection", "PlainHotColdPlacement", "place_hot_cold"]
