"""The synthetic click log: a seekable sample stream per split, labelled by a hidden teacher."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.hashing import MASK32, MASK64, mix32, splitmix64
from lightning_skew.data.base import Batch
from lightning_skew.data.features import CRITEO_NUM_DENSE
from lightning_skew.data.synthetic.powerlaw import (
    PowerLawTables,
    drift_ranks,
    rank_to_row,
    scatter_multiplier,
)
from lightning_skew.data.synthetic.sessions import SessionFeatures, SessionGenerator, Sessions

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Each split is a stream cut into chunks of this many samples; a chunk's randomness comes from a
# generator seeded by (seed, split, chunk), so any sample range is generated without its prefix.
# Changing it changes every generated stream.
STREAM_CHUNK_SAMPLES = 512

# Samples of a separate stream on which the teacher's bias is fitted to the requested click rate.
CALIBRATION_SAMPLES = 16384

# Share of the teacher's logit variance that comes from the dense features (the rest: sparse rows).
DENSE_LOGIT_SHARE = 0.3

# Normal quantiles at the midpoints of 2^16 equal-probability cells: a hash's top 16 bits index it,
# which is 8x cheaper than calling ndtri per lookup.
_NORMAL_QUANTILES = torch.special.ndtri((torch.arange(2**16, dtype=torch.float64) + 0.5) / 2**16).float()


def hashed_gaussian(rows: Tensor, salt: Tensor | int) -> Tensor:
    """A standard-normal value (16-bit quantised) per (salt, row) from a hash: a lookup table without the table."""
    return _NORMAL_QUANTILES.take(mix32((rows ^ salt) & MASK32) >> 16)


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


# Random streams: the three splits, the hidden structure, and the sample that calibrates the bias.
_STREAMS = {"train": 0, "val": 1, "test": 2, "structure": 3, "calibration": 4}


def _chunk_seed(seed: int, stream: str, chunk: int) -> int:
    # torch's CPU generator keeps only the low 32 bits of a seed; mix everything into them.
    mixed = splitmix64(splitmix64(splitmix64(seed & MASK64) ^ _STREAMS[stream]) ^ chunk)
    return (mixed ^ (mixed >> 32)) & MASK32


@dataclass(frozen=True)
class ClickLogSamples:
    """A range of a synthetic click log: what a model sees plus the true click probability."""

    dense: Tensor  # [n, num_dense] float32, log(1 + count)
    rows: Tensor  # [num_id_columns, n] int64, feature f owns multi_hot[f] consecutive columns
    labels: Tensor  # [n] float32, 0/1
    click_probability: Tensor  # [n] float32, sigmoid of the teacher's logit
    sessions: SessionFeatures | None = None  # user-level features, when the log has sessions


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
        sessions: Sessions | None = None,
        session_rows: tuple[int, int] | None = None,
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
        # With sessions, the user and the history carry logit_share of the logit's variance.
        session_std = logit_std * math.sqrt(sessions.logit_share / 2) if sessions is not None else 0.0
        logit_std = logit_std * math.sqrt(1.0 - sessions.logit_share) if sessions is not None else logit_std
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
        self.sessions: SessionGenerator | None = None
        if sessions is not None:
            if session_rows is None:
                raise ValueError("SyntheticClickLog: sessions need session_rows (user and item table rows)")
            self.sessions = SessionGenerator(sessions, *session_rows, lambda split, chunk: _chunk_seed(
                seed, split, chunk), structure, user_std=session_std, history_std=session_std)
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

    def _features(self, stream: str, start: int, stop: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, SessionFeatures | None]:
        id_uniforms, dense_normals, label_uniforms = self._randomness(stream, start, stop)
        ranks = self.tables.sample(id_uniforms)
        rows = self.rows_of_ranks(ranks, torch.arange(start, stop))
        dense = torch.log1p(torch.floor(torch.exp(self.dense_mu + self.dense_sigma * dense_normals)))
        logit = self.click_logit(dense, rows)
        sessions = None
        if self.sessions is not None:
            sessions = self.sessions.features(stream, start, stop)
            logit = logit + sessions.logit
        return dense, rows, logit, label_uniforms, sessions

    def _logits(self, stream: str, start: int, stop: int) -> Tensor:
        return self._features(stream, start, stop)[2]

    def generate(self, split: str, start: int, stop: int) -> ClickLogSamples:
        """Samples ``[start, stop)`` of ``split``'s stream."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= start < stop:
            raise ValueError(f"need 0 <= start < stop, got start={start}, stop={stop}")
        dense, rows, logit, label_uniforms, sessions = self._features(split, start, stop)
        probability = torch.sigmoid(logit)
        labels = (label_uniforms < probability).float()
        return ClickLogSamples(dense=dense, rows=rows, labels=labels, click_probability=probability,
                               sessions=sessions)

    def to_batch(self, samples: ClickLogSamples, keys: list[str]) -> Batch:
        """A torchrec Batch: KJT values feature-major, each input's ``multi_hot[f]`` IDs consecutive."""
        num_samples = samples.labels.shape[0]
        if all(m == 1 for m in self.multi_hot):
            values = samples.rows.reshape(-1)
        else:
            columns = torch.split(samples.rows, self.multi_hot, dim=0)
            values = torch.cat([block.t().reshape(-1) for block in columns])
        lengths = torch.tensor(self.multi_hot, dtype=torch.int32).repeat_interleave(num_samples)
        if samples.sessions is not None:  # the user-level features follow the per-sample ones: user_id, history
            values = torch.cat([values, samples.sessions.user, samples.sessions.history_values])
            lengths = torch.cat([lengths, torch.ones(num_samples, dtype=torch.int32),
                                 samples.sessions.history_lengths.to(torch.int32)])
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
