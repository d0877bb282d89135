"""What an access profile keeps: its states, declared once, and the merge, all_reduce, save and load that follow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_skew.core.distributed import distributed, world_size
from lightning_skew.core.safe_load import load_data
from lightning_skew.profile.identity import (
    check_tables,
    describe_datamodule,
    description_difference,
    fingerprint,
)
from lightning_skew.profile.sketches import (
    ReservoirEntry,
    add_sparse_counts,
    merge_heavy_hitters,
    reservoir_from_state,
    reservoir_to_state,
    trim_reservoir,
)

if TYPE_CHECKING:
    from lightning_skew.profile.access import AccessProfile

__all__ = ["PROFILE_FORMAT", "PROFILE_VERSION", "ROW_COUNTS", "TABLE_TOTALS", "TOTAL", "HeavyHitters",
           "ProfileState", "Reservoir", "RowCounts", "State", "StateKind", "TableTotals", "upgrade_state"]

PROFILE_FORMAT = "lightning-skew-access-profile"
# Version 2 keeps exact counts sparse (the rows seen and their counts), the missing rows and the batches counted;
# version 1 files (one count per table row) still load (see upgrade_state).
PROFILE_VERSION = 2
READABLE_VERSIONS = (1, 2)


class StateKind:
    """How one kind of state merges, saves and loads; this base kind is a scalar total (an int).

    ``merge`` adds another profile's saved state to the profile's own value and returns the result;
    ``save`` gives the value as plain tensors, numbers, lists and dicts, ``load`` the value back from them
    (given the fresh profile's value). Across ranks,
    :meth:`~lightning_skew.profile.access.AccessProfile.all_reduce` gathers every rank's saved states and
    merges them in rank order.
    """

    def merge(self, profile: Any, own: Any, saved: Any) -> Any:
        return own + saved

    def save(self, value: Any) -> Any:
        return value

    def load(self, own: Any, saved: Any) -> Any:
        return saved


class TableTotals(StateKind):
    """One int per table (lookups, sketch errors): added table by table."""

    def merge(self, profile: Any, own: dict[str, int], saved: dict[str, int]) -> dict[str, int]:
        for name, total in saved.items():
            own[name] += total
        return own

    def save(self, value: dict[str, int]) -> dict[str, int]:
        return dict(value)

    def load(self, own: dict[str, int], saved: dict[str, int]) -> dict[str, int]:
        own.update(saved)
        return own


class RowCounts(StateKind):
    """Exact counts: per table ``(rows, counts)``, the rows seen sorted by ID and their counts, added row by row.

    Sparse, so merging, saving and loading cost what the rows seen cost, not the table's size.
    """

    def merge(self, profile: Any, own: dict[str, tuple[Tensor, Tensor]],
              saved: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        for name, (rows, counts) in saved.items():
            own[name] = add_sparse_counts(*own[name], rows, counts)
        return own

    def save(self, value: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        # int32 where the values fit (row IDs and counts below 2^31): 8 bytes a row seen in the file, not 16
        return {name: (_narrow(rows), _narrow(counts)) for name, (rows, counts) in value.items()}

    def load(self, own: dict[str, tuple[Tensor, Tensor]],
             saved: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        for name, (rows, counts) in saved.items():
            own[name] = (rows.to(torch.int64, copy=True), counts.to(torch.int64, copy=True))
        return own


def _narrow(values: Tensor) -> Tensor:
    """A non-negative int64 tensor as int32 when every value fits (a copy either way)."""
    return values.int() if values.numel() == 0 or int(values.max()) < 2**31 else values.clone()


class HeavyHitters(RowCounts):
    """Per table a Misra-Gries summary ``(rows, counts)`` of at most ``profile.<capacity>`` counters.

    Summaries merge with :func:`~lightning_skew.profile.sketches.merge_heavy_hitters`; what a merge
    subtracts from every counter is added to the table's entry of ``profile.<errors>``.
    """

    def __init__(self, capacity: str, errors: str) -> None:
        self.capacity, self.errors = capacity, errors

    def merge(self, profile: Any, own: dict[str, tuple[Tensor, Tensor]],
              saved: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        capacity, errors = getattr(profile, self.capacity), getattr(profile, self.errors)
        for name, (rows, counts) in saved.items():
            own_rows, own_counts = own[name]
            rows, counts, decrement = merge_heavy_hitters(own_rows, own_counts, rows, counts, capacity)
            own[name] = (rows, counts)
            errors[name] += decrement
        return own


class Reservoir(StateKind):
    """Kept batches by seeded priority (see :mod:`~lightning_skew.profile.sketches`), at most ``profile.<limit>`` inputs."""

    def __init__(self, limit: str) -> None:
        self.limit = limit

    def merge(self, profile: Any, own: list[ReservoirEntry], saved: list[dict[str, Any]]) -> list[ReservoirEntry]:
        return trim_reservoir(own + reservoir_from_state(saved), getattr(profile, self.limit))

    def save(self, value: list[ReservoirEntry]) -> list[dict[str, Any]]:
        return reservoir_to_state(value)

    def load(self, own: list[ReservoirEntry], saved: list[dict[str, Any]]) -> list[ReservoirEntry]:
        return reservoir_from_state(saved)


TOTAL = StateKind()
TABLE_TOTALS = TableTotals()
ROW_COUNTS = RowCounts()


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A saved state of any readable version as the current version (a new dict; ``state`` is left as it is).

    Version 1 kept one count per table row (dense; made sparse here), recorded no missing rows (none) and no
    batches counted: with whole batches sampled that number is the inputs counted over the mean batch size
    (exact for equal batches); with inputs sampled every batch seen is taken as counted once any input was
    (a share of a batch of thousands almost surely holds one).
    """
    if state.get("format") != PROFILE_FORMAT:
        raise ValueError(f"not an access profile (format {state.get('format')!r}, expected {PROFILE_FORMAT!r})")
    version = state.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"access profile version {version} is not supported (this lightning-skew reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    state = dict(state)
    if version == 1:
        state["exact_counts"] = {name: (torch.nonzero(counts > 0).flatten(), counts[counts > 0].long())
                                 for name, counts in state["exact_counts"].items()}
        state["missing_rows"] = {}
        seen, counted, batches = state["num_inputs_seen"], state["num_inputs_counted"], state["num_batches_seen"]
        if state["sample_by"] == "batches":
            state["num_batches_counted"] = round(counted * batches / seen) if seen else 0
        else:
            state["num_batches_counted"] = batches if counted else 0
        state["version"] = PROFILE_VERSION
    return state


@dataclass(frozen=True)
class State:
    """One state of a profile: the attribute ``name`` (also its key in the saved file) and its ``kind``."""

    name: str
    kind: StateKind


class ProfileState:
    """The state of an :class:`~lightning_skew.profile.access.AccessProfile`, declared once in ``STATES``.

    Merging (:meth:`merge`), combining ranks (:meth:`all_reduce`), :meth:`state_dict` and loading
    (:meth:`from_state_dict`, :meth:`load_state_dict`, :meth:`load`) walk ``STATES`` and leave each state to
    its kind, as torchmetrics' ``add_state`` does; a new state is one more entry there and its empty value
    in :meth:`_empty_states`. ``SETTINGS`` are the constructor arguments that a saved state records (under
    their own names, before the states; ``dataset`` comes last).
    """

    SETTINGS = ("feature_names", "num_rows", "sample_fraction", "sample_by", "seed", "sketch_above_rows",
                "sketch_counters", "reservoir_inputs", "missing_rows")
    STATES = (
        State("num_inputs_seen", TOTAL),  # inputs in the stream so far
        State("num_inputs_counted", TOTAL),  # of them, inputs in the sample
        State("num_batches_seen", TOTAL),
        State("num_batches_counted", TOTAL),  # batches with at least one counted input
        State("lookups", TABLE_TOTALS),  # lookups counted per table
        State("exact_counts", ROW_COUNTS),  # per exact table, the rows seen and their counts
        State("sketches", HeavyHitters(capacity="sketch_counters", errors="sketch_errors")),  # per sketched table
        State("sketch_errors", TABLE_TOTALS),  # per sketched table, the largest undercount of a row
        State("reservoir", Reservoir(limit="reservoir_inputs")),  # kept batches, lowest priority first
    )

    # settings the profile's constructor sets and the states read
    feature_names: list[str]
    num_rows: list[int]
    sketched: list[bool]
    sketch_counters: int
    dataset: dict[str, Any]

    def _empty_states(self) -> None:
        """Give every state of ``STATES`` its empty value (once the settings are set)."""
        self.num_inputs_seen = 0
        self.num_inputs_counted = 0
        self.num_batches_seen = 0
        self.num_batches_counted = 0
        self.lookups: dict[str, int] = {name: 0 for name in self.feature_names}
        empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        self.exact_counts: dict[str, tuple[Tensor, Tensor]] = {
            name: empty for name, sketched in zip(self.feature_names, self.sketched, strict=True) if not sketched}
        self.sketches: dict[str, tuple[Tensor, Tensor]] = {
            name: empty for name, sketched in zip(self.feature_names, self.sketched, strict=True) if sketched}
        self.sketch_errors: dict[str, int] = {name: 0 for name in self.sketches}
        self.reservoir: list[ReservoirEntry] = []

    def _flush(self, key: str | None = None) -> None:
        """Bring lookups buffered for counting into ``exact_counts`` and ``sketches`` (the profile's counting
        defines it)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------
    # Merging across workers and ranks
    # ------------------------------------------------------------------------------------------------------

    def merge(self, other: AccessProfile) -> AccessProfile:
        """A new profile counting both profiles' inputs (same tables and sampling, else ``ValueError``)."""
        merged = type(self).from_state_dict(self.state_dict())
        merged._add(other.state_dict())
        return merged

    def _add(self, state: dict[str, Any]) -> None:
        """Add another profile's state (of this version)."""
        self._check_compatible(state, "merge")
        self._flush()
        for entry in self.STATES:
            setattr(self, entry.name, entry.kind.merge(self, getattr(self, entry.name), state[entry.name]))

    def all_reduce(self) -> AccessProfile:
        """Make every ``torch.distributed`` rank's profile the merge of all ranks' (no-op when not initialized).

        Every rank's state is gathered (its size follows the rows seen, not the tables' sizes) and merged in
        rank order, so every rank ends with the same profile. Returns ``self``.
        """
        if not distributed():
            return self
        gathered: list[Any] = [None] * world_size()
        dist.all_gather_object(gathered, self.state_dict())
        merged = type(self).from_state_dict(gathered[0])
        for state in gathered[1:]:
            merged._add(state)
        for entry in self.STATES:  # the settings are the same on every rank (merging checks them)
            setattr(self, entry.name, getattr(merged, entry.name))
        return self

    # ------------------------------------------------------------------------------------------------------
    # State, files
    # ------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the profile knows, as plain tensors, numbers, strings, lists and dicts."""
        self._flush()
        settings = {name: getattr(self, name) for name in self.SETTINGS}
        states = {entry.name: entry.kind.save(getattr(self, entry.name)) for entry in self.STATES}
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "dataset": self.dataset,
                "dataset_fingerprint": fingerprint(self.dataset),
                **{name: list(value) if isinstance(value, list) else value for name, value in settings.items()},
                **states}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AccessProfile:
        """Rebuild a profile from :meth:`state_dict` (of this version or an older one, see :func:`upgrade_state`)."""
        state = upgrade_state(state)
        profile = cls(**{name: state[name] for name in cls.SETTINGS}, dataset=state["dataset"])
        for entry in cls.STATES:
            setattr(profile, entry.name, entry.kind.load(getattr(profile, entry.name), state[entry.name]))
        return profile

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this profile's contents with ``state`` (after checking that it describes the same tables)."""
        self._check_tables(state["feature_names"], state["num_rows"], "the state")
        self.__dict__.update(type(self).from_state_dict(state).__dict__)

    def save(self, path: str | Path) -> None:
        """Write the profile to ``path`` with ``torch.save`` (a dict of plain tensors; see :meth:`state_dict`)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path, datamodule: Any = None, feature_names: Sequence[str] | None = None,
             num_rows: Sequence[int] | None = None, dataset: dict[str, Any] | None = None) -> AccessProfile:
        """Read a profile written by :meth:`save`, checking it against the tables it will serve.

        Args:
            path: the file.
            datamodule: check against its feature names, table sizes and :func:`describe_datamodule`.
            feature_names: check against these names (instead of, or beyond, the DataModule's).
            num_rows: check against these table sizes.
            dataset: check against this description.

        Raises:
            ValueError: naming the file and what differs (a feature, a table size, a dataset argument).
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"access profile {path} does not exist; write one with `lightning-skew profile`")
        try:
            state = load_data(path, "access profile")  # nothing in the file runs
            profile = cls.from_state_dict(state)
        except Exception as error:  # noqa: BLE001 - truncated, garbage or foreign files: one clear message
            raise ValueError(f"access profile {path} cannot be read ({type(error).__name__}: {str(error)[:200]}); it "
                             "is truncated or not a profile written by lightning-skew: profile the data again with "
                             "`lightning-skew profile`") from None
        if datamodule is not None:
            feature_names = feature_names or datamodule.sparse_feature_names
            num_rows = num_rows or datamodule.num_embeddings_per_feature
            dataset = dataset or describe_datamodule(datamodule)
        where = f"access profile {path}"
        if feature_names is not None:
            profile._check_tables(feature_names, num_rows if num_rows is not None else profile.num_rows, where)
        elif num_rows is not None:
            profile._check_tables(profile.feature_names, num_rows, where)
        if dataset is not None and fingerprint(dataset) != fingerprint(profile.dataset):
            raise ValueError(f"{where} was made from other data: {description_difference(profile.dataset, dataset)}"
                             f"; profile this dataset again")
        return profile

    def _check_tables(self, feature_names: Sequence[str], num_rows: Sequence[int], where: str) -> None:
        check_tables(self.feature_names, self.num_rows, feature_names, num_rows, where)

    def _check_compatible(self, state: dict[str, Any], what: str) -> None:
        self._check_tables(state["feature_names"], state["num_rows"], f"cannot {what}: the other profile")
        if state["dataset_fingerprint"] != fingerprint(self.dataset):
            raise ValueError(f"cannot {what} profiles of different data: "
                             f"{description_difference(state['dataset'], self.dataset)}")
        for key in ("sample_fraction", "sample_by", "sketch_above_rows", "sketch_counters", "missing_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot {what} profiles with different {key}: {getattr(self, key)!r} and "
                                 f"{state[key]!r}")

