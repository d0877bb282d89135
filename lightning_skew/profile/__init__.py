"""Access profiles: lookup counts per row, hot sets under a memory budget, coverage and skew (FAE's profiling)."""

from lightning_skew.profile.access import AccessProfile
from lightning_skew.profile.budget import (
    BudgetPoint,
    global_hot_order,
    lookup_coverage,
    optimizer_state_elements,
    row_bytes,
    select_hot_rows,
    smallest_budget_for_coverage,
)
from lightning_skew.profile.identity import describe_datamodule
from lightning_skew.profile.loader import profile_dataloader
from lightning_skew.profile.row_sizes import TableBytes, model_table_bytes, trainer_table_bytes
from lightning_skew.profile.sketches import add_row_counts, merge_heavy_hitters, sampled_mask
from lightning_skew.profile.skew import TableSkew, fit_power_law, top_share
from lightning_skew.profile.sources import (
    GivenRows,
    HotSetSource,
    LookedUpRows,
    ProfiledHotRows,
    as_hot_set_source,
    profiled_data,
    resolve_hot_rows,
)

__all__ = [
    "AccessProfile",
    "GivenRows",
    "HotSetSource",
    "LookedUpRows",
    "ProfiledHotRows",
    "TableBytes",
    "as_hot_set_source",
    "model_table_bytes",
    "trainer_table_bytes",
    "profiled_data",
    "resolve_hot_rows",
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
