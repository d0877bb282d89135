"""The benchmark's vocabulary: recipes, step clocks, trained runs and their results."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import lightning.pytorch as pl
from torch import Tensor
from torchrec.datasets.utils import Batch


@dataclass
class Recipe:
    """A freshly built model and DataModule (not yet set up), as the recipe and its overrides describe them."""

    model: pl.LightningModule
    datamodule: pl.LightningDataModule
    epochs: int = 1  # epochs every variant trains (``--epochs``)


#: ``(label, report, every_s)`` of the run in progress: clocks made while it is set report on their progress.
_PROGRESS: ContextVar[tuple[str, Callable[[str], None], float] | None] = ContextVar("bench_progress", default=None)


@contextmanager
def reporting_progress(label: str, report: Callable[[str], None], every_s: float = 30.0) -> Iterator[None]:
    """Within it, every :class:`StepClock` reports ``label``, steps done and samples/s so far every ``every_s``
    seconds through ``report`` (a one-epoch full-size pair runs ten minutes and more)."""
    token = _PROGRESS.set((label, report, every_s))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@dataclass
class StepClock:
    """End time (``time.perf_counter``) and input count of every training step, in order."""

    ends: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    #: Seconds of each step spent in the model's forward, backward and optimizer step (NaN where the loop does
    #: not say when that work begins; see :meth:`begin_model`). The rest of the step is the loop's own work.
    model_s: list[float] = field(default_factory=list)
    _model_began: float | None = field(default=None, repr=False)
    progress: tuple[str, Callable[[str], None], float] | None = field(default_factory=_PROGRESS.get, repr=False)
    _last_report: float = field(default_factory=time.perf_counter, repr=False)

    def begin_model(self) -> None:
        """Mark the start of this step's model work (forward, backward, optimizer step): everything after it up
        to :meth:`tick` counts as the model's."""
        self._model_began = time.perf_counter()

    def tick(self, samples: int) -> None:
        """Record the end of a step that trained on ``samples`` inputs (and report progress when due)."""
        now = time.perf_counter()
        self.ends.append(now)
        self.samples.append(int(samples))
        self.model_s.append(now - self._model_began if self._model_began is not None else math.nan)
        self._model_began = None
        if self.progress is not None and now - self._last_report >= self.progress[2] and len(self.ends) > 1:
            label, report, _ = self.progress
            rate = sum(self.samples[1:]) / max(now - self.ends[0], 1e-9)
            report(f"{label}: step {len(self.ends)}, {rate:,.0f} samples/s so far")
            self._last_report = now


@dataclass
class TrainedRun:
    """What a training loop hands back: the trained model (a batch to click logits ``[B]``) and its step times."""

    model: Callable[[Batch], Tensor]
    clock: StepClock
    extras: dict[str, float] = field(default_factory=dict)  # what a variant reports of itself (medians shown)
    device: str = "cpu"  # where the model takes its batches


@dataclass(frozen=True)
class Quality:
    """Model quality on a held-out split."""

    auc: float
    logloss: float
    samples: int


@dataclass(frozen=True)
class RunResult:
    """One variant trained once: its throughput over the timed steps and its validation quality."""

    repeat: int
    position: int  # order within the repeat
    variant: str
    samples_per_s: float
    timed_samples: int
    timed_s: float
    median_step_samples_per_s: float  # robust to short bursts of other load; see median_step_throughput
    steps: int
    setup_s: float  # building the recipe and everything before the first step, plus the warm-up steps
    auc: float
    logloss: float
    foreign_cpu_share: float | None = None  # CPU time of other processes over the run, a share of all cores
    extras: dict[str, float] = field(default_factory=dict)
    outside_model_ms: float = math.nan  # mean time per timed step outside forward/backward/optimizer (StepClock)


@dataclass(frozen=True)
class VariantSummary:
    """A variant's figures over all repeats."""

    variant: str
    repeats: int
    median_samples_per_s: float
    min_samples_per_s: float
    max_samples_per_s: float
    ratio: float  # median of per-repeat ratios to the baseline
    min_ratio: float
    max_ratio: float
    median_step_samples_per_s: float  # median over repeats
    median_step_ratio: float  # median of per-repeat ratios of median_step_samples_per_s
    auc: float  # median over repeats
    logloss: float
    extras: dict[str, float] = field(default_factory=dict)  # median over repeats of each of the runs' extras
    outside_model_ms: float = math.nan  # median over repeats of RunResult.outside_model_ms
