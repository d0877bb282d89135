"""DataModules that yield torchrec Batches: synthetic click logs, the Criteo files, popularity batching."""

from lightning_skew.data.base import Batch, RecDataModule
from lightning_skew.data.criteo import CriteoDataModule
from lightning_skew.data.popularity import PopularityBatch, PopularityDataModule
from lightning_skew.data.synthetic import SyntheticDataModule

__all__ = ["Batch", "CriteoDataModule", "PopularityBatch", "PopularityDataModule", "RecDataModule",
           "SyntheticDataModule"]
