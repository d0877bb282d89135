"""DataModules that yield torchrec Batches: the shared contract, synthetic click logs, the Criteo files, columnar
data of any shape."""

from lightning_skew.data.base import Batch, RecDataModule
from lightning_skew.data.columnar import ColumnarDataModule
from lightning_skew.data.criteo import CriteoDataModule
from lightning_skew.data.synthetic import Sessions, SyntheticDataModule

__all__ = ["Batch", "ColumnarDataModule", "CriteoDataModule", "RecDataModule", "Sessions", "SyntheticDataModule"]
