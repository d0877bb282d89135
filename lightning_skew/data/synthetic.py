"""Synthetic Criteo-shaped click logs with power-law ID popularity, a hidden teacher and optional drift."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchmetrics.functional.classification import binary_auroc
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.data.base import Batch, RecDataModule
from lightning_skew.data.features import (
    CRITEO_KAGGLE_CARDINALITIES,
    CRITEO_NUM_DENSE,
    CRITEO_SPARSE_NAMES,
    capped_cardinalities,
)

__all__ = [
    "ClickLogSamples",
    "PowerLawTables",
    "SyntheticClickLog",
    "SyntheticClickStream",
    "SyntheticDataModule",
    "calibrate_bias",
    "drift_ranks",
    "expected_top_share",
    "generation_throughput",
    "hashed_gaussian",
    "power_law_cdf",
    "rank_to_row",
    "sample_power_law_ranks",
    "scatter_multiplier",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")

# The HEAD_ROWS most popular ranks of a table are sampled from their exact probabilities (k+1)^-s;
# the rest from the closed-form inverse CDF of the density x^-s on [HEAD_ROWS + 0.5, N + 0.5), rank
# k taking the mass of [k + 0.5, k + 1.5) (midpoint rule, relative error < s(s+1)/(24 k^2) < 1e-5).
HEAD_ROWS = 256

# Each split is a stream cut into chunks of this many samples; a chunk's randomness comes from a
# generator seeded by (seed, split, chunk), so any sample range is generated without its prefix.
# Changing it changes every generated stream.
STREAM_CHUNK_SAMPLES = 512

# Samples of a separate stream on which the teacher's bias is fitted to the requested click rate.
CALIBRATION_SAMPLES = 16384

# Share of the teacher's logit variance that comes from the dense features (the rest: sparse rows).
DENSE_LOGIT_SHARE = 0.3

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
# |1 - s| below this is treated as this: keeps one formula for s == 1 (log) and s != 1 (powers).
_MIN_ABS_POWER = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Pure math: popularity, rank -> row mapping, drift, teacher
# ----------------------------------------------------------------------------------------------------------


def _tail_power(exponent: Tensor) -> Tensor:
    power = 1.0 - exponent
    return torch.where(power.abs() < _MIN_ABS_POWER, torch.full_like(power, _MIN_ABS_POWER), power)


def _tail_mass(log_lo: Tensor, log_hi: Tensor, power: Tensor) -> Tensor:
    """Integral of x^-s over [lo, hi] with ``power = 1 - s``, stable for s near 1."""
    return torch.exp(power * log_lo) * torch.expm1(power * (log_hi - log_lo)) / power


def _alias_table(weights: list[float]) -> tuple[list[float], list[int]]:
    """Walker/Vose alias table: cell ``i`` keeps itself with probability ``prob[i]``, else ``alias[i]``."""
    size, total = len(weights), sum(weights)
    scaled = [w * size / total for w in weights]
    prob, alias = [1.0] * size, list(range(size))
    small = [i for i, w in enumerate(scaled) if w < 1.0]
    large = [i for i, w in enumerate(scaled) if w >= 1.0]
    while small and large:
        low, high = small.pop(), large.pop()
        prob[low], alias[low] = scaled[low], high
        scaled[high] -= 1.0 - scaled[low]
        (small if scaled[high] < 1.0 else large).append(high)
    return prob, alias


@dataclass(frozen=True)
class PowerLawTables:
    """Precomputed power-law samplers for several tables at once (one row of each tensor per table).

    Rank ``k`` of a table with ``N`` rows and exponent ``s`` has probability proportional to
    ``(k + 1) ** -s`` for ``k < HEAD_ROWS`` (exact, sampled with an alias table) and to the integral of
    ``x ** -s`` over ``[k + 0.5, k + 1.5)`` beyond (closed-form inverse CDF), so a 10M-row table costs
    no more than a 300-row one. :meth:`cdf` is the exact CDF of this distribution.
    """

    num_rows: Tensor  # [M] int64
    head_rows: Tensor  # [M] int64, min(N, HEAD_ROWS)
    head_cdf: Tensor  # [M, HEAD_ROWS] float64, P(rank <= k), padded with 2.0 past head_rows
    head_share: Tensor  # [M] float64, P(rank < head_rows)
    head_scale: Tensor  # [M] float64, head_rows / head_share: maps a head uniform to an alias cell
    head_prob: Tensor  # [M * HEAD_ROWS] float64, alias-table keep probabilities, flattened
    head_alias: Tensor  # [M * HEAD_ROWS] int64, alias-table alternatives, flattened
    tail_log_lo: Tensor  # [M] float64, log(head_rows + 0.5)
    tail_log_hi: Tensor  # [M] float64, log(N + 0.5)
    tail_power: Tensor  # [M] float64, 1 - s (never exactly 0)
    tail_expm1: Tensor  # [M] float64, expm1((1 - s) * (log_hi - log_lo))

    @classmethod
    def build(cls, num_rows: Sequence[int], exponents: Sequence[float]) -> PowerLawTables:
        rows = torch.tensor(list(num_rows), dtype=torch.int64)
        exponent = torch.tensor(list(exponents), dtype=torch.float64)
        head_rows = rows.clamp(max=HEAD_ROWS)
        ranks = torch.arange(HEAD_ROWS, dtype=torch.float64)
        in_head = ranks[None, :] < head_rows[:, None]
        head_weight = torch.where(in_head, (ranks[None, :] + 1.0) ** -exponent[:, None], 0.0)
        head_cum = head_weight.cumsum(dim=1)
        head_mass = head_cum[:, -1]
        power = _tail_power(exponent)
        log_lo = torch.log(head_rows.double() + 0.5)
        log_hi = torch.log(rows.double() + 0.5)
        tail_mass = _tail_mass(log_lo, log_hi, power)
        total = head_mass + tail_mass
        head_cdf = torch.where(in_head, head_cum / total[:, None], 2.0)
        head_prob = torch.ones(len(rows), HEAD_ROWS, dtype=torch.float64)
        head_alias = torch.zeros(len(rows), HEAD_ROWS, dtype=torch.int64)
        built: dict[tuple[int, float], tuple[list[float], list[int]]] = {}
        for column, (size, s) in enumerate(zip(head_rows.tolist(), exponent.tolist(), strict=True)):
            if (size, s) not in built:
                built[(size, s)] = _alias_table(head_weight[column, :size].tolist())
            prob, alias = built[(size, s)]
            head_prob[column, :size] = torch.tensor(prob, dtype=torch.float64)
            head_alias[column, :size] = torch.tensor(alias, dtype=torch.int64)
        head_share = head_mass / total
        return cls(
            num_rows=rows,
            head_rows=head_rows,
            head_cdf=head_cdf.contiguous(),
            head_share=head_share,
            head_scale=head_rows.double() / head_share,
            head_prob=head_prob.reshape(-1),
            head_alias=head_alias.reshape(-1),
            tail_log_lo=log_lo,
            tail_log_hi=log_hi,
            tail_power=power,
            tail_expm1=torch.expm1(power * (log_hi - log_lo)),
        )

    def sample(self, uniforms: Tensor) -> Tensor:
        """Map float64 uniforms in [0, 1) of shape ``[M, n]`` (row ``m`` for table ``m``) to ranks.

        One uniform serves both parts: below ``head_share`` it picks an alias cell (integer part) and
        decides between the cell and its alias (fractional part); above, it inverts the tail CDF.
        """
        head_share = self.head_share[:, None]
        in_head = uniforms < head_share
        position = uniforms * self.head_scale[:, None]
        cell = position.floor()
        keep = position - cell
        cell = torch.minimum(cell.to(torch.int64), self.head_rows[:, None] - 1)
        flat = cell + torch.arange(0, cell.shape[0] * HEAD_ROWS, HEAD_ROWS)[:, None]
        head_rank = torch.where(keep < self.head_prob.take(flat), cell, self.head_alias.take(flat))
        tail_share = (1.0 - head_share).clamp(min=1e-300)
        within_tail = ((uniforms - head_share) / tail_share).clamp_(0.0, 1.0)
        # Inverse of the tail CDF: x^p = lo^p + v (hi^p - lo^p), solved in log space.
        log_x = torch.log1p(within_tail.mul_(self.tail_expm1[:, None])).div_(self.tail_power[:, None])
        log_x.add_(self.tail_log_lo[:, None])
        tail_rank = log_x.exp_().sub_(0.5).floor_().to(torch.int64)
        tail_rank = torch.minimum(torch.maximum(tail_rank, self.head_rows[:, None]), self.num_rows[:, None] - 1)
        return torch.where(in_head, head_rank, tail_rank)

    def cdf(self, ranks: Tensor) -> Tensor:
        """P(rank < k) for integer ``k`` in ``[0, N]``, shape ``[M, n]``, as float64."""
        ranks = ranks.to(torch.int64)
        head_index = (ranks.clamp(max=HEAD_ROWS) - 1).clamp(min=0).contiguous()
        head_part = torch.where(ranks > 0, torch.gather(self.head_cdf, 1, head_index), 0.0)
        head_part = torch.where(ranks >= self.head_rows[:, None], self.head_share[:, None], head_part)
        log_k = torch.log(torch.maximum(ranks, self.head_rows[:, None]).double() + 0.5)
        tail_total = _tail_mass(self.tail_log_lo, self.tail_log_hi, self.tail_power)[:, None]
        tail_part = _tail_mass(self.tail_log_lo[:, None], log_k, self.tail_power[:, None])
        tail_part = tail_part / tail_total.clamp(min=1e-300) * (1.0 - self.head_share[:, None])
        return head_part + torch.where(ranks > self.head_rows[:, None], tail_part, 0.0)


def sample_power_law_ranks(uniforms: Tensor, num_rows: int, exponent: float) -> Tensor:
    """Popularity ranks (0 = most popular) of one table from float64 uniforms in [0, 1), any shape.

    See :class:`PowerLawTables` for the distribution: exact ``(k + 1) ** -s`` for the most popular
    ``HEAD_ROWS`` ranks, a continuous approximation beyond. ``exponent = 0`` is uniform.
    """
    tables = PowerLawTables.build([num_rows], [exponent])
    return tables.sample(uniforms.reshape(1, -1).double()).reshape(uniforms.shape)


def power_law_cdf(ranks: Tensor, num_rows: int, exponent: float) -> Tensor:
    """P(rank < k) under the distribution :func:`sample_power_law_ranks` samples from."""
    tables = PowerLawTables.build([num_rows], [exponent])
    return tables.cdf(torch.as_tensor(ranks).reshape(1, -1)).reshape(torch.as_tensor(ranks).shape)


def expected_top_share(num_rows: int, exponent: float, top_fraction: float = 0.01) -> float:
    """Share of lookups that go to the ``max(1, floor(top_fraction * num_rows))`` most popular rows.

    Exact for the distribution that :func:`sample_power_law_ranks` (and so the generator) samples from.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    top_rows = max(1, int(top_fraction * num_rows))
    return float(power_law_cdf(torch.tensor([top_rows]), num_rows, exponent)[0])


def scatter_multiplier(num_rows: int, fraction: float) -> int:
    """A multiplier coprime to ``num_rows`` near ``fraction * num_rows``, so ``a*k mod N`` is a bijection."""
    multiplier = max(1, int(fraction * num_rows))
    while math.gcd(multiplier, num_rows) != 1:
        multiplier += 1
    return multiplier


def rank_to_row(ranks: Tensor, num_rows: Tensor | int, multiplier: Tensor | int, offset: Tensor | int) -> Tensor:
    """Row ID of each popularity rank: ``(multiplier * rank + offset) mod num_rows``, as hashing would scatter.

    A bijection on ``[0, num_rows)`` when ``gcd(multiplier, num_rows) == 1`` (see :func:`scatter_multiplier`).
    Arguments broadcast; products stay below 2^63 for tables of up to ~3e9 rows.
    """
    return (ranks * multiplier + offset) % num_rows


def drift_ranks(ranks: Tensor, num_rows: Tensor | int, period: Tensor | int, shift: Tensor | int) -> Tensor:
    """Ranks after ``period`` drifts of ``shift`` each: the row at rank k is the one formerly at k + shift.

    So the ``shift`` hottest rows become the coldest and rows that were ``shift`` ranks down become hot.
    """
    return (ranks + (period * shift) % num_rows) % num_rows


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2^32) (products stay < 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


# Normal quantiles at the midpoints of 2^16 equal-probability cells: a hash's top 16 bits index it,
# which is 8x cheaper than calling ndtri per lookup.
_NORMAL_QUANTILES = torch.special.ndtri((torch.arange(2**16, dtype=torch.float64) + 0.5) / 2**16).float()


def hashed_gaussian(rows: Tensor, salt: Tensor | int) -> Tensor:
    """A standard-normal value (16-bit quantised) per (salt, row) from a hash: a lookup table without the table."""
    return _NORMAL_QUANTILES.take(_mix32((rows ^ salt) & _MASK32) >> 16)


def calibrate_bias(logits: Tensor, click_rate: float) -> float:
    """The bias ``b`` with ``mean(sigmoid(logits + b)) == click_rate`` (bisection; the mean is monotone in b)."""
    logits = logits.double()
    low, high = -30.0 - float(logits.max()), 30.0 - float(logits.min())
    for _ in range(60):
        middle = 0.5 * (low + high)
        if float(torch.sigmoid(logits + middle).mean()) < click_rate:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


# Random streams: the three splits, the hidden structure, and the sample that calibrates the bias.
_STREAMS = {"train": 0, "val": 1, "test": 2, "structure": 3, "calibration": 4}


def _chunk_seed(seed: int, stream: str, chunk: int) -> int:
    # torch's CPU generator keeps only the low 32 bits of a seed; mix everything into them.
    mixed = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ _STREAMS[stream]) ^ chunk)
    return (mixed ^ (mixed >> 32)) & _MASK32


# ----------------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClickLogSamples:
    """A range of a synthetic click log: what a model sees plus the true click probability."""

    dense: Tensor  # [n, num_dense] float32, log(1 + count)
    rows: Tensor  # [num_id_columns, n] int64, feature f owns multi_hot[f] consecutive columns
    labels: Tensor  # [n] float32, 0/1
    click_probability: Tensor  # [n] float32, sigmoid of the teacher's logit


class SyntheticClickLog:
    """A deterministic, seekable synthetic click log: sample ``i`` of a split is a pure function of the seed.

    Construction draws the hidden structure from ``seed``: per table the rank -> row bijection, the
    teacher's per-row effect salt, the dense features' scales and weights. Splits share that structure
    and differ in their random streams. Arguments are as in :class:`SyntheticDataModule`, already
    validated.
    """

    def __init__(
        self,
        num_embeddings_per_feature: Sequence[int],
        popularity_exponents: Sequence[float],
        multi_hot: Sequence[int],
        num_dense: int = CRITEO_NUM_DENSE,
        seed: int = 0,
        drift_every_samples: int | None = None,
        drift_fraction: float = 0.01,
        click_rate: float = 0.25,
        logit_std: float = 1.4,
    ) -> None:
        self.num_embeddings_per_feature = list(num_embeddings_per_feature)
        self.multi_hot = list(multi_hot)
        self.num_dense = num_dense
        self.seed = seed
        self.drift_every_samples = drift_every_samples
        num_features = len(self.num_embeddings_per_feature)
        column_feature = [f for f in range(num_features) for _ in range(self.multi_hot[f])]
        self.num_id_columns = len(column_feature)
        column_rows = [self.num_embeddings_per_feature[f] for f in column_feature]
        self.tables = PowerLawTables.build(column_rows, [popularity_exponents[f] for f in column_feature])

        structure = torch.Generator().manual_seed(_chunk_seed(seed, "structure", 0))

        def uniform(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=structure, dtype=torch.float64)

        tables = self.num_embeddings_per_feature
        spread = (0.2 + 0.6 * uniform(num_features)).tolist()
        multipliers = [scatter_multiplier(rows, u) for rows, u in zip(tables, spread, strict=True)]
        offsets = [int(u * rows) for rows, u in zip(tables, uniform(num_features).tolist(), strict=True)]
        salts = (uniform(num_features) * 2**32).to(torch.int64)
        shifts = [max(1, round(drift_fraction * rows)) for rows in self.num_embeddings_per_feature]
        index = torch.tensor(column_feature, dtype=torch.int64)
        self.column_rows = self.tables.num_rows[:, None]
        self.column_multiplier = torch.tensor(multipliers, dtype=torch.int64)[index][:, None]
        self.column_offset = torch.tensor(offsets, dtype=torch.int64)[index][:, None]
        self.column_shift = torch.tensor(shifts, dtype=torch.int64)[index][:, None]
        self.column_salt = salts[index][:, None]
        # Per-feature effect std, divided by sqrt(multi_hot) so multi-hot keeps the logit's variance.
        sparse_std = logit_std * math.sqrt((1.0 - DENSE_LOGIT_SHARE) / num_features)
        self.column_scale = torch.tensor(
            [sparse_std / math.sqrt(self.multi_hot[f]) for f in column_feature], dtype=torch.float32
        )[:, None]

        # Dense counts: log-normal latent floor(exp(mu + sigma z)); the model sees log(1 + count).
        self.dense_mu = (uniform(num_dense) * 3.0).float()
        self.dense_sigma = (0.5 + uniform(num_dense)).float()
        dense_std = logit_std * math.sqrt(DENSE_LOGIT_SHARE)
        weights = torch.randn(num_dense, generator=structure, dtype=torch.float64).float()
        # 80% of the dense variance linear, 20% a mild interaction of the first two features.
        self.dense_weights = weights / weights.norm().clamp(min=1e-12) * dense_std * math.sqrt(0.8)
        self.dense_interaction = dense_std * math.sqrt(0.2) if num_dense >= 2 else 0.0
        self._chunk_cache: OrderedDict[tuple[str, int], tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        # The hottest rows' fixed effects shift the mean click rate by a seed-dependent amount, so the
        # bias is fitted on a sample of a separate stream rather than derived from logit_std alone.
        self.bias = 0.0
        self.bias = calibrate_bias(self._logits("calibration", 0, CALIBRATION_SAMPLES), click_rate)

    @property
    def num_sparse(self) -> int:
        return len(self.num_embeddings_per_feature)

    def _chunk(self, stream: str, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        key = (stream, chunk)
        if key not in self._chunk_cache:
            rng = torch.Generator().manual_seed(_chunk_seed(self.seed, stream, chunk))
            id_uniforms = torch.rand(self.num_id_columns, STREAM_CHUNK_SAMPLES, generator=rng, dtype=torch.float64)
            dense_normals = torch.randn(STREAM_CHUNK_SAMPLES, self.num_dense, generator=rng)
            label_uniforms = torch.rand(STREAM_CHUNK_SAMPLES, generator=rng)
            self._chunk_cache[key] = (id_uniforms, dense_normals, label_uniforms)
            while len(self._chunk_cache) > 2:
                self._chunk_cache.popitem(last=False)
        return self._chunk_cache[key]

    def _randomness(self, stream: str, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        pieces: list[tuple[Tensor, Tensor, Tensor]] = []
        for chunk in range(start // STREAM_CHUNK_SAMPLES, (stop - 1) // STREAM_CHUNK_SAMPLES + 1):
            base = chunk * STREAM_CHUNK_SAMPLES
            lo, hi = max(start, base) - base, min(stop, base + STREAM_CHUNK_SAMPLES) - base
            ids, dense, labels = self._chunk(stream, chunk)
            pieces.append((ids[:, lo:hi], dense[lo:hi], labels[lo:hi]))
        if len(pieces) == 1:
            return pieces[0]
        ids, dense, labels = zip(*pieces, strict=True)
        return torch.cat(ids, dim=1), torch.cat(dense), torch.cat(labels)

    def rows_of_ranks(self, ranks: Tensor, sample_index: Tensor | None = None) -> Tensor:
        """Row IDs of popularity ranks ``[num_id_columns, n]`` at the given stream positions (drift)."""
        if self.drift_every_samples is not None and sample_index is not None:
            period = (sample_index // self.drift_every_samples)[None, :]
            ranks = drift_ranks(ranks, self.column_rows, period, self.column_shift)
        return rank_to_row(ranks, self.column_rows, self.column_multiplier, self.column_offset)

    def click_logit(self, dense: Tensor, rows: Tensor) -> Tensor:
        """The hidden teacher: bias + per-row effects + a (mildly non-linear) function of the dense features."""
        sparse_effect = (hashed_gaussian(rows, self.column_salt) * self.column_scale).sum(dim=0)
        standardized = (dense - self.dense_mu) / self.dense_sigma
        logit = sparse_effect + standardized @ self.dense_weights + self.bias
        if self.dense_interaction:
            logit = logit + self.dense_interaction * torch.tanh(standardized[:, 0]) * torch.tanh(standardized[:, 1])
        return logit

    def _features(self, stream: str, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        id_uniforms, dense_normals, label_uniforms = self._randomness(stream, start, stop)
        ranks = self.tables.sample(id_uniforms)
        rows = self.rows_of_ranks(ranks, torch.arange(start, stop))
        dense = torch.log1p(torch.floor(torch.exp(self.dense_mu + self.dense_sigma * dense_normals)))
        return dense, rows, self.click_logit(dense, rows), label_uniforms

    def _logits(self, stream: str, start: int, stop: int) -> Tensor:
        return self._features(stream, start, stop)[2]

    def generate(self, split: str, start: int, stop: int) -> ClickLogSamples:
        """Samples ``[start, stop)`` of ``split``'s stream."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= start < stop:
            raise ValueError(f"need 0 <= start < stop, got start={start}, stop={stop}")
        dense, rows, logit, label_uniforms = self._features(split, start, stop)
        probability = torch.sigmoid(logit)
        labels = (label_uniforms < probability).float()
        return ClickLogSamples(dense=dense, rows=rows, labels=labels, click_probability=probability)

    def to_batch(self, samples: ClickLogSamples, keys: list[str]) -> Batch:
        """A torchrec Batch: KJT values feature-major, each input's ``multi_hot[f]`` IDs consecutive."""
        num_samples = samples.labels.shape[0]
        if all(m == 1 for m in self.multi_hot):
            values = samples.rows.reshape(-1)
        else:
            columns = torch.split(samples.rows, self.multi_hot, dim=0)
            values = torch.cat([block.t().reshape(-1) for block in columns])
        lengths = torch.tensor(self.multi_hot, dtype=torch.int32).repeat_interleave(num_samples)
        sparse = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
        return Batch(dense_features=samples.dense, sparse_features=sparse, labels=samples.labels)

    def click_probabilities(self, split: str, num_samples: int, piece: int = 65536) -> tuple[Tensor, Tensor]:
        """True click probabilities and drawn labels of the first ``num_samples`` samples of ``split``."""
        probabilities, labels = [], []
        for start in range(0, num_samples, piece):
            samples = self.generate(split, start, min(num_samples, start + piece))
            probabilities.append(samples.click_probability)
            labels.append(samples.labels)
        return torch.cat(probabilities), torch.cat(labels)


class SyntheticClickStream(IterableDataset):
    """One rank's share of a split's stream, as ready :class:`Batch` objects.

    Rank ``r`` of ``W`` yields, as its ``j``-th batch, stream samples ``[(j W + r) B, (j W + r + 1) B)``; the
    incomplete last global batch is dropped so every rank yields the same number of batches. With
    ``n`` loader workers, worker ``w`` yields batches ``j = w (mod n)``, which the DataLoader's
    round-robin puts back in order.
    """

    def __init__(
        self,
        log: SyntheticClickLog,
        split: str,
        num_samples: int,
        batch_size: int,
        keys: list[str],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.log, self.split, self.num_samples, self.batch_size = log, split, num_samples, batch_size
        self.keys, self.rank, self.world_size = keys, rank, world_size

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def batch_start(self, index: int) -> int:
        return (index * self.world_size + self.rank) * self.batch_size

    def batch_at(self, index: int) -> Batch:
        """This rank's ``index``-th batch, generated without the others (sampled profiling skips the rest)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of a {len(self)}-batch stream")
        start = self.batch_start(index)
        return self.log.to_batch(self.log.generate(self.split, start, start + self.batch_size), self.keys)

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in range(worker_id, len(self), num_workers):
            yield self.batch_at(index)


# ----------------------------------------------------------------------------------------------------------
# The DataModule
# ----------------------------------------------------------------------------------------------------------


def _per_feature(name: str, value: float | Sequence[float], num_features: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_features:
            raise ValueError(
                f"{name} must be a single value or one per sparse feature ({num_features}), got {len(value)} values"
            )
        return list(value)
    return [value] * num_features


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SyntheticDataModule(RecDataModule):
    """Synthetic Criteo-Kaggle-shaped click logs with skewed (power-law) ID popularity.

    Each split (train, val, test) is a fixed stream: sample ``i`` depends only on ``seed``, so runs are
    reproducible and independent of the world size. Each sparse feature's row IDs follow a power law:
    popularity rank ``k`` (0 = most popular) has probability proportional to ``(k + 1) ** -s``, and ranks
    are scattered over the table by the bijection ``row = (a k + b) mod N`` as hashing would. Labels
    come from a hidden teacher, ``click ~ Bernoulli(sigmoid(bias + sum_f effect_f(row_f) + g(dense)))``
    with hash-based Gaussian per-row effects, so the AUC is learnable up to
    :meth:`best_attainable_auc`.

    Args:
        num_embeddings_per_feature: Rows of each sparse feature's table (one entry per feature). ``None``
            uses the 26 Criteo Kaggle cardinalities.
        max_rows_per_table: Cap on every table's rows; ``None`` keeps them as they are.
        num_dense: Number of dense features (non-negative counts, delivered as ``log(1 + count)``).
        popularity_exponent: Power-law exponent ``s`` of ID popularity, one for all features or a list
            with one per feature. ``0`` is uniform; ~1 is typical of click logs.
        uniform: If ``True``, IDs are uniform whatever ``popularity_exponent`` says (a non-skewed control).
        multi_hot: IDs per input of each feature (one for all features or a list). ``1`` is one-hot.
        num_train_samples: Samples in the training stream (one epoch replays the same stream).
        num_val_samples: Samples in the validation stream.
        num_test_samples: Samples in the test stream.
        batch_size: Samples per batch per rank (the global batch is ``batch_size * world_size``).
        seed: Seed of everything: the hidden structure (row mapping, teacher) and the streams.
        num_workers: DataLoader worker processes; ``0`` generates in the main process.
        drift_every_samples: If set, popularity drifts every this many samples of each stream (by
            the sample's position in its split's stream, so val and test drift the same way).
        drift_fraction: At each drift the popularity ranks of a table with ``N`` rows rotate by
            ``max(1, round(drift_fraction * N))``: the row at rank ``k`` becomes the row that was at rank
            ``k + shift``, so the ``shift`` hottest rows turn coldest. A hot set smaller than the shift is
            replaced entirely. Rows keep their teacher effects; only their popularity moves.
        click_rate: Mean click probability (Criteo: about 0.25); the teacher's bias is fitted to it on
            16k samples of a separate stream, so splits land within about 0.01 of it (without drift).
        logit_std: Standard deviation of the teacher's logit; sets the best attainable AUC (1.4: ~0.8).

    .. note::
        Sample ``i`` of a split never changes, so ``1`` process with ``batch_size=2B`` sees the same global
        batches as ``2`` processes with ``batch_size=B``: rank ``r``'s ``j``-th batch is samples
        ``[(2j + r) B, (2j + r + 1) B)``. The incomplete last global batch is dropped.

    .. note::
        The most popular 256 ranks of each table get their exact probabilities; the rest follow a
        continuous approximation of the power law (see :class:`PowerLawTables`), and
        :func:`expected_top_share` is exact for what is sampled. The ``multi_hot`` IDs of one input are
        drawn independently, so they may repeat. Nothing is saved for a mid-epoch restart: a resumed
        run starts its epoch from the beginning of the stream.

    Example::

        >>> dm = SyntheticDataModule(max_rows_per_table=1000, num_train_samples=4096, batch_size=512)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.dense_features.shape, batch.sparse_features.keys()[:2], batch.labels.shape
        (torch.Size([512, 13]), ['cat_0', 'cat_1'], torch.Size([512]))
        >>> 0.7 < dm.best_attainable_auc("val") < 0.9
        True
    """

    def __init__(
        self,
        num_embeddings_per_feature: list[int] | None = None,
        max_rows_per_table: int | None = None,
        num_dense: int = CRITEO_NUM_DENSE,
        popularity_exponent: float | list[float] = 1.05,
        uniform: bool = False,
        multi_hot: int | list[int] = 1,
        num_train_samples: int = 1_048_576,
        num_val_samples: int = 131_072,
        num_test_samples: int = 131_072,
        batch_size: int = 2048,
        seed: int = 0,
        num_workers: int = 0,
        drift_every_samples: int | None = None,
        drift_fraction: float = 0.01,
        click_rate: float = 0.25,
        logit_std: float = 1.4,
    ) -> None:
        super().__init__()
        if num_embeddings_per_feature is None:
            num_embeddings_per_feature = CRITEO_KAGGLE_CARDINALITIES
        _check(
            len(num_embeddings_per_feature) > 0
            and all(_is_int(rows) and rows >= 1 for rows in num_embeddings_per_feature),
            f"num_embeddings_per_feature must be a non-empty list of integers >= 1, got {num_embeddings_per_feature}",
        )
        self._num_embeddings = capped_cardinalities(list(num_embeddings_per_feature), max_rows_per_table)
        # The table sizes in force are logged with the model, which LightningCLI links to them; logged here as
        # well (as given, possibly None) they would clash when Lightning merges both sets of hyperparameters.
        self.save_hyperparameters(ignore=["num_embeddings_per_feature"])
        num_features = len(self._num_embeddings)
        exponents = _per_feature("popularity_exponent", popularity_exponent, num_features)
        for exponent in exponents:
            _check(isinstance(exponent, (int, float)) and math.isfinite(exponent) and exponent >= 0,
                   f"popularity_exponent must be finite and >= 0 (0 = uniform), got {popularity_exponent}")
        if uniform:
            exponents = [0.0] * num_features
        hots = _per_feature("multi_hot", multi_hot, num_features)
        _check(all(_is_int(m) and m >= 1 for m in hots), f"multi_hot must be integers >= 1, got {multi_hot}")
        _check(_is_int(num_dense) and num_dense >= 1, f"num_dense must be an integer >= 1, got {num_dense}")
        for name, value in (("num_train_samples", num_train_samples), ("num_val_samples", num_val_samples),
                            ("num_test_samples", num_test_samples), ("num_workers", num_workers)):
            _check(_is_int(value) and value >= 0, f"{name} must be an integer >= 0, got {value}")
        _check(_is_int(batch_size) and batch_size >= 1, f"batch_size must be an integer >= 1, got {batch_size}")
        _check(_is_int(seed), f"seed must be an integer, got {seed!r}")
        _check(drift_every_samples is None or (_is_int(drift_every_samples) and drift_every_samples >= 1),
               f"drift_every_samples must be None or an integer >= 1, got {drift_every_samples}")
        _check(0.0 < drift_fraction <= 1.0, f"drift_fraction must be in (0, 1], got {drift_fraction}")
        _check(0.0 < click_rate < 1.0, f"click_rate must be in (0, 1), got {click_rate}")
        _check(math.isfinite(logit_std) and logit_std >= 0, f"logit_std must be finite and >= 0, got {logit_std}")

        self.num_samples = {"train": num_train_samples, "val": num_val_samples, "test": num_test_samples}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.log = SyntheticClickLog(
            self._num_embeddings, exponents, hots, num_dense=num_dense, seed=seed,
            drift_every_samples=drift_every_samples, drift_fraction=drift_fraction,
            click_rate=click_rate, logit_std=logit_std,
        )
        extra_names = [f"cat_{i}" for i in range(len(CRITEO_SPARSE_NAMES), num_features)]
        self._names = CRITEO_SPARSE_NAMES[:num_features] + extra_names
        self.rank, self.world_size = 0, 1

    @property
    def dense_in_features(self) -> int:
        return self.log.num_dense

    @property
    def sparse_feature_names(self) -> list[str]:
        return list(self._names)

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return list(self._num_embeddings)

    def setup(self, stage: str | None = None) -> None:
        self.rank, self.world_size = self.rank_and_world_size()
        global_batch = self.batch_size * self.world_size
        for split, count in self.num_samples.items():
            if 0 < count < global_batch:
                rank_zero_warn(f"num_{split}_samples={count} is less than one global batch "
                               f"({self.batch_size} x {self.world_size} ranks): the {split} loader is empty")

    def stream(self, split: str, rank: int | None = None, world_size: int | None = None) -> SyntheticClickStream:
        """A rank's dataset for ``split``; by default this rank's, as found by :meth:`setup`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return SyntheticClickStream(self.log, split, self.num_samples[split], self.batch_size,
                                    self.sparse_feature_names, rank, world_size)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.stream(split), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def best_attainable_auc(self, split: str = "val") -> float:
        """AUC of the teacher's true click probabilities against the drawn labels over the whole split."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.num_samples[split] == 0:
            raise ValueError(f"num_{split}_samples is 0: no samples to score")
        probabilities, labels = self.log.click_probabilities(split, self.num_samples[split])
        return float(binary_auroc(probabilities, labels.long()))


def generation_throughput(datamodule: SyntheticDataModule, num_batches: int = 20, split: str = "train") -> float:
    """Samples per second generated in this process (batches as the loader yields them, one rank)."""
    stream = datamodule.stream(split)
    start = stream.batch_start(0)
    datamodule.log.to_batch(datamodule.log.generate(split, start, start + stream.batch_size), stream.keys)  # warm-up
    began = time.perf_counter()
    for index in range(num_batches):
        start = stream.batch_start(index + 1)
        datamodule.log.to_batch(datamodule.log.generate(split, start, start + stream.batch_size), stream.keys)
    return num_batches * stream.batch_size / (time.perf_counter() - began)
