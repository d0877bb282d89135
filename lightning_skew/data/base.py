"""The contract every lightning-skew DataModule keeps: torchrec Batches and the shape of their features."""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from torchrec.datasets.utils import Batch

from lightning_skew.core.distributed import rank, world_size
from lightning_skew.core.id_ranges import OutOfRangeIds, TableBounds, batch_source, check_policy, model_bounds

log = logging.getLogger(__name__)

__all__ = ["Batch", "RecDataModule", "WrappedDataModule"]


class RecDataModule(pl.LightningDataModule):
    """A DataModule whose loaders yield :class:`torchrec.datasets.utils.Batch` objects.

    A batch holds ``dense_features`` (float, ``[B, dense_in_features]``), ``sparse_features`` (a
    ``KeyedJaggedTensor`` with one key per entry of :attr:`sparse_feature_names`, IDs in
    ``[0, num_embeddings_per_feature[i])``) and ``labels`` (float 0/1, ``[B]``).

    Models read the feature shapes from these properties (LightningCLI links them), so that table
    sizes are written once, in the data's configuration.

    **IDs out of range.** Every batch's sparse IDs are checked on the host, before the batch moves to its device,
    against the tables the Trainer's LightningModule holds (:func:`~lightning_skew.core.id_ranges.model_bounds`: its
    TorchRec collections, sharded or hot/cold; the sizes declared here when the model shows none): one vectorized
    comparison per batch, nothing on the device. By default (``out_of_range_ids="error"``) a batch with an ID below
    0 or at or past its table's size raises a ``ValueError`` naming the feature, the table, its size and the ID,
    whatever the strategy: FBGEMM's kernels would instead map the ID to row 0 and train on, and plain embedding
    bags would fail without naming the feature. ``out_of_range_ids="clamp"`` maps such IDs to row 0 instead,
    counts them per feature (:attr:`clamped_ids`), logs a warning the first time a feature has one and a summary
    at ``teardown``. (Lightning-skew's strategies run the same check for any DataModule; a batch is compared
    once.)

    Args:
        out_of_range_ids: ``"error"`` or ``"clamp"``; ``None`` keeps the class default (``"error"``).
            Subclasses that expose it to YAML take the argument and pass it on
            (``super().__init__(out_of_range_ids=out_of_range_ids)``); from Python it is also an attribute.

    .. note::
        Only ``trainer.datamodule`` receives Lightning's hooks, so the check runs once per batch on whichever
        module that is: a :class:`WrappedDataModule` checks with its inner module's setting.
        Subclasses that override ``on_before_batch_transfer`` call ``super()``; a LightningModule's own
        ``on_before_batch_transfer`` still runs, after the check (Lightning warns that the DataModule's hook
        is used: it calls the module's).
    """

    _out_of_range_ids: str = "error"

    def __init__(self, out_of_range_ids: str | None = None) -> None:
        super().__init__()
        if out_of_range_ids is not None:
            self.out_of_range_ids = out_of_range_ids
        self.clamped_ids: dict[str, int] = {}

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

    @property
    def out_of_range_ids(self) -> str:
        """What a batch with IDs outside their tables does: ``"error"`` or ``"clamp"`` (see the class notes)."""
        return self._out_of_range_ids

    @out_of_range_ids.setter
    def out_of_range_ids(self, policy: str) -> None:
        self._out_of_range_ids = check_policy(policy)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = self.check_ids(batch)
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None and is_overridden("on_before_batch_transfer", model):
            batch = model.on_before_batch_transfer(batch, dataloader_idx)
        return batch

    def check_ids(self, batch: Any) -> Any:
        """``batch`` when all its sparse IDs lie in their tables; else an error, or (``"clamp"``) the batch with
        those IDs on row 0. The tables are the Trainer's LightningModule's
        (:func:`~lightning_skew.core.id_ranges.model_bounds`); without a Trainer, or for a model in which no table
        is found, the sizes this DataModule declares. Batches without a ``KeyedJaggedTensor`` of
        ``sparse_features`` pass unchecked."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        bounds = model_bounds(model) if model is not None else None
        if not bounds:
            bounds = TableBounds({f: (None, n) for f, n in zip(self.sparse_feature_names,
                                                                self.num_embeddings_per_feature, strict=True)})
        return bounds.check(batch, lambda: batch_source(self.trainer) if self.trainer is not None
                            else type(self).__name__, self.out_of_range_ids, self._count_clamped)

    def _count_clamped(self, found: list[OutOfRangeIds]) -> None:
        clamped = self.clamped_ids
        for bad in found:
            if bad.feature not in clamped:
                log.warning("%s (rank %d): clamping to row 0: %s; further ones are counted in clamped_ids",
                            type(self).__name__, self.rank_and_world_size()[0], bad.describe())
            clamped[bad.feature] = clamped.get(bad.feature, 0) + bad.count

    def _report_clamped_ids(self) -> None:
        clamped = self.clamped_ids
        if clamped:
            log.warning("%s (rank %d): clamped %d out-of-range IDs to row 0 so far: %s", type(self).__name__,
                        self.rank_and_world_size()[0], sum(clamped.values()), clamped)

    def teardown(self, stage: str | None = None) -> None:
        self._report_clamped_ids()

    def rank_and_world_size(self) -> tuple[int, int]:
        """This process's rank and the world size: the Trainer's when attached, else torch.distributed's, else 0/1."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return rank(), world_size()


class WrappedDataModule(RecDataModule):
    """A :class:`RecDataModule` that wraps another and changes only how its training batches arrive.

    Feature shapes, preparation, validation, test and predict loaders are the inner module's; subclasses
    (popularity batching, repacking) override :meth:`train_dataloader`. :attr:`unwrapped` is the innermost data.
    So is :attr:`out_of_range_ids` (the data's setting, read and set through the wrapper): as
    ``trainer.datamodule`` the wrapper checks every batch once, with the inner module's sizes.
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
    def out_of_range_ids(self) -> str:
        return self.datamodule.out_of_range_ids

    @out_of_range_ids.setter
    def out_of_range_ids(self, policy: str) -> None:
        self.datamodule.out_of_range_ids = policy

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
        self._report_clamped_ids()

    def val_dataloader(self):
        return self.datamodule.val_dataloader()

    def test_dataloader(self):
        return self.datamodule.test_dataloader()

    def predict_dataloader(self):
        return self.datamodule.predict_dataloader()
