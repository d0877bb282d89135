"""The benchmark's figures: medians, throughput, run order, per-repeat ratios, summaries, other processes' CPU use."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_skew.bench.types import RunResult, VariantSummary

# Above this share of the CPUs taken by other processes during a run, the run is flagged.
FOREIGN_CPU_WARNING = 0.05
RATIO_METHOD = ("median over repeats of (variant samples/s / baseline samples/s in the same repeat); samples/s = "
                "timed samples / wall time of the timed steps; median-step samples/s = batch / median step time")


def median(values: Iterable[float]) -> float:
    """The median (mean of the middle two for an even count)."""
    values = list(values)
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def throughput(ends: Sequence[float], samples: Sequence[int], warmup_steps: int) -> tuple[float, int, float]:
    """Samples per second over the steps after the first ``warmup_steps``.

    The clock starts at the end of the last warm-up step, so the timed steps are ``warmup_steps..n-1``.
    Returns ``(samples_per_s, timed_samples, timed_seconds)``.
    """
    if len(ends) != len(samples):
        raise ValueError(f"{len(ends)} step end times but {len(samples)} sample counts")
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be at least 1 (the clock starts at its end), got {warmup_steps}")
    if len(ends) <= warmup_steps:
        raise ValueError(f"only {len(ends)} training steps ran, none after the {warmup_steps} warm-up steps; "
                         "train on more samples or lower --warmup-steps")
    timed_samples = int(sum(samples[warmup_steps:]))
    timed_s = float(ends[-1] - ends[warmup_steps - 1])
    if timed_s <= 0:
        raise ValueError(f"the timed steps took {timed_s} s; step end times must increase")
    return timed_samples / timed_s, timed_samples, timed_s


def median_step_throughput(ends: Sequence[float], samples: Sequence[int], warmup_steps: int) -> float:
    """Samples per second of the median timed step (steps ``warmup_steps..n-1``, as :func:`throughput`).

    A burst of other load slows a few steps a lot; the median step ignores it where the mean would not.
    """
    throughput(ends, samples, warmup_steps)  # the same validation
    rates = [samples[i] / (ends[i] - ends[i - 1]) for i in range(warmup_steps, len(ends)) if ends[i] > ends[i - 1]]
    return median(rates)


def outside_model_ms(ends: Sequence[float], model_s: Sequence[float], warmup_steps: int) -> float:
    """Milliseconds per timed step spent outside the model's forward, backward and optimizer step: reading and
    preparing the batch, moving it, callbacks (NaN when the loop did not time the model's work). A mean, not a
    median: work done once per window of batches (popularity regrouping) falls on one step in hundreds."""
    outside = [(ends[i] - ends[i - 1] - model_s[i]) * 1e3 for i in range(warmup_steps, len(ends))
               if i < len(model_s) and not math.isnan(model_s[i])]
    return sum(outside) / len(outside) if outside else math.nan


@dataclass(frozen=True)
class CpuSnapshot:
    """Wall clock, CPU time of the whole machine (``/proc/stat``) and of this process tree, in seconds."""

    wall_s: float
    busy_cpu_s: float
    own_cpu_s: float

    @classmethod
    def take(cls) -> CpuSnapshot | None:
        """Now; ``None`` where ``/proc/stat`` is missing (not Linux)."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        ticks = os.sysconf("SC_CLK_TCK")
        own = os.times()
        return cls(wall_s=time.perf_counter(), busy_cpu_s=(user + nice + system + irq + softirq + steal) / ticks,
                   own_cpu_s=own.user + own.system + own.children_user + own.children_system)


def foreign_cpu_share(before: CpuSnapshot, after: CpuSnapshot, cores: int) -> float:
    """Share of the machine's CPU capacity used by other processes between two snapshots (0 = none).

    A benchmark on a shared machine is only as good as this figure is small: with torch's threads spread
    over every core, each core another process takes slows a step far more than its share.
    """
    wall = after.wall_s - before.wall_s
    if wall <= 0 or cores < 1:
        raise ValueError(f"need a positive interval and core count, got {wall} s and {cores} cores")
    foreign = (after.busy_cpu_s - before.busy_cpu_s) - (after.own_cpu_s - before.own_cpu_s)
    return max(0.0, foreign / (wall * cores))


def foreign_note(share: float | None) -> str:
    """The warning a progress line gets when other processes took too much of the CPUs ("" otherwise)."""
    if share is None or share < FOREIGN_CPU_WARNING:
        return ""
    return f"; other processes took {share:.0%} of the CPUs: this run's figure is not trustworthy"


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_order(variants: Sequence[str], repeat: int) -> list[str]:
    """The variants in the order repeat ``repeat`` runs them: rotated by one each repeat, to cancel drift."""
    if not variants:
        return []
    shift = repeat % len(variants)
    return list(variants[shift:]) + list(variants[:shift])


def per_repeat_ratios(rates: dict[int, dict[str, float]], baseline: str) -> dict[str, list[float]]:
    """Each variant's samples/s divided by the baseline's in the same repeat (``rates[repeat][variant]``)."""
    ratios: dict[str, list[float]] = {}
    for repeat in sorted(rates):
        by_variant = rates[repeat]
        if baseline not in by_variant:
            raise ValueError(f"repeat {repeat} has no run of the baseline {baseline!r}")
        for variant, rate in by_variant.items():
            ratios.setdefault(variant, []).append(rate / by_variant[baseline])
    return ratios


def summarize(runs: Sequence[RunResult], baseline: str) -> dict[str, VariantSummary]:
    """Per variant (in first-seen order): median, min and max samples/s, ratio to ``baseline``, quality."""
    rates: dict[int, dict[str, float]] = {}
    step_rates: dict[int, dict[str, float]] = {}
    for run in runs:
        rates.setdefault(run.repeat, {})[run.variant] = run.samples_per_s
        step_rates.setdefault(run.repeat, {})[run.variant] = run.median_step_samples_per_s
    ratios = per_repeat_ratios(rates, baseline)
    step_ratios = per_repeat_ratios(step_rates, baseline)
    summaries = {}
    for variant in dict.fromkeys(run.variant for run in runs):
        own = [run for run in runs if run.variant == variant]
        speeds = [run.samples_per_s for run in own]
        summaries[variant] = VariantSummary(
            variant=variant, repeats=len(own), median_samples_per_s=median(speeds), min_samples_per_s=min(speeds),
            max_samples_per_s=max(speeds), ratio=median(ratios[variant]), min_ratio=min(ratios[variant]),
            max_ratio=max(ratios[variant]),
            median_step_samples_per_s=median(r.median_step_samples_per_s for r in own),
            median_step_ratio=median(step_ratios[variant]), auc=median(r.auc for r in own),
            logloss=median(r.logloss for r in own),
            outside_model_ms=median(timed) if (timed := [r.outside_model_ms for r in own
                                                         if not math.isnan(r.outside_model_ms)]) else math.nan,
            extras={key: median(r.extras[key] for r in own if key in r.extras)
                    for key in dict.fromkeys(k for r in own for k in r.extras)})
    return summaries
