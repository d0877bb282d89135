"""AccessProfile: count embedding lookups per (table, row), pick the hot rows under a byte budget (FAE)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.rowsets import RowSet, lookups_in

__all__ = [
    "AccessProfile",
    "BudgetPoint",
    "TableSkew",
    "add_row_counts",
    "describe_datamodule",
    "fit_power_law",
    "global_hot_order",
    "lookup_coverage",
    "merge_heavy_hitters",
    "optimizer_state_elements",
    "profile_dataloader",
    "row_bytes",
    "sampled_mask",
    "select_hot_rows",
    "smallest_budget_for_coverage",
    "top_share",
]

PROFILE_FORMAT = "lightning-skew-access-profile"
PROFILE_VERSION = 1

# DataModule arguments that change how data is loaded, not which data: left out of a dataset description.
LOADER_ONLY_ARGUMENTS = frozenset({"batch_size", "num_workers", "pin_memory", "persistent_workers", "rank",
                                   "world_size"})

_MASK32 = 0xFFFFFFFF
# Salts keep the input sample and the reservoir's priorities independent for the same seed.
_SAMPLE_SALT, _RESERVOIR_SALT = 0x5EED, 0xB0770


# ----------------------------------------------------------------------------------------------------------
# Pure functions: sampling, counting, sketching
# ----------------------------------------------------------------------------------------------------------


def _hash32(positions: Tensor, seed: int) -> Tensor:
    """A 32-bit integer hash of ``(seed, position)`` on int64 tensors (products stay below 2^63)."""
    x = (positions & _MASK32) ^ ((seed * 0x9E3779B1) & _MASK32)
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def sampled_mask(first_position: int, count: int, fraction: float, seed: int) -> Tensor:
    """Which of the stream positions ``[first_position, first_position + count)`` a ``fraction`` sample keeps.

    Position ``i`` is kept when ``hash(seed, i) / 2^32 < fraction``: deterministic, independent of how
    the stream is cut into batches, and a Bernoulli(``fraction``) sample for practical purposes.
    """
    if fraction >= 1.0:
        return torch.ones(count, dtype=torch.bool)
    positions = torch.arange(first_position, first_position + count, dtype=torch.int64)
    return _hash32(positions, seed + _SAMPLE_SALT) < int(fraction * 2**32)


def add_row_counts(counts: Tensor, rows: Tensor, table: str = "table") -> Tensor:
    """Add one lookup per entry of ``rows`` to ``counts`` (int64, one entry per row of the table), in place.

    Costs O(len(rows)), not O(table rows), so it serves 10M-row tables batch after batch. Raises
    ``ValueError`` naming ``table`` when an ID lies outside ``[0, len(counts))``.
    """
    if rows.numel() == 0:
        return counts
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= counts.numel():
        raise ValueError(f"table {table!r}: row IDs must lie in [0, {counts.numel()}), found "
                         f"{low if low < 0 else high}; the DataModule's num_embeddings_per_feature and its IDs "
                         f"disagree")
    counts.index_put_((rows.long(),), torch.ones((), dtype=counts.dtype), accumulate=True)
    return counts


def merge_heavy_hitters(rows_a: Tensor, counts_a: Tensor, rows_b: Tensor, counts_b: Tensor,
                        capacity: int) -> tuple[Tensor, Tensor, int]:
    """Merge two Misra-Gries summaries (or exact counts of a batch) into one of at most ``capacity`` counters.

    Counts of equal rows are added; if more than ``capacity`` rows remain, the ``(capacity + 1)``-th
    largest count ``c`` is subtracted from every counter and counters at or below zero are dropped
    (Agarwal et al., "Mergeable summaries", 2012).

    Returns:
        ``(rows, counts, decrement)``: rows sorted by ID, their counts, and ``c`` (0 if nothing was
        dropped). A row's count falls by at most ``decrement`` in this step, and summed over all merges
        the decrements are at most ``N / (capacity + 1)`` for ``N`` counted lookups, because each one
        removes ``capacity + 1`` times itself from a total that never exceeds ``N``.
    """
    if capacity < 1:
        raise ValueError(f"a heavy-hitter summary needs at least 1 counter, got capacity={capacity}")
    rows, inverse = torch.unique(torch.cat([rows_a, rows_b]).long(), return_inverse=True)
    counts = torch.zeros(rows.numel(), dtype=torch.int64)
    counts.index_add_(0, inverse, torch.cat([counts_a, counts_b]).long())
    if rows.numel() <= capacity:
        return rows, counts, 0
    decrement = int(torch.topk(counts, capacity + 1, sorted=True).values[-1])
    counts = counts - decrement
    keep = counts > 0
    return rows[keep], counts[keep], decrement


# ----------------------------------------------------------------------------------------------------------
# Pure functions: bytes, hot sets, coverage, skew
# ----------------------------------------------------------------------------------------------------------


def optimizer_state_elements(optimizer: str, embedding_dim: int) -> int:
    """Optimizer state elements per embedding row: ``sgd`` 0, ``rowwise_adagrad`` 1, ``adagrad`` dim, ``adam`` 2 dim."""
    per_row = {"sgd": 0, "exact_sgd": 0, "rowwise_adagrad": 1, "exact_row_wise_adagrad": 1,
               "adagrad": embedding_dim, "exact_adagrad": embedding_dim, "adam": 2 * embedding_dim}
    if optimizer not in per_row:
        raise ValueError(f"unknown embedding optimizer {optimizer!r}; expected one of {sorted(per_row)} "
                         f"(or pass the state bytes per row yourself)")
    return per_row[optimizer]


def row_bytes(embedding_dim: int, bytes_per_element: int = 4, optimizer: str = "rowwise_adagrad",
              optimizer_bytes_per_row: int | None = None) -> int:
    """Bytes one hot row takes: ``dim * bytes_per_element`` plus its optimizer state.

    The state is ``optimizer_bytes_per_row`` when given, else ``optimizer_state_elements(optimizer, dim)``
    elements of ``bytes_per_element`` bytes (fp32 state for fp32 weights).
    """
    if embedding_dim < 1 or bytes_per_element < 1:
        raise ValueError(f"embedding_dim and bytes_per_element must be positive, got {embedding_dim}, "
                         f"{bytes_per_element}")
    if optimizer_bytes_per_row is None:
        optimizer_bytes_per_row = optimizer_state_elements(optimizer, embedding_dim) * bytes_per_element
    return embedding_dim * bytes_per_element + optimizer_bytes_per_row


Candidates = Sequence[tuple[Tensor, Tensor]]
"""Per table ``(rows, counts)``: the rows that may be hot and their lookup counts."""


def global_hot_order(candidates: Candidates, bytes_per_row: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All candidate rows of all tables, most counted first: ``(table, row, count, cumulative_bytes)``.

    Rows with a zero count are left out. Ties go to the earlier table, then to the earlier candidate
    (the smaller row ID, as profiles list their rows), so every hot set cut from it is deterministic.
    """
    tables, rows, counts, sizes = [], [], [], []
    for index, ((table_rows, table_counts), size) in enumerate(zip(candidates, bytes_per_row, strict=True)):
        seen = table_counts > 0
        rows.append(table_rows[seen].long())
        counts.append(table_counts[seen].long())
        tables.append(torch.full((int(seen.sum()),), index, dtype=torch.int64))
        sizes.append(torch.full((int(seen.sum()),), int(size), dtype=torch.int64))
    table, row, count, size = (torch.cat(parts) for parts in (tables, rows, counts, sizes))
    order = torch.argsort(count, descending=True, stable=True)
    return table[order], row[order], count[order], size[order].cumsum(0)


def _check_budget(budget_bytes: int, bytes_per_row: Sequence[int], names: Sequence[str] | None) -> None:
    smallest = min(bytes_per_row)
    if budget_bytes < smallest:
        table = bytes_per_row.index(smallest)
        label = f"table {names[table]!r}" if names else f"table {table}"
        raise ValueError(f"a budget of {budget_bytes} bytes is too small for any hot row: the smallest row "
                         f"({label}) takes {smallest} bytes with its optimizer state; raise the budget")


def select_hot_rows(candidates: Candidates, bytes_per_row: Sequence[int], budget_bytes: int,
                    mode: str = "global", names: Sequence[str] | None = None,
                    order: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> list[Tensor]:
    """The hot rows of each table under ``budget_bytes``, as sorted row IDs per table.

    Args:
        candidates: per table ``(rows, counts)``; rows with a zero count are never hot.
        bytes_per_row: bytes one row of each table takes (see :func:`row_bytes`).
        budget_bytes: the memory for hot rows, all tables together.
        mode: ``"global"`` (FAE): the most counted rows over all tables, in :func:`global_hot_order`,
            up to the first that no longer fits. ``"proportional"``: each table gets the share of the
            budget that it has of the lookups and fills it with its most counted rows. ``"equal"``:
            each table gets ``budget / tables``. Per-table shares that a table cannot use are not
            passed on, so those modes may leave part of the budget empty.
        names: table names for error messages.
        order: the ``global_hot_order(candidates, bytes_per_row)``, when already computed (curves reuse it).

    Raises:
        ValueError: if the budget is smaller than the smallest row, or ``mode`` is unknown.
    """
    _check_budget(budget_bytes, list(bytes_per_row), names)
    if mode == "global":
        order = global_hot_order(candidates, bytes_per_row) if order is None else order
        return _cut(order, budget_bytes, len(candidates))
    if mode not in ("proportional", "equal"):
        raise ValueError(f"mode must be 'global', 'proportional' or 'equal', got {mode!r}")
    lookups = torch.tensor([float(counts.sum()) for _, counts in candidates], dtype=torch.float64)
    if mode == "equal" or float(lookups.sum()) == 0:
        shares = torch.full((len(candidates),), 1.0 / len(candidates), dtype=torch.float64)
    else:
        shares = lookups / lookups.sum()
    hot = []
    for (rows, counts), size, share in zip(candidates, bytes_per_row, shares.tolist(), strict=True):
        take = int(budget_bytes * share) // int(size)
        order = torch.argsort(counts.long(), descending=True, stable=True)[:take]
        order = order[counts[order] > 0]
        hot.append(torch.sort(rows[order].long()).values)
    return hot


def _cut(order: tuple[Tensor, Tensor, Tensor, Tensor], budget_bytes: int, num_tables: int) -> list[Tensor]:
    """The longest prefix of a :func:`global_hot_order` whose bytes fit ``budget_bytes``, as rows per table."""
    table, row, _, cumulative = order
    chosen = int(torch.searchsorted(cumulative, torch.tensor(budget_bytes), right=True))
    return [torch.sort(row[:chosen][table[:chosen] == t]).values for t in range(num_tables)]


def lookup_coverage(candidates: Candidates, hot_rows: Sequence[Tensor], total_lookups: int) -> float:
    """Share of ``total_lookups`` that went to ``hot_rows``, from the counts of ``candidates``."""
    if total_lookups <= 0:
        return 0.0
    hit = 0
    for (rows, counts), hot in zip(candidates, hot_rows, strict=True):
        hit += int(counts[torch.isin(rows, hot)].sum())
    return hit / total_lookups


def smallest_budget_for_coverage(candidates: Candidates, bytes_per_row: Sequence[int], total_lookups: int,
                                 target: float = 0.9) -> int | None:
    """The smallest budget whose global cut covers at least ``target`` of ``total_lookups``, in bytes.

    ``None`` when the counted rows together cover less (a sketch dropped too many counts).
    """
    _, _, count, cumulative = global_hot_order(candidates, bytes_per_row)
    covered = count.cumsum(0)
    needed = int(torch.searchsorted(covered, torch.tensor(math.ceil(target * total_lookups)), right=False))
    return None if needed >= covered.numel() else int(cumulative[needed])


def top_share(counts: Tensor, num_rows: int, top_fraction: float = 0.01, total: int | None = None) -> float:
    """Share of lookups taken by the ``max(1, floor(top_fraction * num_rows))`` most counted rows.

    ``counts`` may list only some rows (a sketch); ``total`` is then the number of lookups counted.
    Same definition as :func:`lightning_skew.data.synthetic.expected_top_share`.
    """
    total = int(counts.sum()) if total is None else total
    if total <= 0:
        return 0.0
    top = max(1, int(top_fraction * num_rows))
    return float(torch.topk(counts.long(), min(top, counts.numel())).values.sum()) / total


def fit_power_law(counts: Tensor, min_count: int = 16, points: int = 64) -> float:
    """Power-law exponent ``s`` of ``count(rank) ~ rank ** -s``, fitted over the head of the popularity curve.

    Least squares of ``log count`` on ``log rank`` (rank 1 = most counted) at up to ``points``
    log-spaced ranks from 1 to the last rank counted at least ``min_count`` times, so every decade of
    ranks weighs the same and the noisy tail (where sorting Poisson counts inflates the curve) stays out.

    Valid when the head follows a power law (Zipf-like click logs: ``s`` in about 0.5-2); it measures
    the head only, so a table whose tail bends away still gets its head's exponent. Returns ``nan``
    when fewer than 3 distinct ranks reach ``min_count`` (too little data, or uniform popularity).
    """
    ordered = torch.sort(counts.double(), descending=True).values
    head = int((ordered >= min_count).sum())
    ranks = torch.unique(torch.logspace(0, math.log10(max(head, 1)), points, dtype=torch.float64).round().long())
    if head < 3 or ranks.numel() < 3:
        return float("nan")
    x = torch.log(ranks.double())
    y = torch.log(ordered[ranks - 1])
    x_centered = x - x.mean()
    slope = float((x_centered * (y - y.mean())).sum() / (x_centered * x_centered).sum())
    return -slope


# ----------------------------------------------------------------------------------------------------------
# Dataset descriptions
# ----------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def describe_datamodule(datamodule: Any) -> dict[str, Any]:
    """What data a DataModule delivers, as a JSON-able dict: its class and the arguments that pick the data.

    Reads ``hparams`` (``save_hyperparameters``); a DataModule without them is described by its public
    attributes of plain types. Arguments in ``LOADER_ONLY_ARGUMENTS`` (batch size, workers) are left
    out: they change how the data is loaded, not which data it is.
    """
    cls = type(datamodule)
    source = dict(getattr(datamodule, "hparams", {}) or {})
    if not source:
        source = {k: v for k, v in vars(datamodule).items() if not k.startswith("_") and _plain(v)}
    arguments = {k: v for k, v in source.items()
                 if not k.startswith("_") and k not in LOADER_ONLY_ARGUMENTS and _plain(v)}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "arguments": arguments}


def _fingerprint(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _description_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    if saved.get("class") != current.get("class"):
        return f"class {saved.get('class')} (profile) vs {current.get('class')} (here)"
    left, right = saved.get("arguments", {}), current.get("arguments", {})
    parts = [f"{key}={left.get(key, '<unset>')!r} (profile) vs {right.get(key, '<unset>')!r} (here)"
             for key in sorted(set(left) | set(right)) if left.get(key) != right.get(key)]
    return "; ".join(parts) or "descriptions differ"


# ----------------------------------------------------------------------------------------------------------
# The stateful profile
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSkew:
    """Skew statistics of one table (see :meth:`AccessProfile.skew`).

    ``distinct_rows`` is exact for counted tables and the number of tracked rows (a lower bound) for
    sketched ones; ``exact`` tells which.
    """

    table: str
    num_rows: int
    lookups: int
    distinct_rows: int
    top1_share: float
    exponent: float
    exact: bool


@dataclass(frozen=True)
class BudgetPoint:
    """Hot set quality at one budget: hot rows, lookup coverage and the share of inputs that are all hot."""

    budget_bytes: int
    hot_rows: int
    hot_rows_per_table: list[int]
    coverage: float
    all_hot_inputs: float


class AccessProfile:
    """Lookup counts per (table, row) of a dataset's training inputs, and the hot set they imply.

    Feed it batches (:meth:`update` with a ``KeyedJaggedTensor``, or :func:`profile_dataloader`), then
    ask for a hot set under a byte budget (:meth:`hot_rows`), its coverage, coverage curves
    (:meth:`coverage_curve`) and skew statistics (:meth:`skew`). Profiles of several workers
    :meth:`merge`; across ``torch.distributed`` ranks :meth:`all_reduce` makes every rank's profile
    the sum of all. :meth:`save` / :meth:`load` keep it for later runs.

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

    .. note::
        Counts are of the sample, not estimates: multiply by :attr:`scale` for the whole stream.
        Rows of sketched tables that the sketch dropped count as never seen, so coverages of
        sketched tables are lower bounds.

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
    ) -> None:
        _validate_arguments(feature_names, num_rows, sample_fraction, sample_by, sketch_above_rows,
                            sketch_counters, reservoir_inputs)
        self.feature_names = list(feature_names)
        self.num_rows = [int(n) for n in num_rows]
        self.sample_fraction = float(sample_fraction)
        self.sample_by = sample_by
        self.seed = int(seed)
        self.sketch_above_rows = sketch_above_rows
        self.sketch_counters = int(sketch_counters)
        self.reservoir_inputs = int(reservoir_inputs)
        self.dataset = dict(dataset or {"class": "unknown", "arguments": {}})
        self.sketched = [sketch_above_rows is not None and n > sketch_above_rows for n in self.num_rows]
        self.exact_counts: dict[str, Tensor] = {
            name: torch.zeros(n, dtype=torch.int64)
            for name, n, sketched in zip(self.feature_names, self.num_rows, self.sketched, strict=True)
            if not sketched}
        self.sketches: dict[str, tuple[Tensor, Tensor]] = {
            name: (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
            for name, sketched in zip(self.feature_names, self.sketched, strict=True) if sketched}
        self.sketch_errors: dict[str, int] = {name: 0 for name in self.sketches}
        self._pending: dict[str, list[Tensor]] = {name: [] for name in self.sketches}
        self.lookups = {name: 0 for name in self.feature_names}
        self.num_inputs_seen = 0
        self.num_inputs_counted = 0
        self.num_batches_seen = 0
        # (priority, keys, values, lengths) of the kept batches, lowest priority first.
        self.reservoir: list[tuple[int, list[str], Tensor, Tensor]] = []
        self._rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.seconds = 0.0  # time spent in profile_dataloader, loading included

    @classmethod
    def for_datamodule(cls, datamodule: Any, **kwargs: Any) -> AccessProfile:
        """An empty profile of a RecDataModule's tables, describing its data (``kwargs`` as in the class)."""
        return cls(datamodule.sparse_feature_names, datamodule.num_embeddings_per_feature,
                   dataset=describe_datamodule(datamodule), **kwargs)

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

    def _count(self, key: str, rows: Tensor) -> None:
        self.lookups[key] += rows.numel()
        if key in self.exact_counts:
            add_row_counts(self.exact_counts[key], rows, key)
            return
        index = self.feature_names.index(key)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows[index]):
            add_row_counts(torch.zeros(self.num_rows[index], dtype=torch.int64), rows, key)  # raises
        self._pending[key].append(rows.long())
        # Merging buffered batches at once costs the same error bound and far fewer sorts.
        if sum(p.numel() for p in self._pending[key]) >= self.sketch_counters:
            self._flush(key)

    def _flush(self, key: str | None = None) -> None:
        for name in [key] if key is not None else list(self._pending):
            if not self._pending[name]:
                continue
            batch_rows, batch_counts = torch.unique(torch.cat(self._pending[name]), return_counts=True)
            self._pending[name] = []
            rows, counts = self.sketches[name]
            rows, counts, decrement = merge_heavy_hitters(rows, counts, batch_rows, batch_counts,
                                                          self.sketch_counters)
            self.sketches[name] = (rows, counts)
            self.sketch_errors[name] += decrement

    def _offer_to_reservoir(self, keys: list[str], values: Tensor, lengths: Tensor) -> None:
        if self.reservoir_inputs <= 0:
            return
        position = torch.tensor([self.num_batches_seen], dtype=torch.int64)
        priority = int(_hash32(position, self.seed + _RESERVOIR_SALT + 7919 * self._rank)[0])
        kept_inputs = sum(int(entry[3].numel()) // len(entry[1]) for entry in self.reservoir)
        if kept_inputs >= self.reservoir_inputs and priority >= self.reservoir[-1][0]:
            return
        self.reservoir = _trim_reservoir(self.reservoir + [(priority, list(keys), values.clone(), lengths.clone())],
                                         self.reservoir_inputs)

    # ------------------------------------------------------------------------------------------------------
    # Reading counts
    # ------------------------------------------------------------------------------------------------------

    def counts(self, table: str) -> tuple[Tensor, Tensor]:
        """``(rows, counts)`` of a table: every row for an exact table, the tracked rows for a sketched one."""
        if table in self.exact_counts:
            counts = self.exact_counts[table]
            return torch.arange(counts.numel()), counts
        if table not in self.sketches:
            raise KeyError(f"no table {table!r}; the profile has {self.feature_names}")
        self._flush(table)
        return self.sketches[table]

    def dense_counts(self, table: str) -> Tensor:
        """Counts of every row of a table as one int64 tensor (0 for rows a sketch does not track)."""
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
        """Share of the reservoir's inputs whose every lookup hits ``hot`` (``nan`` with an empty reservoir)."""
        sample = self._reservoir_sample()
        if sample is None:
            return float("nan")
        hits, lookups = lookups_in(sample, hot)
        return float((hits == lookups).double().mean())

    def _reservoir_sample(self) -> KeyedJaggedTensor | None:
        """The reservoir's batches as one KJT (cached until the reservoir changes)."""
        if not self.reservoir:
            return None
        key = tuple(entry[0] for entry in self.reservoir)
        if getattr(self, "_sample_cache", (None,))[0] != key:
            keys = list(dict.fromkeys(k for entry in self.reservoir for k in entry[1]))
            values: dict[str, list[Tensor]] = {k: [] for k in keys}
            lengths: dict[str, list[Tensor]] = {k: [] for k in keys}
            for _, entry_keys, entry_values, entry_lengths in self.reservoir:
                batch_size = entry_lengths.numel() // len(entry_keys)
                per_key_lengths = entry_lengths.reshape(len(entry_keys), batch_size)
                per_key_values = torch.split(entry_values, per_key_lengths.sum(dim=1).tolist())
                for k in keys:  # a feature missing from a batch: no lookups for its inputs
                    if k in entry_keys:
                        index = entry_keys.index(k)
                        values[k].append(per_key_values[index])
                        lengths[k].append(per_key_lengths[index])
                    else:
                        lengths[k].append(torch.zeros(batch_size, dtype=entry_lengths.dtype))
            sample = KeyedJaggedTensor(keys=keys, values=torch.cat([v for k in keys for v in values[k]]),
                                       lengths=torch.cat([n for k in keys for n in lengths[k]]))
            self._sample_cache = (key, sample)
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
        """Per table: lookups, distinct rows, share of the top ``top_fraction`` rows, fitted exponent."""
        stats = []
        for name, num_rows in zip(self.feature_names, self.num_rows, strict=True):
            _, counts = self.counts(name)
            lookups = self.lookups[name]
            stats.append(TableSkew(
                table=name, num_rows=num_rows, lookups=lookups, distinct_rows=int((counts > 0).sum()),
                top1_share=top_share(counts, num_rows, top_fraction, total=lookups),
                exponent=fit_power_law(counts, min_count), exact=name in self.exact_counts))
        return stats

    # ------------------------------------------------------------------------------------------------------
    # Merging across workers and ranks
    # ------------------------------------------------------------------------------------------------------

    def merge(self, other: AccessProfile) -> AccessProfile:
        """A new profile counting both profiles' inputs (same tables and sampling, else ``ValueError``)."""
        merged = AccessProfile.from_state_dict(self.state_dict())
        merged._add(other.state_dict())
        return merged

    def _add(self, state: dict[str, Any]) -> None:
        """Add another profile's state (its exact counts may be missing: :meth:`all_reduce` sums them apart)."""
        self._check_compatible(state, "merge")
        for name, counts in state["exact_counts"].items():
            self.exact_counts[name] += counts
        self._flush()
        for name, (rows, counts) in state["sketches"].items():
            own_rows, own_counts = self.sketches[name]
            rows, counts, decrement = merge_heavy_hitters(own_rows, own_counts, rows, counts, self.sketch_counters)
            self.sketches[name] = (rows, counts)
            self.sketch_errors[name] += state["sketch_errors"][name] + decrement
        for name, lookups in state["lookups"].items():
            self.lookups[name] += lookups
        self.num_inputs_seen += state["num_inputs_seen"]
        self.num_inputs_counted += state["num_inputs_counted"]
        self.num_batches_seen += state["num_batches_seen"]
        self.reservoir = _trim_reservoir(self.reservoir + _reservoir_from_state(state["reservoir"]),
                                         self.reservoir_inputs)

    def all_reduce(self) -> AccessProfile:
        """Make every ``torch.distributed`` rank's profile the merge of all ranks' (no-op when not initialized).

        Exact counts are summed with ``all_reduce``; sketches, totals and reservoirs are gathered and
        merged in rank order, so every rank ends with the same profile. Returns ``self``.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        self._flush()
        light = self.state_dict(include_exact=False)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, light)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        for name, counts in self.exact_counts.items():
            buffer = counts.to(device) if device is not None else counts
            dist.all_reduce(buffer)
            self.exact_counts[name] = buffer.cpu()
        summed = self.exact_counts
        fresh = AccessProfile.from_state_dict({**gathered[0], "exact_counts": {}})
        for state in gathered[1:]:
            fresh._add({**state, "exact_counts": {}})
        self.__dict__.update(fresh.__dict__)
        self.exact_counts = summed
        return self

    # ------------------------------------------------------------------------------------------------------
    # State, files
    # ------------------------------------------------------------------------------------------------------

    def state_dict(self, include_exact: bool = True) -> dict[str, Any]:
        """Everything the profile knows, as plain tensors, numbers, strings, lists and dicts."""
        self._flush()
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "dataset": self.dataset,
            "dataset_fingerprint": _fingerprint(self.dataset),
            "feature_names": list(self.feature_names),
            "num_rows": list(self.num_rows),
            "sample_fraction": self.sample_fraction,
            "sample_by": self.sample_by,
            "seed": self.seed,
            "sketch_above_rows": self.sketch_above_rows,
            "sketch_counters": self.sketch_counters,
            "reservoir_inputs": self.reservoir_inputs,
            "num_inputs_seen": self.num_inputs_seen,
            "num_inputs_counted": self.num_inputs_counted,
            "num_batches_seen": self.num_batches_seen,
            "lookups": dict(self.lookups),
            "exact_counts": {k: v.clone() for k, v in self.exact_counts.items()} if include_exact else {},
            "sketches": {k: (r.clone(), c.clone()) for k, (r, c) in self.sketches.items()},
            "sketch_errors": dict(self.sketch_errors),
            "reservoir": [{"priority": p, "keys": k, "values": v, "lengths": n} for p, k, v, n in self.reservoir],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AccessProfile:
        """Rebuild a profile from :meth:`state_dict`."""
        if state.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not an access profile (format {state.get('format')!r}, expected {PROFILE_FORMAT!r})")
        if state.get("version") != PROFILE_VERSION:
            raise ValueError(f"access profile version {state.get('version')} is not supported "
                             f"(this lightning-skew reads version {PROFILE_VERSION})")
        profile = cls(state["feature_names"], state["num_rows"], state["sample_fraction"], state["sample_by"],
                      state["seed"], state["sketch_above_rows"], state["sketch_counters"],
                      state["reservoir_inputs"], state["dataset"])
        for name, counts in state["exact_counts"].items():
            profile.exact_counts[name] = counts.clone().long()
        for name, (rows, counts) in state["sketches"].items():
            profile.sketches[name] = (rows.clone().long(), counts.clone().long())
        profile.sketch_errors.update(state["sketch_errors"])
        profile.lookups.update(state["lookups"])
        profile.num_inputs_seen = state["num_inputs_seen"]
        profile.num_inputs_counted = state["num_inputs_counted"]
        profile.num_batches_seen = state["num_batches_seen"]
        profile.reservoir = _reservoir_from_state(state["reservoir"])
        return profile

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this profile's contents with ``state`` (after checking that it describes the same tables)."""
        self._check_tables(state["feature_names"], state["num_rows"], "the state")
        self.__dict__.update(AccessProfile.from_state_dict(state).__dict__)

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
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        profile = cls.from_state_dict(state)
        if datamodule is not None:
            feature_names = feature_names or datamodule.sparse_feature_names
            num_rows = num_rows or datamodule.num_embeddings_per_feature
            dataset = dataset or describe_datamodule(datamodule)
        where = f"access profile {path}"
        if feature_names is not None:
            profile._check_tables(feature_names, num_rows if num_rows is not None else profile.num_rows, where)
        elif num_rows is not None:
            profile._check_tables(profile.feature_names, num_rows, where)
        if dataset is not None and _fingerprint(dataset) != _fingerprint(profile.dataset):
            raise ValueError(f"{where} was made from other data: {_description_difference(profile.dataset, dataset)}"
                             f"; profile this dataset again")
        return profile

    def _check_tables(self, feature_names: Sequence[str], num_rows: Sequence[int], where: str) -> None:
        if list(feature_names) != self.feature_names:
            missing = [n for n in feature_names if n not in self.feature_names]
            extra = [n for n in self.feature_names if n not in feature_names]
            detail = (f"features missing from the profile: {missing}; features only in the profile: {extra}"
                      if missing or extra else "the same features in another order")
            raise ValueError(f"{where} describes other tables: {detail} (profile: {self.feature_names}, "
                             f"here: {list(feature_names)})")
        differ = [f"{name!r} has {mine} rows in the profile, {theirs} here"
                  for name, mine, theirs in zip(self.feature_names, self.num_rows, num_rows, strict=True)
                  if int(mine) != int(theirs)]
        if differ:
            raise ValueError(f"{where} describes other table sizes: " + "; ".join(differ))

    def _check_compatible(self, state: dict[str, Any], what: str) -> None:
        self._check_tables(state["feature_names"], state["num_rows"], f"cannot {what}: the other profile")
        if state["dataset_fingerprint"] != _fingerprint(self.dataset):
            raise ValueError(f"cannot {what} profiles of different data: "
                             f"{_description_difference(state['dataset'], self.dataset)}")
        for key in ("sample_fraction", "sample_by", "sketch_above_rows", "sketch_counters"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot {what} profiles with different {key}: {getattr(self, key)!r} and "
                                 f"{state[key]!r}")

    def __repr__(self) -> str:
        return (f"AccessProfile({len(self.feature_names)} tables, {self.num_inputs_counted}/{self.num_inputs_seen} "
                f"inputs counted, {self.total_lookups} lookups, sample_fraction={self.sample_fraction})")


def _validate_arguments(feature_names: Sequence[str], num_rows: Sequence[int], sample_fraction: float,
                        sample_by: str, sketch_above_rows: int | None, sketch_counters: int,
                        reservoir_inputs: int) -> None:
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


def _trim_reservoir(entries: list[tuple[int, list[str], Tensor, Tensor]],
                    limit: int) -> list[tuple[int, list[str], Tensor, Tensor]]:
    """Keep the lowest-priority batches while they hold fewer than ``limit`` inputs (at least one batch)."""
    kept, inputs = [], 0
    for entry in sorted(entries, key=lambda e: e[0]):
        if kept and inputs >= limit:
            break
        kept.append(entry)
        inputs += entry[3].numel() // max(len(entry[1]), 1)
    return kept


def _reservoir_from_state(entries: list[dict[str, Any]]) -> list[tuple[int, list[str], Tensor, Tensor]]:
    return [(int(e["priority"]), list(e["keys"]), e["values"], e["lengths"]) for e in entries]


def profile_dataloader(profile: AccessProfile, batches: Iterable[Any], progress: bool = True,
                       max_batches: int | None = None, description: str = "profiling") -> AccessProfile:
    """Feed every batch (a torchrec ``Batch`` or a ``KeyedJaggedTensor``) of ``batches`` to ``profile``.

    Shows a tqdm bar with inputs per second when ``progress``; stops after ``max_batches``. Returns
    ``profile``, with :attr:`AccessProfile.seconds` set to the time spent (loading included).

    When the profile samples whole batches (``sample_by="batches"``) and the loader's dataset can produce
    any batch on its own (a ``batch_at(index)`` method and ``batch_size``, as the synthetic stream has),
    batches outside the sample are never produced: a 5% profile then costs about 5% of a pass.
    """
    from tqdm.auto import tqdm

    source = getattr(batches, "dataset", batches)
    if profile.sample_by == "batches" and hasattr(source, "batch_at") and hasattr(source, "batch_size"):
        batches = _SampledBatches(profile, source)

    total = None
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    began = time.perf_counter()
    with tqdm(total=total, desc=description, unit="batch", disable=not progress, dynamic_ncols=True) as bar:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if batch is not None:  # None: a batch outside the sample, already accounted for
                profile.update(batch if isinstance(batch, KeyedJaggedTensor) else batch.sparse_features)
            bar.update(1)
            if index % 20 == 0:
                elapsed = max(time.perf_counter() - began, 1e-9)
                bar.set_postfix(inputs_per_s=f"{profile.num_inputs_seen / elapsed:,.0f}", refresh=False)
    profile.seconds = time.perf_counter() - began
    return profile



class _SampledBatches:
    """Yields the sampled batches of a seekable stream and accounts for the others without producing them."""

    def __init__(self, profile: AccessProfile, source: Any) -> None:
        self.profile, self.source = profile, source

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        for index in range(len(self.source)):
            if self.profile.counts_next_batch():
                yield self.source.batch_at(index)
            else:
                self.profile.skip_batch(self.source.batch_size)
                yield None
