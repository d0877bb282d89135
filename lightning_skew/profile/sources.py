"""Where a hot set comes from: one kind of source, resolved once per data set and shared by every part."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch.utilities import rank_zero_warn

from lightning_skew.core.rowsets import RowSet
from lightning_skew.data.base import RecDataModule
from lightning_skew.data.position import ResumingLoader
from lightning_skew.profile.access import AccessProfile
from lightning_skew.profile.loader import profile_dataloader

__all__ = ["HotSetSource", "ProfiledHotRows", "check_source_arguments", "profiled_data", "resolve_hot_rows"]

# Resolved profiles by (source arguments, data), so that every part asking with an equal source within a fit
# (and later fits of the same data in this process) gets the same profile from one pass. A few entries only.
_RESOLVED: OrderedDict[tuple, AccessProfile] = OrderedDict()
_RESOLVED_MAX = 4


def check_source_arguments(budget_bytes: int, sample_fraction: float) -> None:
    """The arguments every part that builds a source takes: a positive integer budget, a share in (0, 1]."""
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
    if not 0 < sample_fraction <= 1:
        raise ValueError(f"sample_fraction must lie in (0, 1], got {sample_fraction}")


def profiled_data(datamodule: Any) -> Any:
    """The DataModule whose data a wrapper delivers (wrappers regroup or filter batches, the data stays)."""
    return getattr(datamodule, "unwrapped", datamodule)


def _data_key(datamodule: Any) -> str:
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    description = {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", "hparams": hparams,
                   "features": list(datamodule.sparse_feature_names),
                   "rows": list(datamodule.num_embeddings_per_feature)}
    return json.dumps(description, sort_keys=True, default=repr)


@runtime_checkable
class HotSetSource(Protocol):
    """Anything that picks the hot rows of a DataModule's training data (an access profile, a file reader).

    It should decide the same set on every rank (reduce its counts first); :class:`PopularityDataModule`
    uses rank 0's answer on all ranks whatever it returns.
    """

    def hot_rows(self, datamodule: RecDataModule) -> RowSet: ...


class ProfiledHotRows:
    """The hot rows of a DataModule's training data under a byte budget, from an :class:`AccessProfile`.

    The one kind of hot-set source every part takes (``PopularityDataModule(hot_rows=...)``,
    ``HotColdStrategy(hot_rows=...)``, ``StaleEmbeddingSkipper(hot_rows=...)``, ``PlainHotColdPlacement``;
    in YAML ``class_path: lightning_skew.ProfiledHotRows``). It reads a saved profile (checked against the data's
    tables and description) or profiles the training data itself, merges the counts of all ranks, and cuts the
    hot set with :meth:`AccessProfile.hot_rows`. Wrappers around the data (popularity batching, repacking) are
    seen through: the profile describes the data, not the wrapper.

    Equal sources (the same arguments) asked about the same data share one profile: a fit whose DataModule,
    strategy and callbacks each name this source profiles once (in YAML, repeat the block or use an anchor).

    Args:
        budget_bytes: fast-memory budget for hot rows (weights plus optimizer state).
        profile_path: a file written by ``lightning-skew profile`` or :meth:`AccessProfile.save`; ``None``
            profiles the training data when first asked.
        embedding_dim: width of every row.
        optimizer: embedding optimizer whose state counts against the budget (see ``row_bytes``).
        mode: ``global`` (FAE's cut across all tables), ``proportional`` or ``equal``.
        sample_fraction: share of batches counted when profiling here (FAE profiles 5%).
        seed: sampling seed.

    Example::

        hot = ProfiledHotRows(budget_bytes=8_000_000)
        PopularityDataModule(SyntheticDataModule(), hot_rows=hot)
    """

    #: profiling passes over training data made by all sources in this process (one per distinct source and data)
    profiling_passes = 0

    def __init__(self, budget_bytes: int, profile_path: str | None = None, embedding_dim: int = 16,
                 optimizer: str = "rowwise_adagrad", mode: str = "global", sample_fraction: float = 0.05,
                 seed: int = 0) -> None:
        check_source_arguments(budget_bytes, sample_fraction)
        self.budget_bytes = budget_bytes
        self.profile_path = profile_path
        self.embedding_dim = embedding_dim
        self.optimizer = optimizer
        self.mode = mode
        self.sample_fraction = sample_fraction
        self.seed = seed
        self.profile: AccessProfile | None = None

    def describe(self) -> str:
        """Where the hot set comes from, for logs and plans."""
        if self.profile_path is not None:
            return f"profile {self.profile_path}"
        return f"profile of {self.sample_fraction:.0%} of the training batches"

    def profile_for(self, datamodule: Any) -> AccessProfile:
        """The access profile of ``datamodule``'s data (saved or counted now; shared by equal sources). Collective
        when it profiles: every rank must ask."""
        data = profiled_data(datamodule)
        if not isinstance(data, RecDataModule):
            raise TypeError(
                f"ProfiledHotRows profiles the training data of a lightning-skew RecDataModule (it reads "
                f"sparse_feature_names and num_embeddings_per_feature); {type(data).__name__} is not one. Derive your "
                "DataModule from lightning_skew.RecDataModule (docs/models.md), or give the hot set as a RowSet.")
        key = (self.profile_path, None if self.profile_path else (self.sample_fraction, self.seed), _data_key(data))
        if key in _RESOLVED:
            _RESOLVED.move_to_end(key)
            self.profile = _RESOLVED[key]
            return self.profile
        if self.profile_path is not None:
            profile = AccessProfile.load(self.profile_path, datamodule=data)
        else:
            profile = AccessProfile.for_datamodule(data, sample_fraction=self.sample_fraction, seed=self.seed,
                                                   sample_by="batches")
            loader = data.train_dataloader()
            if isinstance(loader, ResumingLoader):
                loader = loader.whole_stream()  # a resumed fit profiles what the uninterrupted one did
            profile = profile_dataloader(profile, loader, progress=False).all_reduce()
            ProfiledHotRows.profiling_passes += 1
            warning = profile.sample_warning()
            if warning is not None:
                rank_zero_warn(f"ProfiledHotRows: {warning} (the hot set is cut from this sample)")
        _RESOLVED[key] = profile
        while len(_RESOLVED) > _RESOLVED_MAX:
            _RESOLVED.popitem(last=False)
        self.profile = profile
        return profile

    def hot_rows(self, datamodule: RecDataModule) -> RowSet:
        """The hot set of ``datamodule``'s data under this source's budget."""
        return self.profile_for(datamodule).hot_rows(self.budget_bytes, embedding_dim=self.embedding_dim,
                                                     optimizer=self.optimizer, mode=self.mode)


def resolve_hot_rows(source: Any, datamodule: Any) -> RowSet:
    """A hot set from any accepted source: a :class:`RowSet` as it is, or ``source.hot_rows(datamodule)``."""
    if isinstance(source, RowSet):
        return source
    if not hasattr(source, "hot_rows"):
        raise TypeError(f"a hot-set source must be a RowSet or have hot_rows(datamodule), got {type(source).__name__}")
    rowset = source.hot_rows(datamodule)
    if not isinstance(rowset, RowSet):
        raise TypeError(f"{type(source).__name__}.hot_rows returned {type(rowset).__name__}, expected a RowSet")
    return rowset
