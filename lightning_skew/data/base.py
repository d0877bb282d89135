"""The contract every lightning-skew DataModule keeps: torchrec Batches and the shape of their features."""

from __future__ import annotations

from abc import abstractmethod

import lightning.pytorch as pl
from torchrec.datasets.utils import Batch

from lightning_skew.core.distributed import rank, world_size

__all__ = ["Batch", "RecDataModule", "WrappedDataModule"]


class RecDataModule(pl.LightningDataModule):
    """A DataModule whose loaders yield :class:`torchrec.datasets.utils.Batch` objects.

    A batch holds ``dense_features`` (float, ``[B, dense_in_features]``), ``sparse_features`` (a
    ``KeyedJaggedTensor`` with one key per entry of :attr:`sparse_feature_names`, IDs in
    ``[0, num_embeddings_per_feature[i])``) and ``labels`` (float 0/1, ``[B]``).

    Models read the feature shapes from these properties (LightningCLI links them), so that table
    sizes are written once, in the data's configuration.
    """

    @property
    @abstractmethod
    def dense_in_features(self) -> int:
        """Number of dense (continuous) features per input."""

    @property
    @abstractmethod
    def sparse_feature_names(self) -> list[str]:
        """Names of the sparse (categorical) features, in KeyedJaggedTensor key order."""

    @property
    @abstractmethod
    def num_embeddings_per_feature(self) -> list[int]:
        """Rows of the embedding table of each sparse feature, in the order of the names."""

    @property
    def missing_rows(self) -> dict[str, int]:
        """Per feature, the row that stands for a missing value (Criteo hashes an empty field to row 0), so that
        profiles can show missing values apart from popular rows. Empty: no feature has one."""
        return {}

    @property
    def unwrapped(self) -> RecDataModule:
        """The DataModule whose data this one delivers: itself; a wrapper (popularity batching, repacking) gives
        the module it wraps, so profiles and hot sets describe the data, not the wrappers around it."""
        return self

    def predict_dataloader(self):
        """Predictions are made for the test split (``lightning-skew predict`` scores it)."""
        return self.test_dataloader()

    def rank_and_world_size(self) -> tuple[int, int]:
        """This process's rank and the world size: the Trainer's when attached, else torch.distributed's, else 0/1."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return rank(), world_size()


class WrappedDataModule(RecDataModule):
    """A :class:`RecDataModule` that wraps another and changes only how its training batches arrive.

    Feature shapes, preparation, validation, test and predict loaders are the inner module's; subclasses
    (popularity batching, repacking) override :meth:`train_dataloader`. :attr:`unwrapped` is the innermost data.
    """

    def __init__(self, datamodule: RecDataModule) -> None:
        super().__init__()
        self.datamodule = datamodule

    @property
    def dense_in_features(self) -> int:
        return self.datamodule.dense_in_features

    @property
    def sparse_feature_names(self) -> list[str]:
        return self.datamodule.sparse_feature_names

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return self.datamodule.num_embeddings_per_feature

    @property
    def missing_rows(self) -> dict[str, int]:
        return self.datamodule.missing_rows

    @property
    def unwrapped(self) -> RecDataModule:
        return self.datamodule.unwrapped

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        self.datamodule.teardown(stage)

    def val_dataloader(self):
        return self.datamodule.val_dataloader()

    def test_dataloader(self):
        return self.datamodule.test_dataloader()

    def predict_dataloader(self):
        return self.datamodule.predict_dataloader()
