"""Where a hot set comes from: one protocol, :class:`HotSetSource`, that every part asks the same way.

A part that needs a hot set (``HotColdStrategy``, ``PlainHotColdPlacement``, ``PopularityDataModule``,
``StaleEmbeddingSkipper``) takes a source and calls :func:`resolve_hot_rows` with the data and the tables it serves
(:func:`~lightning_skew.profile.row_sizes.model_table_bytes`: their real bytes per row), and nothing else: no part
re-cuts, counts or profiles on its own. A source shared by several parts of a fit therefore cuts the same set for
each.
"""

from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_warn

from lightning_skew.core.distributed import all_reduce_sum
from lightning_skew.core.lookups import count_lookups, top_rows
from lightning_skew.core.rowsets import RowSet
from lightning_skew.data.base import RecDataModule
from lightning_skew.data.position import ResumingLoader
from lightning_skew.profile.access import AccessProfile
from lightning_skew.profile.budget import select_hot_rows
from lightning_skew.profile.loader import profile_dataloader
from lightning_skew.profile.row_sizes import TableBytes, bytes_by_feature

__all__ = ["GivenRows", "HotSetSource", "LookedUpRows", "ProfiledHotRows", "as_hot_set_source",
           "check_profile_tables", "check_source_arguments", "describe_source", "profiled_data", "resolve_hot_rows"]

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
    """Anything that picks the hot rows of a DataModule's training data for a model's tables.

    ``hot_rows(datamodule, tables)`` gets the data (``None`` where a part has none, e.g. a strategy set up for
    ``validate`` alone) and the tables the hot set is for, each with its real bytes per row (weights plus the
    embedding optimizer's state; see :class:`~lightning_skew.profile.row_sizes.TableBytes`), and returns a
    :class:`~lightning_skew.core.rowsets.RowSet` over the data's features. ``tables`` is empty when the asking
    part knows no model (a DataModule set up on its own). It should decide the same set on every rank (reduce
    its counts first); :class:`PopularityDataModule` uses rank 0's answer on all ranks whatever it returns.

    Example (a source of your own)::

        class FirstRows:
            def hot_rows(self, datamodule, tables):
                features = datamodule.sparse_feature_names
                sizes = datamodule.num_embeddings_per_feature
                return RowSet(features, sizes, [torch.arange(min(10, n)) for n in sizes])
    """

    def hot_rows(self, datamodule: Any, tables: Sequence[TableBytes]) -> RowSet: ...


class GivenRows:
    """A hot set given as it is (a :class:`RowSet`): every part that takes a source also takes a ``RowSet``, which
    it wraps in this."""

    def __init__(self, rowset: RowSet) -> None:
        if not isinstance(rowset, RowSet):
            raise TypeError(f"GivenRows takes a RowSet, got {type(rowset).__name__}")
        self.rowset = rowset

    def describe(self) -> str:
        return f"a given row set ({len(self.rowset)} rows)"

    def hot_rows(self, datamodule: Any, tables: Sequence[TableBytes]) -> RowSet:
        return self.rowset


class LookedUpRows:
    """The ``max_rows`` rows looked up most often (over all features) in the first ``batches`` training batches of
    the data, all ranks' counts summed: a budget in rows, not bytes, so the tables' row sizes play no part.

    ``PopularityDataModule(hot_rows_budget=N)`` without ``hot_rows`` uses ``LookedUpRows(N, profile_batches)``.

    Args:
        max_rows: rows over all features.
        batches: training batches counted from the start of the loader; ``None`` counts all.
    """

    def __init__(self, max_rows: int, batches: int | None = None) -> None:
        for name, value in (("max_rows", max_rows), ("batches", batches)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"LookedUpRows: {name} must be an integer >= 1, got {value!r}")
        self.max_rows = max_rows
        self.batches = batches

    def describe(self) -> str:
        scope = "all" if self.batches is None else f"the first {self.batches}"
        return f"the {self.max_rows} rows looked up most in {scope} training batches"

    def hot_rows(self, datamodule: Any, tables: Sequence[TableBytes]) -> RowSet:
        data = profiled_data(datamodule)
        names, sizes = list(data.sparse_feature_names), list(data.num_embeddings_per_feature)
        counts = None
        for batch in islice(data.train_dataloader(), self.batches):
            counts = count_lookups(batch.sparse_features, names, sizes, counts)
        if counts is None:
            raise ValueError(f"LookedUpRows: the training loader of {type(data).__name__} is empty, there is nothing "
                             "to count")
        flat = all_reduce_sum(torch.cat(counts))  # every rank counts its own batches: the sum decides for all
        return top_rows(list(torch.split(flat, sizes)), names, self.max_rows)


class _CalledRows:
    """A callable ``datamodule -> RowSet`` (``PopularityDataModule``'s older form of a source)."""

    def __init__(self, function: Callable[[Any], RowSet]) -> None:
        self.function = function

    def describe(self) -> str:
        return getattr(self.function, "__name__", type(self.function).__name__)

    def hot_rows(self, datamodule: Any, tables: Sequence[TableBytes]) -> RowSet:
        return self.function(datamodule)


def as_hot_set_source(value: Any, owner: str, allow_callable: bool = False) -> HotSetSource | None:
    """``value`` as a :class:`HotSetSource`: a source as it is, a ``RowSet`` wrapped in :class:`GivenRows` (and with
    ``allow_callable`` a function of the DataModule); ``None`` stays ``None``. ``owner`` names the part in errors."""
    if value is None or isinstance(value, HotSetSource):
        return value
    if isinstance(value, RowSet):
        return GivenRows(value)
    if allow_callable and callable(value):
        return _CalledRows(value)
    raise TypeError(f"{owner}: hot_rows must be a RowSet or a hot-set source (an object with "
                    f"hot_rows(datamodule, tables), such as lightning_skew.ProfiledHotRows), got {type(value).__name__}")


def describe_source(source: Any) -> str:
    """Where a source's hot set comes from, for logs and plans."""
    return getattr(source, "describe", lambda: type(source).__name__)()


_OLD_SIGNATURE_WARNED: set[type] = set()


def _takes_tables(method: Callable[..., Any]) -> bool:
    try:
        parameters = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return True
    return len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 2


def resolve_hot_rows(source: Any, datamodule: Any, tables: Sequence[TableBytes] = ()) -> RowSet:
    """The hot set of ``source`` (a :class:`HotSetSource` or a ``RowSet``) for ``datamodule``'s data and the model's
    ``tables``: the one way every part asks a source.

    A source written for the older protocol, ``hot_rows(datamodule)``, is still asked (without the tables), with a
    deprecation warning naming the new form.
    """
    if isinstance(source, RowSet):
        return source
    if not hasattr(source, "hot_rows"):
        raise TypeError(f"a hot-set source must be a RowSet or have hot_rows(datamodule, tables), got "
                        f"{type(source).__name__}")
    if _takes_tables(source.hot_rows):
        rowset = source.hot_rows(datamodule, list(tables))
    else:
        if type(source) not in _OLD_SIGNATURE_WARNED:
            _OLD_SIGNATURE_WARNED.add(type(source))
            rank_zero_deprecation(
                f"{type(source).__name__}.hot_rows(datamodule) is the old hot-set protocol: define "
                "hot_rows(self, datamodule, tables) (tables: the model's tables with their real bytes per row, "
                "lightning_skew.profile.TableBytes); the one-argument form will stop being accepted")
        rowset = source.hot_rows(datamodule)
    if not isinstance(rowset, RowSet):
        raise TypeError(f"{type(source).__name__}.hot_rows returned {type(rowset).__name__}, expected a RowSet")
    return rowset


def _fits(feature_rows: int, table: TableBytes) -> bool:
    """A feature's ID range fits its table: equal, or within a table that several features share."""
    return feature_rows == table.num_rows or (len(table.features) > 1 and feature_rows <= table.num_rows)


def check_profile_tables(profile: AccessProfile, tables: Sequence[TableBytes]) -> None:
    """Raise ``ValueError`` when ``profile`` does not describe ``tables``: a feature of theirs it lacks, or another
    size (naming the feature and table)."""
    known = dict(zip(profile.feature_names, profile.num_rows, strict=True))
    missing = [f for table in tables for f in table.features if f not in known]
    if missing:
        raise ValueError(f"the access profile describes other tables: the model's features {missing} are not in it "
                         f"(profile features: {profile.feature_names})")
    differ = [f"{f!r}: {known[f]} rows in the profile, {table.num_rows} in table {table.name!r}"
              for table in tables for f in table.features if not _fits(known[f], table)]
    if differ:
        raise ValueError("the access profile describes other table sizes: " + "; ".join(differ))


class ProfiledHotRows:
    """The hot rows of a DataModule's training data under a byte budget, from an :class:`AccessProfile`.

    The hot-set source of the recipes (``PopularityDataModule(hot_rows=...)``, ``HotColdStrategy(hot_rows=...)``,
    ``StaleEmbeddingSkipper(hot_rows=...)``, ``PlainHotColdPlacement``; in YAML ``class_path:
    lightning_skew.ProfiledHotRows``). It reads a saved profile (checked against the data's tables and description)
    or profiles the training data itself, merges the counts of all ranks, and cuts the hot set: the most looked-up
    rows over all tables (``mode``) whose bytes fit ``budget_bytes``, each row counted at the real size of the
    tables it is cut for (the asking part passes them: weights plus optimizer state; a feature that looks up
    several tables costs all of them). Wrappers around the data (popularity batching, repacking) are seen through:
    the profile describes the data, not the wrapper.

    Equal sources (the same arguments) asked about the same data share one profile: a fit whose DataModule,
    strategy and callbacks each name this source profiles once (in YAML, repeat the block or use an anchor), and
    each part gets the same hot set, since they serve the same model.

    Args:
        budget_bytes: fast-memory budget for hot rows (weights plus optimizer state).
        profile_path: a file written by ``lightning-skew profile`` or :meth:`AccessProfile.save`; ``None``
            profiles the training data when first asked.
        mode: ``global`` (FAE's cut across all tables), ``proportional`` or ``equal``.
        sample_fraction: share of batches counted when profiling here (FAE profiles 5%).
        seed: sampling seed.
        embedding_dim: deprecated: row sizes come from the model the source serves. Used only when asked
            without a model's tables (a DataModule set up on its own); 16 there when not given.
        optimizer: deprecated, as ``embedding_dim`` (``rowwise_adagrad`` there when not given).

    Example::

        hot = ProfiledHotRows(budget_bytes=8_000_000)
        PopularityDataModule(SyntheticDataModule(), hot_rows=hot)
    """

    #: profiling passes over training data made by all sources in this process (one per distinct source and data)
    profiling_passes = 0

    def __init__(self, budget_bytes: int, profile_path: str | None = None, embedding_dim: int | None = None,
                 optimizer: str | None = None, mode: str = "global", sample_fraction: float = 0.05,
                 seed: int = 0) -> None:
        check_source_arguments(budget_bytes, sample_fraction)
        if embedding_dim is not None or optimizer is not None:
            rank_zero_deprecation(
                "ProfiledHotRows(embedding_dim=..., optimizer=...) is deprecated: the parts that ask the source "
                "(HotColdStrategy, PopularityDataModule under a Trainer, StaleEmbeddingSkipper) pass the model's "
                "real bytes per row, and those win. Give only ProfiledHotRows(budget_bytes=..., profile_path=..., "
                "mode=..., sample_fraction=..., seed=...); the two are read only when no model is known")
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
        when it profiles: every rank must ask. Without a DataModule, a saved profile is read unchecked."""
        if datamodule is None and self.profile_path is not None:
            self.profile = AccessProfile.load(self.profile_path)
            return self.profile
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

    def hot_rows(self, datamodule: Any, tables: Sequence[TableBytes] = ()) -> RowSet:
        """The hot set of ``datamodule``'s data under this source's budget, cut at the real row sizes of
        ``tables`` (features that no table looks up are never hot)."""
        profile = self.profile_for(datamodule)
        if not tables:
            return profile.hot_rows(self.budget_bytes, embedding_dim=self.embedding_dim or 16,
                                    optimizer=self.optimizer or "rowwise_adagrad", mode=self.mode)
        check_profile_tables(profile, tables)
        size_of = bytes_by_feature(tables)
        empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        candidates = [profile.counts(f) if f in size_of else empty for f in profile.feature_names]
        row_sizes = [size_of.get(f, max(size_of.values())) for f in profile.feature_names]
        hot = select_hot_rows(candidates, row_sizes, self.budget_bytes, self.mode, profile.feature_names)
        return RowSet(list(profile.feature_names), list(profile.num_rows), hot)
