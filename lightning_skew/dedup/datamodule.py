"""DedupDataModule: wraps any DataModule so that its batches send the named features once per distinct bag."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_skew.core.batch import Batch
from lightning_skew.core.decisions import deduped_lookups, require_decisions
from lightning_skew.core.deduped import DedupedLookups
from lightning_skew.data.base import RecDataModule, WrappedDataModule
from lightning_skew.dedup.lookups import dedup_batch

__all__ = ["DedupDataModule", "DedupingCollate"]


class DedupingCollate:
    """A DataLoader ``collate_fn`` that deduplicates ``features`` of each batch after the loader's own collate:
    with ``num_workers > 0`` the work runs in the DataLoader's worker processes."""

    def __init__(self, collate: Any, features: Sequence[str], consecutive: bool = True) -> None:
        self.collate, self.features, self.consecutive = collate, tuple(features), consecutive

    def __call__(self, item: Any) -> Any:
        batch = item if self.collate is None else self.collate(item)
        return dedup_batch(batch, self.features, self.consecutive) if isinstance(batch, Batch) else batch


class _DedupingIterable:
    """Deduplicates the batches of a loader that is not a torch DataLoader (in the process that iterates it)."""

    def __init__(self, loader: Any, features: Sequence[str], consecutive: bool) -> None:
        self.loader, self.features, self.consecutive = loader, tuple(features), consecutive

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield dedup_batch(batch, self.features, self.consecutive) if isinstance(batch, Batch) else batch

    def __len__(self) -> int:
        return len(self.loader)


class DedupDataModule(WrappedDataModule):
    """Wraps a :class:`~lightning_skew.data.base.RecDataModule` so that in each batch the bags of the named
    features (user-level features, which repeat over the samples of a session) are sent once per distinct
    combination, with inverse indices (a :class:`~lightning_skew.core.deduped.DedupedLookups` on the batch's
    ``deduped``), RecD's inverse-keyed form.

    The model looks each distinct bag up and pools it once and expands the pooled rows with the inverse indices
    (:class:`~lightning_skew.models.DLRMModule` does; a model that does not declare ``deduped`` in its
    ``honoured_batch_decisions`` is refused at setup). Training computes what it computes without dedup (the
    same losses and updates up to floating-point summation order). The distinct bags are found on the host, in
    the DataLoader's collate step (in its worker processes with ``num_workers > 0``), exactly (ID by ID).

    Args:
        datamodule: the DataModule to wrap.
        features: the features to deduplicate, together: a batch's distinct bags are its distinct combinations
            of these features' bags (name the features that are constant within a session, e.g. the user ID and
            the user's history). Their embedding tables should be used by these features only.
        splits: which loaders deduplicate (``train``, ``val``, ``test``, ``predict``).
        consecutive: share a bag only between neighbouring inputs (a session's samples, which follow each other;
            RecD's assumption, one pass over the IDs); ``False`` merges equal bags anywhere in the batch (found by
            a hash, then checked ID by ID), which also merges a user's sessions that meet in one batch, at about
            twice the host time.

    .. note::
        It must be the outermost DataModule wrapper: parts that regroup or filter batches by their lookups
        (:class:`~lightning_skew.popularity.PopularityDataModule`, :class:`~lightning_skew.RepackedDataModule`)
        go inside it, so they see every lookup. The in-step :class:`~lightning_skew.StaleEmbeddingSkipper`
        (``repack=False``) and TorchRecStrategy's ``pipeline`` are refused at setup.

    Example (YAML)::

        data:
          class_path: lightning_skew.DedupDataModule
          init_args:
            datamodule: {class_path: lightning_skew.data.SyntheticDataModule, init_args: {sessions: {}}}
            features: [user_id, history]
    """

    def __init__(self, datamodule: RecDataModule, features: list[str],
                 splits: Sequence[str] = ("train", "val", "test"), consecutive: bool = True) -> None:
        super().__init__(datamodule)
        if not features or len(set(features)) != len(features):
            raise ValueError(f"DedupDataModule: features must name distinct sparse features, got {features}")
        unknown = [name for name in features if name not in self.datamodule.sparse_feature_names]
        if unknown:
            raise ValueError(f"DedupDataModule: features {unknown} are not sparse features of "
                             f"{type(self.datamodule.unwrapped).__name__} ({self.datamodule.sparse_feature_names})")
        bad = sorted(set(splits) - {"train", "val", "test", "predict"})
        if bad:
            raise ValueError(f"DedupDataModule: splits must be among train, val, test, predict; got {bad}")
        self.features = list(features)
        self.splits = tuple(splits)
        self.consecutive = consecutive

    def describe(self) -> str:
        return f"DedupDataModule(features={self.features})"

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        trainer = self.trainer
        if trainer is None:
            return
        if trainer.datamodule is not None and trainer.datamodule is not self:
            raise MisconfigurationException(
                f"{self.describe()} is wrapped by {type(trainer.datamodule).__name__}, which would regroup or filter "
                "batches whose deduplicated features it cannot see; make DedupDataModule the outermost wrapper")
        if trainer.lightning_module is not None:
            require_decisions(trainer.lightning_module, ["deduped"], self.describe())
        from lightning_skew.stale.skipper import StaleEmbeddingSkipper

        for callback in trainer.callbacks:
            if isinstance(callback, StaleEmbeddingSkipper) and not callback.repack:
                raise MisconfigurationException(
                    f"{self.describe()} with StaleEmbeddingSkipper(repack=False): the skipper drops inputs inside "
                    "the step by the lookups of sparse_features, where the deduplicated features are not; use "
                    "StaleEmbeddingSkipper(repack=True) with lightning_skew.RepackedDataModule inside "
                    "DedupDataModule (it decides on whole batches before they are deduplicated)")
        pipeline = getattr(trainer.strategy, "pipeline", None)
        if pipeline is not None:
            raise MisconfigurationException(
                f"{self.describe()} with {type(trainer.strategy).__name__}(pipeline={pipeline!r}): the pipeline "
                "distributes each batch's sparse_features ahead of the step and runs one lookup per step, but "
                "deduplicated bags are a second lookup; use pipeline=None")

    def _deduped(self, loader: Any) -> Any:
        if isinstance(loader, DataLoader):
            # A fresh loader each call, not yet iterated: its collate step (workers included) deduplicates.
            loader.collate_fn = DedupingCollate(loader.collate_fn, self.features, self.consecutive)
            return loader
        return _DedupingIterable(loader, self.features, self.consecutive)

    def _loader(self, split: str, loader: Any) -> Any:
        if split not in self.splits:
            return loader
        if isinstance(loader, (list, tuple)):
            return type(loader)(self._deduped(one) for one in loader)
        return self._deduped(loader)

    def train_dataloader(self) -> Any:
        return self._loader("train", self.datamodule.train_dataloader())

    def val_dataloader(self) -> Any:
        return self._loader("val", self.datamodule.val_dataloader())

    def test_dataloader(self) -> Any:
        return self._loader("test", self.datamodule.test_dataloader())

    def predict_dataloader(self) -> Any:
        return self._loader("predict", self.datamodule.predict_dataloader())

    def check_ids(self, batch: Any) -> Any:
        """The data's ID check on the batch and on its distinct bags (both forms)."""
        batch = super().check_ids(batch)
        deduped = deduped_lookups(batch)
        if deduped is None:
            return batch
        forms = [deduped.bags] + ([] if deduped.merged is None else [deduped.merged])
        checked = [super(DedupDataModule, self).check_ids(Batch(batch.dense_features, form, batch.labels))
                   .sparse_features for form in forms]
        if all(new is old for new, old in zip(checked, forms, strict=True)):
            return batch
        return dataclasses.replace(batch, deduped=DedupedLookups(
            checked[0], deduped.inverse, deduped.features, checked[1] if len(checked) > 1 else None))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)
