"""``lightning-skew bench``: recipe variants side by side, alternating and repeated, with their model quality.

A variant is configuration (a preset under ``recipes/variants/``, a YAML fragment, or LightningCLI overrides of
the recipe) that the bench builds as ``lightning-skew fit`` builds it; ``handwritten`` (a plain TorchRec loop)
is the one code baseline.
"""

from lightning_skew.bench.command import DEFAULT_CONFIG, main
from lightning_skew.bench.extras import run_extras
from lightning_skew.bench.report import format_report, machine_info
from lightning_skew.bench.runner import (
    build_recipe,
    check_runnable,
    dense_optimizer,
    ensure_process_group,
    evaluate,
    fit_variant,
    recipe_config,
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
from lightning_skew.bench.types import Quality, Recipe, RunResult, StepClock, TrainedRun, VariantSummary
from lightning_skew.bench.variants import (
    HANDWRITTEN,
    PRESETS_DIR,
    Variant,
    complete_fragment,
    parse_variant,
    preset_path,
    presets,
    variants_from,
)

__all__ = [
    "DEFAULT_CONFIG",
    "FOREIGN_CPU_WARNING",
    "HANDWRITTEN",
    "PRESETS_DIR",
    "RATIO_METHOD",
    "CpuSnapshot",
    "Quality",
    "Recipe",
    "RunResult",
    "StepClock",
    "TrainedRun",
    "Variant",
    "VariantSummary",
    "build_recipe",
    "check_runnable",
    "complete_fragment",
    "dense_optimizer",
    "ensure_process_group",
    "evaluate",
    "fit_variant",
    "foreign_cpu_share",
    "format_report",
    "machine_info",
    "main",
    "median",
    "median_step_throughput",
    "outside_model_ms",
    "parse_variant",
    "per_repeat_ratios",
    "preset_path",
    "presets",
    "recipe_config",
    "run_bench",
    "run_extras",
    "run_order",
    "summarize",
    "throughput",
    "train_by_hand",
    "variants_from",
]
