"""AccessProfile: lookup counts per (table, row) of a dataset's inputs, and the hot sets and skew they imply."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.distributed import rank
from lightning_skew.core.rowsets import RowSet
from lightning_skew.profile.budget import (
    BudgetPoint,
    global_hot_order,
    lookup_coverage,
    row_bytes,
    select_hot_rows,
    smallest_budget_for_coverage,
)
from lightning_skew.profile.identity import describe_datamodule
from lightning_skew.profile.sketches import (
    add_sparse_counts,
    check_row_ids,
    merge_heavy_hitters,
    reservoir_batch,
    reservoir_inputs,
    reservoir_priority,
    sampled_mask,
    trim_reservoir,
)
from lightning_skew.profile.skew import TableSkew, fit_power_law, top_share
from lightning_skew.profile.states import ProfileState

__all__ = ["MIN_SAMPLE_INPUTS", "AccessProfile"]

#: fewer counted inputs than this make :meth:`AccessProfile.sample_warning` warn
MIN_SAMPLE_INPUTS = 4096
# IDs an exact table buffers at least before folding them into its counts (one sort each time)
_EXACT_BUFFER = 2**18


class AccessProfile(ProfileState):
    """Lookup counts per (table, row) of a dataset's training inputs, and the hot set they imply.

    Feed it batches (:meth:`update` with a ``KeyedJaggedTensor``, or :func:`profile_dataloader`), then
    ask for a hot set under a byte budget (:meth:`hot_rows`), its coverage, coverage curves
    (:meth:`coverage_curve`) and skew statistics (:meth:`skew`). Profiles of several workers
    :meth:`merge`; across ``torch.distributed`` ranks :meth:`all_reduce` makes every rank's profile
    the sum of all. :meth:`save` / :meth:`load` keep it for later runs. What it counts is declared once in
    :class:`~lightning_skew.profile.states.ProfileState`, which merges, reduces, saves and loads it.

    Args:
        feature_names: KeyedJaggedTensor keys, one embedding table each.
        num_rows: rows of each table (IDs lie in ``[0, rows)``).
        sample_fraction: share of the stream that is counted. FAE profiles a 5% sample. Counts stay
            the raw sampled counts; :attr:`scale` (inputs seen / inputs counted) turns them into
            estimates for the whole stream. Coverage and hot sets are ratios and need no scaling.
        sample_by: ``"inputs"``: input ``i`` of the stream (``i`` counts every input this profile has
            seen) is counted when ``hash(seed, i) < fraction``; ``"batches"``: whole batches, by
            their position.
        seed: seed of the sample and of the reservoir.
        sketch_above_rows: tables with more rows than this are counted by a Misra-Gries sketch of
            ``sketch_counters`` counters instead of exactly; ``None``: every table exact. Exact
            counting takes 8 bytes per row; a sketch about 16 bytes per counter.
        sketch_counters: counters ``k`` per sketched table. Guarantee: a sketched count
            ``c_hat`` of a row with true (sampled) count ``c`` satisfies ``c - e <= c_hat <= c`` with
            ``e = sketch_error(table) <= N / (k + 1)``, ``N`` the table's counted lookups; so every
            row counted more than ``N / (k + 1)`` times is tracked.
        reservoir_inputs: at most about this many counted inputs (the counted inputs of whole
            batches, chosen by a seeded priority, so merges keep a deterministic sample) are kept to
            measure the share of inputs whose every lookup is hot. ``0`` keeps none.
        dataset: a description of the data (see :func:`describe_datamodule`), recorded in the file
            and checked by :meth:`load`.
        missing_rows: per feature, the row that stands for a missing value (a RecDataModule's
            ``missing_rows``; Criteo hashes an empty field to row 0). Its lookups are counted like any
            other (a missing row looked up a lot is hot for placement) but :meth:`skew` reports them
            apart and computes the statistics over present values. Default: none.

    .. note::
        Counts are of the sample, not estimates: multiply by :attr:`scale` for the whole stream.
        Rows of sketched tables that the sketch dropped count as never seen, so coverages of
        sketched tables are lower bounds. Exact counts are sparse (the rows seen, sorted, and their
        counts): counting, statistics and files cost what the rows seen cost, not the tables' sizes.
        A small sample gives rough statistics: :meth:`sample_warning` says when.

    Example::

        >>> from lightning_skew.data import SyntheticDataModule
        >>> dm = SyntheticDataModule(max_rows_per_table=1000, num_train_samples=8192, batch_size=1024)
        >>> dm.setup("fit")
        >>> profile = profile_dataloader(AccessProfile.for_datamodule(dm), dm.train_dataloader(), progress=False)
        >>> hot = profile.hot_rows(budget_bytes=64 * 1024, embedding_dim=16)  # a RowSet
        >>> 0.5 < profile.coverage(hot) <= 1.0
        True
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        num_rows: Sequence[int],
        sample_fraction: float = 1.0,
        sample_by: str = "inputs",
        seed: int = 0,
        sketch_above_rows: int | None = None,
        sketch_counters: int = 65536,
        reservoir_inputs: int = 16384,
        dataset: dict[str, Any] | None = None,
        missing_rows: dict[str, int] | None = None,
    ) -> None:
        _validate_arguments(feature_names, num_rows, sample_fraction, sample_by, sketch_above_rows,
                            sketch_counters, reservoir_inputs, missing_rows or {})
        self.feature_names = list(feature_names)
        self.num_rows = [int(n) for n in num_rows]
        self.sample_fraction = float(sample_fraction)
        self.sample_by = sample_by
        self.seed = int(seed)
        self.sketch_above_rows = sketch_above_rows
        self.sketch_counters = int(sketch_counters)
        self.reservoir_inputs = int(reservoir_inputs)
        self.dataset = dict(dataset or {"class": "unknown", "arguments": {}})
        self.missing_rows = {name: int(row) for name, row in (missing_rows or {}).items()}
        self.sketched = [sketch_above_rows is not None and n > sketch_above_rows for n in self.num_rows]
        self._empty_states()  # the states of ProfileState.STATES
        self._pending: dict[str, list[Tensor]] = {name: [] for name in self.feature_names}  # IDs not yet counted
        self._pending_ids = dict.fromkeys(self.feature_names, 0)
        self._rank = rank()
        self.seconds = 0.0  # time spent in profile_dataloader, loading included

    @classmethod
    def for_datamodule(cls, datamodule: Any, **kwargs: Any) -> AccessProfile:
        """An empty profile of a RecDataModule's tables, describing its data and its missing rows (``kwargs`` as in
        the class). Pass the data behind any wrapper (:func:`~lightning_skew.profile.sources.profiled_data`)."""
        return cls(datamodule.sparse_feature_names, datamodule.num_embeddings_per_feature,
                   dataset=describe_datamodule(datamodule), missing_rows=dict(getattr(datamodule, "missing_rows", {})),
                   **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Counting
    # ------------------------------------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """Inputs seen per input counted: multiply counts by it to estimate the whole stream's."""
        return self.num_inputs_seen / self.num_inputs_counted if self.num_inputs_counted else 0.0

    def counts_next_batch(self) -> bool:
        """With ``sample_by="batches"``: whether the next batch is in the sample (else it may be skipped unread)."""
        if self.sample_by != "batches":
            return True
        return bool(sampled_mask(self.num_batches_seen, 1, self.sample_fraction, self.seed)[0])

    def skip_batch(self, batch_size: int) -> None:
        """Account for a batch outside the sample without reading it (``sample_by="batches"`` only)."""
        if self.counts_next_batch():
            raise RuntimeError("skip_batch: the next batch is in the sample; pass it to update()")
        self.num_inputs_seen += batch_size
        self.num_batches_seen += 1

    def update(self, sparse: KeyedJaggedTensor) -> None:
        """Count the lookups of one batch (those of the sampled inputs), and offer it to the reservoir."""
        batch_size = sparse.stride()
        if self.sample_by == "batches":
            keep_batch = bool(sampled_mask(self.num_batches_seen, 1, self.sample_fraction, self.seed)[0])
            keep = torch.full((batch_size,), keep_batch, dtype=torch.bool)
        else:
            keep = sampled_mask(self.num_inputs_seen, batch_size, self.sample_fraction, self.seed)
        keys = sparse.keys()
        unknown = [key for key in keys if key not in self.lookups]
        if unknown:
            raise ValueError(f"the batch has features {unknown} that the profile does not know; it profiles "
                             f"{self.feature_names}")
        values = sparse.values()
        lengths = sparse.lengths()
        keep_all = bool(keep.all())
        counted = int(keep.sum())
        if counted:
            per_key_values = torch.split(values, sparse.length_per_key())
            per_key_lengths = torch.split(lengths, batch_size)
            kept_values = []
            for key, key_values, key_lengths in zip(keys, per_key_values, per_key_lengths, strict=True):
                if not keep_all:
                    key_values = key_values[keep.repeat_interleave(key_lengths.long(), output_size=key_values.numel())]
                kept_values.append(key_values)
                self._count(key, key_values)
            if not keep_all:
                values, lengths = torch.cat(kept_values), lengths[keep.repeat(len(keys))]
            # Only counted inputs: the all-hot share then describes the inputs the counts come from.
            self._offer_to_reservoir(keys, values, lengths)
        self.num_inputs_seen += batch_size
        self.num_inputs_counted += counted
        self.num_batches_seen += 1
        self.num_batches_counted += int(counted > 0)

    def _count(self, key: str, rows: Tensor) -> None:
        check_row_ids(rows, self.num_rows[self.feature_names.index(key)], key)
        self.lookups[key] += rows.numel()
        self._pending[key].append(rows.long())
        self._pending_ids[key] += rows.numel()
        # Buffered IDs are folded in at once: for sketches the same error bound with far fewer sorts; for exact
        # tables a buffer at least as large as the rows seen, so folding costs O(log) per ID, not O(rows seen).
        if key in self.sketches:
            limit = self.sketch_counters
        else:
            limit = max(_EXACT_BUFFER, self.exact_counts[key][0].numel())
        if self._pending_ids[key] >= limit:
            self._flush(key)

    def _flush(self, key: str | None = None) -> None:
        for name in [key] if key is not None else list(self._pending):
            if not self._pending[name]:
                continue
            pending = torch.cat(self._pending[name])
            self._pending[name], self._pending_ids[name] = [], 0
            if name in self.exact_counts:
                self.exact_counts[name] = add_sparse_counts(*self.exact_counts[name], pending, torch.ones_like(pending),
                                                            self.num_rows[self.feature_names.index(name)])
                continue
            batch_rows, batch_counts = torch.unique(pending, return_counts=True)
            rows, counts = self.sketches[name]
            rows, counts, decrement = merge_heavy_hitters(rows, counts, batch_rows, batch_counts,
                                                          self.sketch_counters)
            self.sketches[name] = (rows, counts)
            self.sketch_errors[name] += decrement

    def _offer_to_reservoir(self, keys: list[str], values: Tensor, lengths: Tensor) -> None:
        if self.reservoir_inputs <= 0:
            return
        priority = reservoir_priority(self.num_batches_seen, self.seed, self._rank)
        if reservoir_inputs(self.reservoir) >= self.reservoir_inputs and priority >= self.reservoir[-1][0]:
            return
        self.reservoir = trim_reservoir(self.reservoir + [(priority, list(keys), values.clone(), lengths.clone())],
                                        self.reservoir_inputs)

    # ------------------------------------------------------------------------------------------------------
    # Reading counts
    # ------------------------------------------------------------------------------------------------------

    def counts(self, table: str) -> tuple[Tensor, Tensor]:
        """``(rows, counts)`` of a table, rows sorted by ID: the rows seen for an exact table, the tracked rows for a
        sketched one (every count positive)."""
        if table not in self._pending:
            raise KeyError(f"no table {table!r}; the profile has {self.feature_names}")
        self._flush(table)
        return self.exact_counts[table] if table in self.exact_counts else self.sketches[table]

    def present_counts(self, table: str) -> tuple[Tensor, Tensor]:
        """:meth:`counts` of a table without its missing row (all of them if it has none)."""
        rows, counts = self.counts(table)
        if table not in self.missing_rows:
            return rows, counts
        present = rows != self.missing_rows[table]
        return rows[present], counts[present]

    def missing_lookups(self, table: str) -> int:
        """Lookups of a table's missing row (0 without one; for a sketched table a lower bound, as every count)."""
        if table not in self.missing_rows:
            return 0
        rows, counts = self.counts(table)
        return int(counts[rows == self.missing_rows[table]].sum())

    def dense_counts(self, table: str) -> Tensor:
        """Counts of every row of a table as one int64 tensor (0 for rows a sketch does not track).

        Takes 8 bytes per table row: for inspection and small tables; everything else here reads :meth:`counts`.
        """
        rows, counts = self.counts(table)
        dense = torch.zeros(self.num_rows[self.feature_names.index(table)], dtype=torch.int64)
        dense[rows] = counts
        return dense

    def sketch_error(self, table: str) -> int:
        """Largest undercount of any row of a sketched table (``<= lookups / (counters + 1)``); 0 if exact."""
        if table in self.sketches:
            self._flush(table)
        return self.sketch_errors.get(table, 0)

    @property
    def total_lookups(self) -> int:
        """Lookups counted, all tables together."""
        return sum(self.lookups.values())

    def _candidates(self) -> list[tuple[Tensor, Tensor]]:
        return [self.counts(name) for name in self.feature_names]

    # ------------------------------------------------------------------------------------------------------
    # Hot sets, coverage, skew
    # ------------------------------------------------------------------------------------------------------

    def bytes_per_row(self, embedding_dim: int | Sequence[int], bytes_per_element: int = 4,
                      optimizer: str = "rowwise_adagrad", optimizer_bytes_per_row: int | None = None) -> list[int]:
        """Bytes of one row of each table (see :func:`row_bytes`); ``embedding_dim`` is one or one per table."""
        dims = [embedding_dim] * len(self.feature_names) if isinstance(embedding_dim, int) else list(embedding_dim)
        if len(dims) != len(self.feature_names):
            raise ValueError(f"embedding_dim needs one value or one per table ({len(self.feature_names)}), "
                             f"got {len(dims)}")
        return [row_bytes(d, bytes_per_element, optimizer, optimizer_bytes_per_row) for d in dims]

    def hot_rows(self, budget_bytes: int, embedding_dim: int | Sequence[int] = 16, bytes_per_element: int = 4,
                 optimizer: str = "rowwise_adagrad", optimizer_bytes_per_row: int | None = None,
                 mode: str = "global") -> RowSet:
        """The hot set under ``budget_bytes`` (see :func:`select_hot_rows` for ``mode``), as a :class:`RowSet`.

        A row takes ``embedding_dim * bytes_per_element`` bytes plus its optimizer state (see
        :func:`row_bytes`); the chosen rows' bytes never exceed the budget.
        """
        sizes = self.bytes_per_row(embedding_dim, bytes_per_element, optimizer, optimizer_bytes_per_row)
        hot = select_hot_rows(self._candidates(), sizes, int(budget_bytes), mode, self.feature_names)
        return RowSet(list(self.feature_names), list(self.num_rows), hot)

    def coverage(self, hot: RowSet) -> float:
        """Share of the counted lookups that hit rows of ``hot``."""
        rows = [hot.rows[hot.feature_names.index(name)] if name in hot.feature_names
                else torch.zeros(0, dtype=torch.int64) for name in self.feature_names]
        return lookup_coverage(self._candidates(), rows, self.total_lookups)

    def all_hot_share(self, hot: RowSet) -> float:
        """Share of the reservoir's inputs whose every lookup hits ``hot`` (``nan`` with an empty reservoir).

        Looks the reservoir's IDs up in ``hot``'s sorted rows, so it costs what the reservoir and the hot set
        cost, not the tables' sizes. Features that ``hot`` does not name are never hot.
        """
        sample = self._reservoir_sample()
        if sample is None:
            return float("nan")
        hot_of = dict(zip(hot.feature_names, hot.rows, strict=True))
        batch_size = sample.stride()
        misses = torch.zeros(batch_size, dtype=torch.int64)
        inputs = torch.arange(batch_size)
        for key, values, lengths in zip(sample.keys(), torch.split(sample.values(), sample.length_per_key()),
                                        torch.split(sample.lengths(), batch_size), strict=True):
            owner = torch.repeat_interleave(inputs, lengths.long(), output_size=values.numel())
            missed = ~torch.isin(values.long(), hot_of.get(key, torch.zeros(0, dtype=torch.int64)).long())
            misses.index_add_(0, owner[missed], torch.ones(int(missed.sum()), dtype=torch.int64))
        return float((misses == 0).double().mean())

    def _reservoir_sample(self) -> KeyedJaggedTensor | None:
        """The reservoir's batches as one KJT (cached until the reservoir changes)."""
        if not self.reservoir:
            return None
        key = tuple(entry[0] for entry in self.reservoir)
        if getattr(self, "_sample_cache", (None,))[0] != key:
            self._sample_cache = (key, reservoir_batch(self.reservoir))
        return self._sample_cache[1]

    def coverage_curve(self, budgets: Iterable[int], embedding_dim: int | Sequence[int] = 16,
                       mode: str = "global", **row_size: Any) -> list[BudgetPoint]:
        """Hot rows, coverage and all-hot input share at each budget (``row_size``: as :meth:`hot_rows`)."""
        sizes = self.bytes_per_row(embedding_dim, **row_size)
        candidates = self._candidates()
        order = global_hot_order(candidates, sizes) if mode == "global" else None
        points = []
        for budget in budgets:
            rows = select_hot_rows(candidates, sizes, int(budget), mode, self.feature_names, order)
            hot = RowSet(list(self.feature_names), list(self.num_rows), rows)
            per_table = [int(rows.numel()) for rows in hot.rows]
            points.append(BudgetPoint(int(budget), sum(per_table), per_table, self.coverage(hot),
                                      self.all_hot_share(hot)))
        return points

    def suggest_budget(self, target_coverage: float = 0.9, embedding_dim: int | Sequence[int] = 16,
                       **row_size: Any) -> int | None:
        """The smallest budget (bytes) whose global cut covers ``target_coverage`` of the lookups, or ``None``."""
        sizes = self.bytes_per_row(embedding_dim, **row_size)
        return smallest_budget_for_coverage(self._candidates(), sizes, self.total_lookups, target_coverage)

    def skew(self, top_fraction: float = 0.01, min_count: int = 16) -> list[TableSkew]:
        """Per table: lookups, missing values apart, and over the present values the distinct rows seen, the share
        of lookups of the top ``top_fraction`` of those rows, and the fitted exponent (see :class:`TableSkew`).

        The top share is over the rows seen, not the table's rows: a hashed 10M-row table that 5,000 values fill
        has a top 1% of 50 rows, not of 100,000 (which would hold every lookup).
        """
        stats = []
        for name, num_rows in zip(self.feature_names, self.num_rows, strict=True):
            _, counts = self.present_counts(name)
            missing = self.missing_lookups(name)
            present = self.lookups[name] - missing
            distinct = int(counts.numel())
            stats.append(TableSkew(
                table=name, num_rows=num_rows, lookups=self.lookups[name], distinct_rows=distinct,
                top1_share=top_share(counts, distinct, top_fraction, total=present),
                exponent=fit_power_law(counts, min_count), exact=name in self.exact_counts,
                missing_row=self.missing_rows.get(name), missing_lookups=missing))
        return stats

    def sample_warning(self, min_inputs: int = MIN_SAMPLE_INPUTS, option: str = "sample_fraction") -> str | None:
        """Why the counted sample is too small for stable statistics, or ``None`` when it is not.

        Too small: fewer than ``min_inputs`` inputs counted, or a single batch counted of several seen. The
        message says how many inputs and batches were counted of how many, and the sample fraction (named
        ``option``, as the caller's user sets it) that would count enough.
        """
        counted, seen = self.num_inputs_counted, self.num_inputs_seen
        single_batch = self.num_batches_counted <= 1 < self.num_batches_seen
        if seen == 0 or (counted >= min_inputs and not single_batch):
            return None
        what = (f"only {counted} of {seen} inputs ({self.num_batches_counted} of {self.num_batches_seen} batches) "
                f"were counted")
        if self.sample_fraction >= 1.0:
            return f"{what}: the data has fewer than {min_inputs} inputs, so its statistics are rough"
        batches = self.num_batches_seen
        needed = max(min_inputs / seen, 2 / batches if batches > 1 else 0.0)
        suggested = _round_up(needed)
        if suggested <= self.sample_fraction:  # an unlucky draw: the expected sample was large enough
            suggested = min(1.0, 2 * self.sample_fraction)
        return (f"{what}: a {option} of {self.sample_fraction:g} is too small for stable statistics; "
                f"use {suggested:g} or more (at least {min_inputs} inputs in several batches)")

    def __repr__(self) -> str:
        return (f"AccessProfile({len(self.feature_names)} tables, {self.num_inputs_counted}/{self.num_inputs_seen} "
                f"inputs counted, {self.total_lookups} lookups, sample_fraction={self.sample_fraction})")


def _round_up(share: float) -> float:
    """``share`` rounded up to one significant digit (0.41 -> 0.5), at most 1."""
    exponent = math.floor(math.log10(share))
    return min(1.0, math.ceil(round(share / 10**exponent, 9)) * 10**exponent)


def _validate_arguments(feature_names: Sequence[str], num_rows: Sequence[int], sample_fraction: float,
                        sample_by: str, sketch_above_rows: int | None, sketch_counters: int,
                        reservoir_inputs: int, missing_rows: dict[str, int]) -> None:
    if len(feature_names) != len(num_rows) or not feature_names:
        raise ValueError(f"need one table size per feature (at least one), got {len(feature_names)} names and "
                         f"{len(num_rows)} sizes")
    if len(set(feature_names)) != len(feature_names):
        raise ValueError(f"feature names must be distinct, got {list(feature_names)}")
    if any(int(n) < 1 for n in num_rows):
        raise ValueError(f"every table needs at least one row, got {list(num_rows)}")
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    if sample_by not in ("inputs", "batches"):
        raise ValueError(f"sample_by must be 'inputs' or 'batches', got {sample_by!r}")
    if sketch_above_rows is not None and sketch_above_rows < 0:
        raise ValueError(f"sketch_above_rows must be None or >= 0, got {sketch_above_rows}")
    if sketch_counters < 1:
        raise ValueError(f"sketch_counters must be at least 1, got {sketch_counters}")
    if reservoir_inputs < 0:
        raise ValueError(f"reservoir_inputs must be >= 0, got {reservoir_inputs}")
    sizes = dict(zip(feature_names, num_rows, strict=True))
    for name, row in missing_rows.items():
        if name not in sizes:
            raise ValueError(f"missing_rows names feature {name!r}, which is not among {list(feature_names)}")
        if not 0 <= int(row) < int(sizes[name]):
            raise ValueError(f"missing_rows: feature {name!r} has {sizes[name]} rows, so its missing row must lie in "
                             f"[0, {sizes[name]}), got {row}")
