"""lightning-skew: fast recommendation-model training on skewed data, as PyTorch Lightning parts on TorchRec."""

from lightning_skew.core.divergence import NonFiniteLossStop
from lightning_skew.core.monitor import SamplesPerSecond
from lightning_skew.core.rowsets import RowSet
from lightning_skew.core.upstream import quiet_upstream_warnings
from lightning_skew.data import (
    ColumnarDataModule,
    CriteoDataModule,
    RecDataModule,
    Sessions,
    SyntheticDataModule,
)
from lightning_skew.dedup import DedupDataModule
from lightning_skew.hotcold import HotColdStrategy, PlainHotColdPlacement, place_hot_cold
from lightning_skew.models import DLRMModule
from lightning_skew.popularity import PopularityBatch, PopularityDataModule
from lightning_skew.profile import AccessProfile, GivenRows, HotSetSource, LookedUpRows, ProfiledHotRows
from lightning_skew.stale import RepackedDataModule, StaleEmbeddingSkipper
from lightning_skew.torchrec import TorchRecStrategy

__version__ = "0.1.0"


def _register_strategies() -> None:
    """``Trainer(strategy="torchrec")`` and ``strategy: torchrec`` in YAML (``hot_cold`` needs a budget)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for strategy in (TorchRecStrategy, HotColdStrategy):
        if strategy.strategy_name not in StrategyRegistry:
            StrategyRegistry.register(strategy.strategy_name, strategy, description=strategy.__doc__.split("\n")[0])


_register_strategies()
quiet_upstream_warnings()

__all__ = [
    "AccessProfile",
    "ColumnarDataModule",
    "CriteoDataModule",
    "DLRMModule",
    "DedupDataModule",
    "GivenRows",
    "HotColdStrategy",
    "HotSetSource",
    "LookedUpRows",
    "NonFiniteLossStop",
    "PlainHotColdPlacement",
    "PopularityBatch",
    "PopularityDataModule",
    "ProfiledHotRows",
    "RecDataModule",
    "RepackedDataModule",
    "RowSet",
    "SamplesPerSecond",
    "Sessions",
    "StaleEmbeddingSkipper",
    "SyntheticDataModule",
    "TorchRecStrategy",
    "place_hot_cold",
]
