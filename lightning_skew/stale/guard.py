"""The accuracy guard of stale skipping: back off when a validation metric falls below its best by a margin."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["AccuracyGuard", "backed_off", "guard_verdict"]


def guard_verdict(best: float | None, value: float, mode: str, margin: float) -> tuple[float, bool]:
    """``(new best, back off?)`` after a validation: a new best (``mode`` ``"max"``: larger is better) is kept,
    and a value worse than the best by more than ``margin`` asks for a back-off.

    Lightning's ``EarlyStopping`` compares in the same way but stops the run; its comparison is not public, so
    this is the few lines it takes.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    if best is None or sign * (value - best) > 0:
        return value, False
    return best, sign * (best - value) > margin


def backed_off(target: float, factor: float, floor: float = 0.01) -> float:
    """A drop target after one back-off: multiplied by ``factor``, and 0 (skipping paused) below ``floor``."""
    target *= factor
    return 0.0 if target < floor else target


class AccuracyGuard:
    """One validation metric watched across validations: its best value, the back-offs asked for, and a single
    warning when the metric is not logged. ``metric=None`` watches nothing."""

    def __init__(self, metric: str | None, mode: str = "max", margin: float = 0.002, owner: str = "") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"guard_mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode, self.margin, self.owner = metric, mode, margin, owner
        self.best: float | None = None
        self.backoffs = 0
        self._warned = False

    def fell(self, metrics: Mapping[str, Any]) -> float | None:
        """The metric's value in ``metrics`` when it fell more than ``margin`` below its best (a back-off, counted),
        else ``None``."""
        if self.metric is None:
            return None
        value = metrics.get(self.metric)
        if value is None:
            if not self._warned:
                rank_zero_warn(f"{self.owner}: guard_metric {self.metric!r} is not among the logged metrics "
                               f"{sorted(metrics)}; the accuracy guard does nothing (name the validation metric to "
                               "watch, or pass guard_metric=None)")
                self._warned = True
            return None
        self.best, back_off = guard_verdict(self.best, float(value), self.mode, self.margin)
        if not back_off:
            return None
        self.backoffs += 1
        return float(value)
