"""``lightning-skew bench``: training variants side by side, alternating and repeated, with their model quality."""

import importlib

from lightning_skew.bench.command import DEFAULT_CONFIG, main
from lightning_skew.bench.helpers import HOT_COLD_BUDGET_BYTES, POPULARITY_HOT_BUDGET_BYTES
from lightning_skew.bench.report import format_report, machine_info
from lightning_skew.bench.runner import (
    build_recipe,
    ensure_process_group,
    evaluate,
    fit_with_lightning,
    run_bench,
    train_by_hand,
)
from lightning_skew.bench.stats import (
    FOREIGN_CPU_WARNING,
    RATIO_METHOD,
    CpuSnapshot,
    foreign_cpu_share,
    median,
    median_step_throughput,
    outside_model_ms,
    per_repeat_ratios,
    run_order,
    summarize,
    throughput,
)
from lightning_skew.bench.types import (
    VARIANTS,
    Quality,
    Recipe,
    RunResult,
    StepClock,
    TrainedRun,
    Variant,
    VariantFn,
    VariantSummary,
    register_variant,
)

# Every technique registers its variants in its own bench module; importing them here, after the baselines
# (registered by the runner, above), completes VARIANTS whenever lightning_skew.bench is imported, listed in
# this order. Plain module imports, no names taken from them: a technique's bench module imported on its own
# comes back here half-initialised, through its own imports of lightning_skew.bench.*, and finishes afterwards.
TECHNIQUE_BENCH_MODULES = (
    "lightning_skew.popularity.bench",
    "lightning_skew.stale.bench",
    "lightning_skew.hotcold.bench",
    "lightning_skew.torchrec.bench",
    "lightning_skew.tiers.bench",
    "lightning_skew.dedup.bench",
    "lightning_skew.bench.composed",
)
for _module in TECHNIQUE_BENCH_MODULES:
    importlib.import_module(_module)
del _module

__all__ = [
    "DEFAULT_CONFIG",
    "FOREIGN_CPU_WARNING",
    "HOT_COLD_BUDGET_BYTES",
    "POPULARITY_HOT_BUDGET_BYTES",
    "RATIO_METHOD",
    "TECHNIQUE_BENCH_MODULES",
    "VARIANTS",
    "CpuSnapshot",
    "Quality",
    "Recipe",
    "RunResult",
    "StepClock",
    "TrainedRun",
    "Variant",
    "VariantFn",
    "VariantSummary",
    "build_recipe",
    "ensure_process_group",
    "evaluate",
    "fit_with_lightning",
    "foreign_cpu_share",
    "format_report",
    "machine_info",
    "main",
    "median",
    "median_step_throughput",
    "outside_model_ms",
    "per_repeat_ratios",
    "register_variant",
    "run_bench",
    "run_order",
    "summarize",
    "throughput",
    "train_by_hand",
]
