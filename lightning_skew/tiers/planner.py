"""An access profile as TorchRec planner input: per-table ``CacheStatistics`` for sizing UVM caches from the data.

TorchRec's planner reads a table's cache statistics from ``ParameterConstraints(cache_params=CacheParams(
stats=...))``: the distinct rows a global batch looks up (``expected_lookups``), the LRU miss rate at any cache
load factor (``expected_miss_rate``) and a size-independent ``cacheability``. ``EmbeddingOffloadScaleupProposer``
grows the caches of the tables that have them, most where ``cacheability * expected_lookups`` is largest, and the
performance model charges each table its expected cache fetches. Here they come from an
:class:`~lightning_skew.profile.AccessProfile`: each row's share of the table's lookups gives the chance that a
batch looks it up, and Che's approximation of an LRU cache, taken at batch granularity (a row stays cached for
``T`` batches after its last use, ``T`` set so the rows cached fill the cache), gives the miss-rate curve, held as
TorchRec's own ``EmbeddingOffloadStats`` histogram.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor
from torchrec.distributed.planner.shard_estimators import EmbeddingOffloadStats
from torchrec.distributed.types import CacheStatistics

from lightning_skew.profile.access import AccessProfile

__all__ = ["ProfileCacheStatistics", "batch_lookup_chances", "cache_statistics", "lru_miss_rate_curve"]

DEFAULT_BINS = 200


def batch_lookup_chances(counts: Tensor, lookups_per_batch: float) -> Tensor:
    """The chance that one batch of ``lookups_per_batch`` lookups looks up each row, from the rows' counts."""
    counts = counts.double()
    shares = counts[counts > 0] / counts.sum()
    return -torch.expm1(lookups_per_batch * torch.log1p(-shares.clamp(max=1 - 1e-12)))


def lru_miss_rate_curve(chances: Tensor, cache_rows: Tensor, points: int = 400) -> Tensor:
    """LRU miss rate (of the distinct rows each batch looks up) at each cache size in ``cache_rows``.

    Che's approximation at batch granularity: a row is cached when a batch within the last ``T`` looked it up;
    ``T`` makes the expected cached rows ``sum(1 - (1 - q)^T)`` equal the cache size; the miss rate is then
    ``sum(q (1 - q)^T) / sum(q)``. A cache that holds every row ever looked up misses nothing (in steady state).
    """
    chances = chances.double()
    if chances.numel() == 0:
        return torch.zeros_like(cache_rows, dtype=torch.float64)
    keep = torch.log1p(-chances.clamp(max=1 - 1e-12))  # log(1 - q)
    horizons = torch.logspace(-4, 9, points, dtype=torch.float64)
    cached, missed = [], []
    for chunk in horizons.split(50):
        stay = torch.exp(chunk[:, None] * keep[None, :])  # (1 - q)^T
        cached.append((1 - stay).sum(1))
        missed.append((chances[None, :] * stay).sum(1) / chances.sum())
    sizes, rates = torch.cat(cached), torch.cat(missed)
    rows = cache_rows.double().clamp(min=0)
    index = torch.searchsorted(sizes, rows).clamp(1, points - 1)
    low, high = sizes[index - 1], sizes[index]
    weight = ((rows - low) / (high - low).clamp(min=1e-12)).clamp(0, 1)
    curve = rates[index - 1] + weight * (rates[index] - rates[index - 1])
    curve = torch.where(rows <= sizes[0], torch.ones_like(curve) * float(rates[0]) + (1 - rates[0]) * (
        1 - rows / sizes[0].clamp(min=1e-12)), curve)
    return torch.where(rows >= chances.numel(), torch.zeros_like(curve), curve).clamp(0, 1)


def cache_statistics(profile: AccessProfile, feature: str, batch_size: int,
                     bins: int = DEFAULT_BINS) -> EmbeddingOffloadStats:
    """TorchRec's ``EmbeddingOffloadStats`` of ``feature``'s table, from ``profile``, for global batches of
    ``batch_size`` inputs (a rank's batch size times the world size).

    Args:
        profile: the access profile of the training data.
        feature: the feature (table) as the profile names it.
        batch_size: inputs per global batch.
        bins: histogram bins over load factors 0 to 1.
    """
    if feature not in profile.feature_names:
        raise ValueError(f"the access profile has no feature {feature!r}; it has {list(profile.feature_names)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _, counts = profile.counts(feature)
    height = profile.num_rows[profile.feature_names.index(feature)]
    inputs = max(profile.num_inputs_counted, 1)
    lookups_per_batch = float(profile.lookups[feature]) / inputs * batch_size
    chances = batch_lookup_chances(counts, lookups_per_batch)
    edges = torch.linspace(0, height, bins + 1, dtype=torch.float64)
    rates = lru_miss_rate_curve(chances, edges)
    rates[0] = 1.0
    histogram = (rates[:-1] - rates[1:]).clamp(min=0).float()
    cacheability = float(rates[1:].mean())
    return EmbeddingOffloadStats(cacheability, int(round(float(chances.sum()))), histogram, height)


@lru_cache(maxsize=4)
def _load(path: str) -> AccessProfile:
    return AccessProfile.load(path)


class ProfileCacheStatistics(CacheStatistics):
    """A table's cache statistics from a saved access profile, for ``table_constraints`` in a recipe.

    Args:
        profile_path: a profile written by ``lightning-skew profile``.
        feature: the feature whose table this is.
        batch_size: inputs per global batch (per-rank batch size times world size).
        bins: histogram bins over load factors.

    Example (YAML, under the strategy's ``table_constraints``)::

        t_cat_0:
          compute_kernels: [fused_uvm_caching]
          cache_load_factor: 0.05
          cache_statistics:
            class_path: lightning_skew.tiers.ProfileCacheStatistics
            init_args: {profile_path: runs/profile/profile.pt, feature: cat_0, batch_size: 2048}
    """

    def __init__(self, profile_path: str, feature: str, batch_size: int, bins: int = DEFAULT_BINS) -> None:
        self.profile_path, self.feature, self.batch_size = profile_path, feature, batch_size
        self._stats = cache_statistics(_load(str(profile_path)), feature, batch_size, bins)

    @property
    def expected_lookups(self) -> float:
        return self._stats.expected_lookups

    def expected_miss_rate(self, clf: float) -> float:
        return self._stats.expected_miss_rate(clf)

    @property
    def cacheability(self) -> float:
        return self._stats.cacheability

    def __repr__(self) -> str:
        return (f"ProfileCacheStatistics({self.feature!r} of {self.profile_path}, batch {self.batch_size}: "
                f"{self.expected_lookups} distinct rows per batch, cacheability {self.cacheability:.3f})")
