"""Access profiles: lookup counts per row, hot sets under a memory budget, coverage and skew (FAE's profiling)."""

from lightning_skew.profile.access import *  # noqa: F403
from lightning_skew.profile.access import __all__ as _access_all
from lightning_skew.profile.sources import ProfiledHotRows, profiled_data, resolve_hot_rows

__all__ = [*_access_all, "ProfiledHotRows", "profiled_data", "resolve_hot_rows"]
