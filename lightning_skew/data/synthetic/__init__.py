"""Synthetic Criteo-shaped click logs with power-law ID popularity, a hidden teacher and optional drift."""

from lightning_skew.data.synthetic.datamodule import (
    SyntheticClickStream,
    SyntheticDataModule,
    generation_throughput,
)
from lightning_skew.data.synthetic.generator import (
    ClickLogSamples,
    SyntheticClickLog,
    calibrate_bias,
    hashed_gaussian,
)
from lightning_skew.data.synthetic.powerlaw import HEAD_ROWS as HEAD_ROWS  # public, not in __all__
from lightning_skew.data.synthetic.powerlaw import (
    PowerLawTables,
    drift_ranks,
    expected_top_share,
    power_law_cdf,
    rank_to_row,
    sample_power_law_ranks,
    scatter_multiplier,
)
from lightning_skew.data.synthetic.sessions import Sessions

__all__ = [
    "ClickLogSamples",
    "PowerLawTables",
    "Sessions",
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

# A profile names the DataModule it counted by ``__module__`` and ``__qualname__`` and fingerprints that name
# (``lightning_skew.profile.access.describe_datamodule``): keep the public path it had as a single module.
SyntheticDataModule.__module__ = __name__
