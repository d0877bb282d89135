"""The accuracy guard of stale skipping: back off when a validation metric falls below its best by a margin."""

from __future__ import annotations

__all__ = ["backed_off", "guard_verdict"]


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
