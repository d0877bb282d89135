"""Upstream warnings a run cannot act on are filtered narrowly: those messages only, other warnings still show."""

from __future__ import annotations

import warnings

import lightning_skew  # noqa: F401  (importing it installs the filters)
from lightning_skew.core.upstream import UPSTREAM_WARNINGS


def test_each_upstream_warning_is_filtered_and_others_still_show():
    samples = {
        "Please use DTensor instead and we are deprecating ShardedTensor.": FutureWarning,
        "`isinstance(treespec, LeafSpec)` is deprecated, use ...": DeprecationWarning,
        "HeuristicalStorageReservation is known to cause issues, particularly during dry run": FutureWarning,
        "`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead.": FutureWarning,
        "Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading": UserWarning,
    }
    assert len(samples) == len(UPSTREAM_WARNINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        lightning_skew.core.upstream.quiet_upstream_warnings()
        for message, category in samples.items():
            warnings.warn(message, category, stacklevel=1)
        warnings.warn("ShardedTensor is great", FutureWarning, stacklevel=1)  # not one of them
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["ShardedTensor is great", "a warning of our own"]
