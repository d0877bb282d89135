"""DataModules that yield torchrec Batches: the shared contract, synthetic click logs, the Criteo files."""

from lightning_skew.data.base import Batch, RecDataModule
from lightning_skew.data.criteo import CriteoDataModule
from lightning_skew.data.synthetic import SyntheticDataModule

__all__ = ["Batch", "CriteoDataModule", "RecDataModule", "SyntheticDataModule"]
