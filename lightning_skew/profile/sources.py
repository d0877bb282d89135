"""ProfiledHotRows: a hot-set source that cuts a DataModule's hot rows from a saved or fresh access profile."""

from __future__ import annotations

from lightning_skew.core.rowsets import RowSet
from lightning_skew.data.base import RecDataModule
from lightning_skew.profile.access import AccessProfile
from lightning_skew.profile.loader import profile_dataloader

__all__ = ["ProfiledHotRows"]


class ProfiledHotRows:
    """The hot rows of a DataModule's training data under a byte budget, from an :class:`AccessProfile`.

    A :class:`~lightning_skew.popularity.datamodule.HotSetSource`: give it to ``PopularityDataModule(hot_rows=...)``
    (in YAML as ``class_path: lightning_skew.profile.ProfiledHotRows``). It reads a saved profile (checked
    against the data's tables and description) or profiles the training data itself, merges the counts of all
    ranks, and cuts the hot set with :meth:`AccessProfile.hot_rows`.

    Args:
        budget_bytes: fast-memory budget for hot rows (weights plus optimizer state).
        profile_path: a file written by ``lightning-skew profile`` or :meth:`AccessProfile.save`; ``None``
            profiles the training data in ``setup``.
        embedding_dim: width of every row.
        optimizer: embedding optimizer whose state counts against the budget (see :func:`row_bytes`).
        mode: ``global`` (FAE's cut across all tables), ``proportional`` or ``equal``.
        sample_fraction: share of batches counted when profiling here (FAE profiles 5%).
        seed: sampling seed.

    Example::

        PopularityDataModule(SyntheticDataModule(), hot_rows=ProfiledHotRows(budget_bytes=8_000_000))
    """

    def __init__(self, budget_bytes: int, profile_path: str | None = None, embedding_dim: int = 16,
                 optimizer: str = "rowwise_adagrad", mode: str = "global", sample_fraction: float = 0.05,
                 seed: int = 0) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.profile_path = profile_path
        self.embedding_dim = embedding_dim
        self.optimizer = optimizer
        self.mode = mode
        self.sample_fraction = sample_fraction
        self.seed = seed
        self.profile: AccessProfile | None = None

    def hot_rows(self, datamodule: RecDataModule) -> RowSet:
        if self.profile_path is not None:
            self.profile = AccessProfile.load(self.profile_path, datamodule=datamodule)
        else:
            profile = AccessProfile.for_datamodule(datamodule, sample_fraction=self.sample_fraction, seed=self.seed,
                                                   sample_by="batches")
            self.profile = profile_dataloader(profile, datamodule.train_dataloader(), progress=False).all_reduce()
        return self.profile.hot_rows(self.budget_bytes, embedding_dim=self.embedding_dim,
                                     optimizer=self.optimizer, mode=self.mode)
