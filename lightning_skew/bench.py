"""``lightning-skew bench``: training variants side by side, alternating and repeated, with their model quality.

Every run builds the model and data afresh from one recipe (same seed, so the same initial weights and the
same batches), trains one epoch with one *variant* of the training loop, times the steps after the warm-up,
and scores the trained model on the validation split. Variants live in :data:`VARIANTS`; the first one asked
for is the baseline that the others are divided by.

Example::

    lightning-skew bench --config recipes/dlrm_synthetic.yaml --repeats 3 --train-samples 307200 \\
        --output bench.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch

from lightning_skew.cli import SkewCLI
from lightning_skew.core.monitor import batch_size_of
from lightning_skew.popularity.datamodule import PopularityDataModule
from lightning_skew.profile.sources import ProfiledHotRows
from lightning_skew.torchrec.sharding import shard_module
from lightning_skew.torchrec.strategy import TorchRecStrategy

__all__ = [
    "VARIANTS",
    "CpuSnapshot",
    "Quality",
    "Recipe",
    "RunResult",
    "StepClock",
    "TrainedRun",
    "Variant",
    "VariantSummary",
    "build_recipe",
    "evaluate",
    "fit_with_lightning",
    "foreign_cpu_share",
    "main",
    "median",
    "median_step_throughput",
    "per_repeat_ratios",
    "register_variant",
    "run_bench",
    "run_order",
    "summarize",
    "throughput",
    "train_by_hand",
]

DEFAULT_CONFIG = "recipes/dlrm_synthetic.yaml"
# Above this share of the CPUs taken by other processes during a run, the run is flagged.
FOREIGN_CPU_WARNING = 0.05
RATIO_METHOD = ("median over repeats of (variant samples/s / baseline samples/s in the same repeat); samples/s = "
                "timed samples / wall time of the timed steps; median-step samples/s = batch / median step time")


# ----------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """A freshly built model and DataModule (not yet set up), as the recipe and its overrides describe them."""

    model: pl.LightningModule
    datamodule: pl.LightningDataModule
    epochs: int = 1  # epochs every variant trains (``--epochs``)


@dataclass
class StepClock:
    """End time (``time.perf_counter``) and input count of every training step, in order."""

    ends: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)

    def tick(self, samples: int) -> None:
        """Record the end of a step that trained on ``samples`` inputs."""
        self.ends.append(time.perf_counter())
        self.samples.append(int(samples))


@dataclass
class TrainedRun:
    """What a variant hands back: the trained model (a batch to click logits ``[B]``) and its step times."""

    model: Callable[[Batch], Tensor]
    clock: StepClock
    extras: dict[str, float] = field(default_factory=dict)  # what a variant reports of itself (medians shown)
    device: str = "cpu"  # where the model takes its batches


VariantFn = Callable[[Recipe], TrainedRun]


@dataclass(frozen=True)
class Variant:
    """A named way of training a :class:`Recipe` for one epoch."""

    name: str
    train: VariantFn
    description: str = ""


VARIANTS: dict[str, Variant] = {}


def register_variant(name: str, description: str = "") -> Callable[[VariantFn], VariantFn]:
    """Register ``fn(recipe) -> TrainedRun`` as the benchmark variant ``name`` (a decorator).

    The function must train ``recipe.model`` on ``recipe.datamodule``'s training split for one epoch, call
    ``clock.tick(batch_size)`` at the end of every step (after the optimizer step), and return the trained model.

    Example::

        @register_variant("popularity_batches", "Lightning, batches grouped by ID popularity")
        def popularity_batches(recipe: Recipe) -> TrainedRun:
            return fit_with_lightning(recipe, callbacks=[PopularityBatching()])
    """

    def register(fn: VariantFn) -> VariantFn:
        if name in VARIANTS:
            raise ValueError(f"a benchmark variant named {name!r} is already registered")
        VARIANTS[name] = Variant(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return register


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


# ----------------------------------------------------------------------------------------------------------
# Statistics (pure)
# ----------------------------------------------------------------------------------------------------------


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
            extras={key: median(r.extras[key] for r in own if key in r.extras)
                    for key in dict.fromkeys(k for r in own for k in r.extras)})
    return summaries


# ----------------------------------------------------------------------------------------------------------
# Building, training and scoring
# ----------------------------------------------------------------------------------------------------------


class _RecipeCLI(SkewCLI):
    """Parses a recipe and builds only its model and data: the benchmark brings its own training loops."""

    def instantiate_classes(self) -> None:
        config = self.config.clone()
        del config["trainer"]  # its loggers and callbacks are for `fit`, not for timing
        self.config_init = self.parser.instantiate_classes(config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self.trainer = None


def build_recipe(recipe_args: Sequence[str], epochs: int = 1) -> Recipe:
    """Model and DataModule from LightningCLI arguments (``--config recipe.yaml --data.init_args.X v ...``).

    The recipe's ``seed_everything`` is applied before the model is built, so every call with the same
    arguments gives the same initial weights.
    """
    with warnings.catch_warnings():
        # `lightning-skew bench ...` leaves sys.argv set; the recipe's arguments are these, on purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _RecipeCLI(model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule,
                         subclass_mode_model=True, subclass_mode_data=True, save_config_callback=None,
                         args=list(recipe_args), run=False, auto_configure_optimizers=False)
    if cli.datamodule is None:
        raise ValueError("the recipe has no data section; the benchmark needs a DataModule")
    return Recipe(model=cli.model, datamodule=cli.datamodule, epochs=epochs)


def ensure_process_group() -> None:
    """Start a one-process gloo group (in-memory store) unless one exists: TorchRec shards over a process group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _dense_optimizer(configured: Any) -> torch.optim.Optimizer:
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict) and isinstance(configured.get("optimizer"), torch.optim.Optimizer):
        if configured.get("lr_scheduler") is not None:
            raise ValueError("the hand-written loop applies no LR scheduler (TorchRecStrategy would also scale the "
                             "embedding LR by it); benchmark a recipe without lr_scheduler")
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)) and len(configured) == 1:
        return _dense_optimizer(configured[0])
    raise ValueError(f"configure_optimizers() returned {type(configured).__name__}; the hand-written loop takes "
                     "one optimizer (or a dict with 'optimizer')")


@register_variant("handwritten", "TorchRec DMP and a plain PyTorch loop, no Lightning")
def train_by_hand(recipe: Recipe) -> TrainedRun:
    """A plain TorchRec training loop: the module sharded as TorchRecStrategy shards it, then
    forward, BCE loss, backward (embeddings update inside it), dense optimizer step."""
    ensure_process_group()
    module, datamodule = recipe.model, recipe.datamodule
    dmp = shard_module(module, torch.device("cpu"))
    dmp.train()
    optimizer = _dense_optimizer(module.configure_optimizers())
    datamodule.prepare_data()
    datamodule.setup("fit")
    clock = StepClock()
    for _ in range(recipe.epochs):
        for batch in datamodule.train_dataloader():
            loss = F.binary_cross_entropy_with_logits(dmp(batch), batch.labels.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            clock.tick(batch_size_of(batch))
    return TrainedRun(model=dmp, clock=clock)


class _ClockCallback(pl.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.clock.tick(batch_size_of(batch))


def fit_with_lightning(recipe: Recipe, callbacks: Sequence[pl.Callback] = (),
                       strategy: pl.strategies.Strategy | str | None = None, accelerator: str = "cpu") -> TrainedRun:
    """One epoch of ``Trainer.fit`` on one process with :class:`TorchRecStrategy` (or ``strategy``), without
    logger, checkpoints, progress bar or validation; ``callbacks`` are added (for variants built on this one)."""
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="lightning-skew-bench-") as root_dir:
        trainer = pl.Trainer(accelerator=accelerator, devices=1, strategy=strategy or TorchRecStrategy(),
                             max_epochs=recipe.epochs,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             default_root_dir=root_dir, callbacks=[_ClockCallback(clock), *callbacks])
        trainer.fit(recipe.model, datamodule=recipe.datamodule)
    return TrainedRun(model=trainer.strategy.model, clock=clock, device=str(trainer.strategy.root_device))


@register_variant("lightning", "Lightning Trainer with TorchRecStrategy")
def _lightning(recipe: Recipe) -> TrainedRun:
    return fit_with_lightning(recipe)


# Popularity batching (FAE, Hotline): the hot set fits this many bytes of rows plus optimizer state; for the
# default recipe 8 MB covers about 96% of lookups and makes about a third of the inputs all-hot.
POPULARITY_HOT_BUDGET_BYTES = 8_000_000


def _embedding_dim(recipe: Recipe) -> int:
    return int(recipe.model.hparams.get("embedding_dim", 16))


def _profiled_hot_rows(recipe: Recipe) -> ProfiledHotRows:
    """The hot set of the popularity, stale (``p``) and hot/cold variants: a 5% batch profile cut to 8 MB."""
    return ProfiledHotRows(budget_bytes=POPULARITY_HOT_BUDGET_BYTES, embedding_dim=_embedding_dim(recipe),
                           sample_fraction=0.05)


def fit_with_popularity_batches(recipe: Recipe, schedule: str) -> TrainedRun:
    """One Lightning epoch on :class:`PopularityDataModule` batches, its hot rows from a 5% batch-sampled
    :class:`AccessProfile` taken in set-up. Reports the profiling time, also as a share of the epoch."""
    source = _profiled_hot_rows(recipe)
    batches = PopularityDataModule(recipe.datamodule, schedule=schedule, hot_rows=source)
    run = fit_with_lightning(Recipe(recipe.model, batches, recipe.epochs))
    ends = run.clock.ends
    epoch_s = (ends[-1] - ends[0]) * len(ends) / max(len(ends) - 1, 1)  # the first step's start is not recorded
    stats = batches.epoch_stats.get(0)
    run.extras = {"profile_s": source.profile.seconds, "profile_share_of_epoch": source.profile.seconds / epoch_s,
                  "hot_input_share": stats.hot_input_share if stats else float("nan")}
    return run


for _schedule, _what in (("fae", "cold batches, then hot-only batches (FAE)"),
                         ("interleave", "hot-only and cold batches interleaved"),
                         ("stitch", "every batch split into a hot and a cold micro-batch (Hotline)")):
    register_variant(_schedule, f"Lightning, {_what}")(
        lambda recipe, schedule=_schedule: fit_with_popularity_batches(recipe, schedule))


# Stale-embedding skipping (Slipstream): candidates are the most looked-up rows of each window, the threshold
# is searched for the target share of dropped inputs. Run on uniform IDs with --data.init_args.uniform true.
STALE_EVALUATE_EVERY_N_STEPS = 100


class _ReadInputs(pl.Callback):
    """Records each step's batch size before the skipper shrinks it: a variant's samples/s counts inputs read."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.sizes.append(batch_size_of(batch))


def fit_with_stale_skipping(recipe: Recipe, target_drop_fraction: float, profiled: bool = False,
                            min_stale_lookups: int | None = None, repack: bool = False) -> TrainedRun:
    """Lightning with :class:`StaleEmbeddingSkipper`; samples/s counts the inputs read (dropped ones included),
    extras report the measured drop share, the stale rows and threshold at the end, and the callback's time.
    ``profiled`` takes the candidates from a 5% :class:`AccessProfile` (the popularity variants' hot set);
    ``repack`` drops in the data pipeline and trains full batches (each step then counts the inputs read for it)."""
    from lightning_skew.stale.skipper import StaleEmbeddingSkipper

    read = _ReadInputs()
    hot_rows = _profiled_hot_rows(recipe) if profiled else None
    skipper = StaleEmbeddingSkipper(hot_rows=hot_rows, evaluate_every_n_steps=STALE_EVALUATE_EVERY_N_STEPS,
                                    target_drop_fraction=target_drop_fraction, min_stale_lookups=min_stale_lookups,
                                    repack=repack)
    run = fit_with_lightning(recipe, callbacks=[read, skipper])
    sizes = skipper.pulled_per_batch if repack else read.sizes
    if len(sizes) == len(run.clock.samples):
        run.clock.samples = sizes
    ends = run.clock.ends
    epoch_s = (ends[-1] - ends[0]) * len(ends) / max(len(ends) - 1, 1)
    run.extras = {"drop_share": skipper.inputs_dropped / max(skipper.inputs_seen, 1),
                  "stale_rows": float(len(skipper.stale)) if skipper.stale is not None else 0.0,
                  "threshold": skipper.threshold, "skipper_share_of_run": skipper.seconds / epoch_s}
    return run


for _percent in (10, 30, 50):
    register_variant(f"stale{_percent}", f"Lightning, inputs on stale rows dropped, target {_percent}% (Slipstream)")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(recipe, fraction))
    register_variant(f"stale{_percent}p", f"as stale{_percent}, candidates from an access profile's hot rows")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(recipe, fraction, profiled=True))
    register_variant(f"stale{_percent}p_half", f"as stale{_percent}p, an input dropped when half its lookups are stale")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(
            recipe, fraction, profiled=True, min_stale_lookups=len(recipe.datamodule.sparse_feature_names) // 2))
    register_variant(f"stale{_percent}p_repack", f"as stale{_percent}p, dropped in the data pipeline, full batches")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(recipe, fraction, profiled=True, repack=True))
    register_variant(f"stale{_percent}p_half_repack", f"as stale{_percent}p_half, dropped in the data pipeline, "
                     "full batches")(
        lambda recipe, fraction=_percent / 100: fit_with_stale_skipping(
            recipe, fraction, profiled=True, min_stale_lookups=len(recipe.datamodule.sparse_feature_names) // 2,
            repack=True))


# Hot/cold placement (FAE): hot rows get the popularity variants' 8 MB budget. On CPU both parts live in host
# memory (the hot shard is compact); the gpu_* variants need CUDA and FBGEMM's CUDA build.
HOT_COLD_BUDGET_BYTES = POPULARITY_HOT_BUDGET_BYTES


def fit_with_hot_cold(recipe: Recipe, accelerator: str = "cpu", schedule: str | None = None,
                      **strategy_options: Any) -> TrainedRun:
    """Lightning with :class:`HotColdStrategy` (hot set from a 5% profile of the training batches at setup, or
    the PopularityDataModule's when ``schedule`` is given). Extras: hot rows, hot bytes, the hot share of the
    profiled lookups where known, forwards that skipped the cold part, and peak GPU memory on CUDA."""
    from lightning_skew.hotcold.strategy import HotColdStrategy

    strategy = HotColdStrategy(budget_bytes=HOT_COLD_BUDGET_BYTES, **strategy_options)
    datamodule = recipe.datamodule
    if schedule is not None:
        datamodule = PopularityDataModule(datamodule, schedule=schedule, hot_rows=_profiled_hot_rows(recipe))
    _reset_gpu_peak(accelerator)
    run = fit_with_lightning(Recipe(recipe.model, datamodule, recipe.epochs), strategy=strategy,
                             accelerator=accelerator)
    placements = list(strategy.placements.values())
    run.extras = {"hot_rows": float(sum(t.num_hot for p in placements for t in p.tables)),
                  "hot_mb": sum(p.hot_bytes for p in placements) / 1e6,
                  "cold_skipped_steps": float(sum(c.skipped_cold for c in strategy.collections().values())),
                  **_gpu_peak(accelerator)}
    if strategy.rebalances:
        run.extras.update(rebalances=float(len(strategy.rebalances)),
                          rebalance_s=median(r["rebalance_seconds"] for r in strategy.rebalances),
                          rows_moved=median(r["rows_moved"] for r in strategy.rebalances))
    return run


def fit_with_plain_hot_cold(recipe: Recipe, accelerator: str = "cpu") -> TrainedRun:
    """Lightning on one device without TorchRec sharding (``strategy="auto"``), the model placed by
    :func:`~lightning_skew.hotcold.plain.place_hot_cold`: hot rows with the model, cold rows in host
    memory, plain PyTorch embedding bags (the path for GPUs without FBGEMM's CUDA build). The hot set is the
    hot/cold variants' (5% profile, 8 MB), taken before the timed steps."""
    from lightning_skew.hotcold.plain import place_hot_cold

    _reset_gpu_peak(accelerator)  # first: a machine without CUDA fails before the profile
    placements = place_hot_cold(recipe.model, _profiled_hot_rows(recipe).hot_rows(recipe.datamodule),
                                HOT_COLD_BUDGET_BYTES)
    run = fit_with_lightning(recipe, strategy="auto", accelerator=accelerator)
    run.extras = {"hot_rows": float(sum(t.num_hot for p in placements.values() for t in p.tables)),
                  "hot_mb": sum(p.hot_bytes for p in placements.values()) / 1e6, **_gpu_peak(accelerator)}
    return run


def fit_on_gpu(recipe: Recipe, compute_kernel: str, cache_load_factor: float | None = None) -> TrainedRun:
    """Lightning with :class:`TorchRecStrategy` on one GPU, every table with ``compute_kernel``."""
    _reset_gpu_peak("gpu")
    run = fit_with_lightning(recipe, strategy=TorchRecStrategy(compute_kernel=compute_kernel,
                                                               cache_load_factor=cache_load_factor),
                             accelerator="gpu")
    run.extras = _gpu_peak("gpu")
    return run


def hot_share_of_rows(recipe: Recipe, budget_bytes: int) -> float:
    """The share of all table rows (weights plus rowwise_adagrad state) that ``budget_bytes`` holds: the cache
    load factor that gives TorchRec's UVM cache the hot/cold variants' GPU memory."""
    dim = _embedding_dim(recipe)
    rows = sum(recipe.datamodule.num_embeddings_per_feature)
    return min(1.0, budget_bytes / (rows * 4 * (dim + 1)))


def _reset_gpu_peak(accelerator: str) -> None:
    if accelerator != "cpu":
        if not torch.cuda.is_available():
            raise RuntimeError("the gpu_* benchmark variants need CUDA (and FBGEMM's CUDA build); this machine has none")
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak(accelerator: str) -> dict[str, float]:
    return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 1e6} if accelerator != "cpu" else {}


register_variant("hotcold", "Lightning, HotColdStrategy: hot rows in a compact shard (CPU: both in host memory)")(
    fit_with_hot_cold)
register_variant("hotcold_rebalance", "as hotcold, rebalancing every 100 steps from the lookups counted")(
    lambda recipe: fit_with_hot_cold(recipe, rebalance_every_n_steps=100))
register_variant("hotcold_fae", "as hotcold, FAE batches: hot-only batches never touch the cold shard")(
    lambda recipe: fit_with_hot_cold(recipe, schedule="fae"))
register_variant("hotcold_plain", "Lightning without sharding, hot/cold split with plain PyTorch embedding bags "
                 "(CPU: both in host memory)")(fit_with_plain_hot_cold)
register_variant("gpu_hbm", "GPU, every table in GPU memory (fused)")(lambda recipe: fit_on_gpu(recipe, "fused"))
register_variant("gpu_host", "GPU, every table in host memory (fused_uvm)")(
    lambda recipe: fit_on_gpu(recipe, "fused_uvm"))
register_variant("gpu_uvm_cache", "GPU, TorchRec's UVM cache sized to the hot/cold budget")(
    lambda recipe: fit_on_gpu(recipe, "fused_uvm_caching", hot_share_of_rows(recipe, HOT_COLD_BUDGET_BYTES)))
register_variant("gpu_hotcold", "GPU, HotColdStrategy: hot rows in GPU memory, cold in host memory (fused_uvm)")(
    lambda recipe: fit_with_hot_cold(recipe, accelerator="gpu"))
register_variant("gpu_hotcold_plain", "GPU without FBGEMM's CUDA build: hot rows in GPU memory (plain PyTorch "
                 "embedding bags), cold rows looked up in host memory")(
    lambda recipe: fit_with_plain_hot_cold(recipe, accelerator="gpu"))
register_variant("gpu_hotcold_fae", "as gpu_hotcold, FAE batches (hot batches stay in GPU memory)")(
    lambda recipe: fit_with_hot_cold(recipe, accelerator="gpu", schedule="fae"))


@torch.no_grad()
def evaluate(model: Callable[[Batch], Tensor], batches: Iterable[Batch], device: str = "cpu") -> Quality:
    """AUC (torchmetrics ``binary_auroc``) and mean log-loss of ``model``'s logits over ``batches``."""
    if isinstance(model, nn.Module):
        model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(model(batch.to(device) if device != "cpu" else batch).detach().float().reshape(-1).cpu())
        labels.append(batch.labels.reshape(-1).float())
    if not logits:
        raise ValueError("no evaluation batches: the held-out split is empty")
    logit, label = torch.cat(logits), torch.cat(labels)
    auc = float(binary_auroc(torch.sigmoid(logit), label.long()))
    logloss = float(F.binary_cross_entropy_with_logits(logit, label))
    return Quality(auc=auc, logloss=logloss, samples=label.numel())


def _run_once(variant: Variant, recipe_args: Sequence[str], warmup_steps: int, repeat: int,
              position: int, epochs: int = 1) -> RunResult:
    began = time.perf_counter()
    cpu_before = CpuSnapshot.take()
    recipe = build_recipe(recipe_args, epochs)
    trained = variant.train(recipe)
    clock = trained.clock
    rate, timed_samples, timed_s = throughput(clock.ends, clock.samples, warmup_steps)
    quality = evaluate(trained.model, recipe.datamodule.val_dataloader(), trained.device)
    cpu_after = CpuSnapshot.take()
    foreign = (foreign_cpu_share(cpu_before, cpu_after, _usable_cores())
               if cpu_before is not None and cpu_after is not None else None)
    return RunResult(repeat=repeat, position=position, variant=variant.name, samples_per_s=rate,
                     timed_samples=timed_samples, timed_s=timed_s,
                     median_step_samples_per_s=median_step_throughput(clock.ends, clock.samples, warmup_steps),
                     steps=len(clock.ends),
                     setup_s=clock.ends[warmup_steps - 1] - began, auc=quality.auc, logloss=quality.logloss,
                     foreign_cpu_share=foreign, extras=dict(trained.extras))


def run_bench(recipe_args: Sequence[str], variants: Sequence[str], repeats: int = 3, warmup_steps: int = 10,
              progress: Callable[[str], None] | None = None, epochs: int = 1) -> list[RunResult]:
    """Run every variant once per repeat (order rotated each repeat), each from a freshly built recipe."""
    _check_variants(variants)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    runs = []
    for repeat in range(repeats):
        for position, name in enumerate(run_order(variants, repeat)):
            gc.collect()  # free the previous run's tables before building the next
            run = _run_once(VARIANTS[name], recipe_args, warmup_steps, repeat, position, epochs)
            runs.append(run)
            if progress is not None:
                progress(f"repeat {repeat + 1}/{repeats} {name}: {run.samples_per_s:,.0f} samples/s over "
                         f"{run.timed_samples} samples ({run.steps} steps), val AUC {run.auc:.4f}, "
                         f"log-loss {run.logloss:.4f}{_foreign_note(run.foreign_cpu_share)}")
    return runs


def _foreign_note(share: float | None) -> str:
    if share is None or share < FOREIGN_CPU_WARNING:
        return ""
    return f"; other processes took {share:.0%} of the CPUs: this run's figure is not trustworthy"


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_variants(variants: Sequence[str]) -> None:
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown benchmark variant(s) {unknown or variants}; registered: {sorted(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants repeat a name: {list(variants)}")


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model and cores, torch threads, load average and the versions of the packages that matter."""
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "lightning", "torchmetrics"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu_model": cpu_model, "cpu_cores": os.cpu_count(), "usable_cores": _usable_cores(),
            "torch_threads": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg()),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def format_report(report: dict[str, Any]) -> str:
    """The report as text: machine, command, and a Markdown table of the variants."""
    machine, settings = report["machine"], report["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    baseline = report["baseline"]
    lines = [
        f"command: {report['command']}",
        f"machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores, torch threads "
        f"{machine['torch_threads']}, load average at start {load}; python {machine['python']}, {versions}",
        f"settings: {settings['repeats']} repeat(s), order rotated each repeat; {settings['train_samples_per_run']} "
        f"training samples per epoch, {settings.get('epochs', 1)} epoch(s) per run, {settings['warmup_steps']} "
        f"warm-up steps not timed; ratio = {RATIO_METHOD}",
        "",
        f"| variant | samples/s (median) | min | max | ratio to {baseline} [min, max] | median-step samples/s | "
        "its ratio | val AUC | val log-loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["variants"].values():
        lines.append(f"| {s['variant']} | {s['median_samples_per_s']:,.0f} | {s['min_samples_per_s']:,.0f} | "
                     f"{s['max_samples_per_s']:,.0f} | {s['ratio']:.3f} [{s['min_ratio']:.3f}, "
                     f"{s['max_ratio']:.3f}] | {s['median_step_samples_per_s']:,.0f} | {s['median_step_ratio']:.3f} | "
                     f"{s['auc']:.4f} | {s['logloss']:.4f} |")
    lines.append("")
    baseline_quality = report["variants"][baseline]
    for s in report["variants"].values():
        delta = f"AUC {s['auc'] - baseline_quality['auc']:+.4f}, log-loss {s['logloss'] - baseline_quality['logloss']:+.4f}"
        notes = ", ".join(f"{key} {value:.4g}" for key, value in s.get("extras", {}).items())
        if s["variant"] != baseline or notes:
            lines.append(f"{s['variant']}: against {baseline} {delta}" + (f"; {notes}" if notes else ""))
    foreign = report.get("max_foreign_cpu_share")
    if foreign is not None:
        verdict = "fine" if foreign < FOREIGN_CPU_WARNING else "NOT trustworthy: rerun on a quiet machine"
        lines += ["", f"other processes' CPU use during the runs: at most {foreign:.1%} of the cores ({verdict})"]
    if report.get("best_attainable_auc") is not None:
        lines += ["", f"best attainable val AUC (the generator's true click probabilities): "
                      f"{report['best_attainable_auc']:.4f}"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-skew bench", allow_abbrev=False,
        description="Train benchmark variants side by side (alternating, repeated) and compare samples/s and "
                    "model quality. Other arguments (--data.init_args.X v, --model.init_args.X v) override the "
                    "recipe.",
        epilog=f"registered variants: {', '.join(f'{v.name} ({v.description})' for v in VARIANTS.values())}")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the recipe (a LightningCLI config)")
    parser.add_argument("--variants", default="handwritten,lightning",
                        help="comma-separated variant names; the first is the baseline")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="training samples per run (sets data.init_args.num_train_samples)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps of every run left untimed")
    parser.add_argument("--epochs", type=int, default=1, help="epochs every variant trains (default 1)")
    parser.add_argument("--output", default=None, help="also write the report here as JSON")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``lightning-skew bench``: parse arguments, run, print the report and write it (``--output``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parser().parse_known_args(argv)
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    _check_variants(variants)
    if args.repeats < 1 or args.warmup_steps < 1 or args.epochs < 1:
        raise SystemExit(f"--repeats, --warmup-steps and --epochs must be at least 1, got {args.repeats}, "
                         f"{args.warmup_steps}, {args.epochs}")
    machine = machine_info()  # before any work, so the load average is the machine's, not ours
    _quiet_logs()
    recipe_args = ["--config", args.config, *overrides]
    if args.train_samples is not None:
        recipe_args += ["--data.init_args.num_train_samples", str(args.train_samples)]
    probe = build_recipe(recipe_args)  # fails early on a bad recipe; also gives the data's sizes
    best = getattr(probe.datamodule, "best_attainable_auc", None)
    best_auc = float(best("val")) if callable(best) else None
    train_samples = getattr(probe.datamodule, "num_samples", {}).get("train")
    del probe

    runs = run_bench(recipe_args, variants, args.repeats, args.warmup_steps,
                     progress=lambda line: print(line, flush=True), epochs=args.epochs)
    summaries = summarize(runs, baseline=variants[0])
    report = {
        "command": "lightning-skew bench " + shlex.join(argv),
        "machine": machine,
        "settings": {"config": args.config, "overrides": overrides, "variants": variants, "repeats": args.repeats,
                     "train_samples_per_run": train_samples, "warmup_steps": args.warmup_steps,
                     "epochs": args.epochs},
        "baseline": variants[0],
        "ratio_method": RATIO_METHOD,
        "best_attainable_auc": best_auc,
        "max_foreign_cpu_share": max((r.foreign_cpu_share for r in runs if r.foreign_cpu_share is not None),
                                     default=None),
        "variants": {name: asdict(s) for name, s in summaries.items()},
        "runs": [asdict(run) for run in runs],
    }
    print(format_report(report), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _quiet_logs() -> None:
    # Per-run banners (devices, sharding plan, process group) would bury the figures; warnings stay.
    for name in ("lightning.pytorch", "lightning.fabric", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="torchrec")
    warnings.filterwarnings("ignore", module="fbgemm_gpu")
    # Lightning's guess about sized IterableDatasets; lightning-skew's streams split batches among workers.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
