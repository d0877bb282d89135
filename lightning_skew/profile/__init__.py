"""Access profiles: lookup counts per row, hot sets under a memory budget, coverage and skew (FAE's profiling)."""

from lightning_skew.profile.access import *  # noqa: F403
from lightning_skew.profile.access import __all__  # noqa: F401
