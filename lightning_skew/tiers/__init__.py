"""Tier simulation: replay a recipe's access stream through placements and caches, from the user's own data.

What each placement moves over the host link per step (static hot set as ``HotColdStrategy`` places it,
FBGEMM's UVM cache with LRU or LFU, a Bagpipe-style lookahead cache, all-host and all-fast), the report and
plot of ``lightning-skew profile --tiers``, and TorchRec planner cache statistics built from the profile.
"""

from lightning_skew.tiers.fbgemm import (
    DEFAULT_ASSOC,
    cache_set_of,
    cache_sets_for,
    fbgemm_cache,
    load_factor_for,
)
from lightning_skew.tiers.lookahead import lookahead_cache, lookahead_hot_set, next_use_steps, refresh_plan
from lightning_skew.tiers.planner import ProfileCacheStatistics, cache_statistics
from lightning_skew.tiers.policies import Traffic, all_fast, all_host, static_hot_set
from lightning_skew.tiers.stream import AccessStream, StreamBuilder, shards_keep, stream_from_batches

__all__ = [
    "DEFAULT_ASSOC",
    "AccessStream",
    "ProfileCacheStatistics",
    "StreamBuilder",
    "Traffic",
    "all_fast",
    "all_host",
    "cache_set_of",
    "cache_statistics",
    "cache_sets_for",
    "fbgemm_cache",
    "load_factor_for",
    "lookahead_cache",
    "lookahead_hot_set",
    "next_use_steps",
    "refresh_plan",
    "shards_keep",
    "static_hot_set",
    "stream_from_batches",
]
