"""lightning-skew: fast recommendation-model training on skewed data, as PyTorch Lightning parts on TorchRec."""

from lightning_skew.callbacks import SamplesPerSecond, StaleEmbeddingSkipper
from lightning_skew.data import CriteoDataModule, PopularityDataModule, RecDataModule, SyntheticDataModule
from lightning_skew.models import DLRMModule
from lightning_skew.profile import AccessProfile
from lightning_skew.rowsets import RowSet
from lightning_skew.strategies import HotColdStrategy, TorchRecStrategy

__version__ = "0.1.0"

__all__ = [
    "AccessProfile",
    "CriteoDataModule",
    "DLRMModule",
    "HotColdStrategy",
    "PopularityDataModule",
    "RecDataModule",
    "RowSet",
    "SamplesPerSecond",
    "StaleEmbeddingSkipper",
    "SyntheticDataModule",
    "TorchRecStrategy",
]
