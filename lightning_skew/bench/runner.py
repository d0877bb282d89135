"""Running the benchmark: recipes built afresh, the two baseline loops, validation scores, repeated side-by-side runs."""

from __future__ import annotations

import gc
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch

from lightning_skew.bench.stats import (
    CpuSnapshot,
    foreign_cpu_share,
    foreign_note,
    median_step_throughput,
    outside_model_ms,
    run_order,
    throughput,
    usable_cores,
)
from lightning_skew.bench.types import (
    VARIANTS,
    Quality,
    Recipe,
    RunResult,
    StepClock,
    TrainedRun,
    Variant,
    register_variant,
    reporting_progress,
)
from lightning_skew.cli import SkewCLI
from lightning_skew.core.monitor import batch_size_of
from lightning_skew.torchrec.sharding import shard_module
from lightning_skew.torchrec.strategy import TorchRecStrategy


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


# The baselines every technique is measured against (registered first: `--variants handwritten,lightning` is
# the default): a hand-written TorchRec loop, and Lightning with TorchRecStrategy, which trains the same model.


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
            clock.begin_model()
            loss = F.binary_cross_entropy_with_logits(dmp(batch), batch.labels.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            clock.tick(batch_size_of(batch))
    return TrainedRun(model=dmp, clock=clock)


class _ClockCallback(pl.Callback):
    """Ticks the clock as a step ends (first of the callbacks, so the others' end-of-step work is not the model's)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.clock.tick(batch_size_of(batch))


class _ModelClockCallback(pl.Callback):
    """Marks the start of the model's work (last of the callbacks: the others' per-step work is the loop's)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.clock.begin_model()


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
                             default_root_dir=root_dir,
                       callbacks=[_ClockCallback(clock), *callbacks, _ModelClockCallback(clock)])
        trainer.fit(recipe.model, datamodule=recipe.datamodule)
    return TrainedRun(model=trainer.strategy.model, clock=clock, device=str(trainer.strategy.root_device))


@register_variant("lightning", "Lightning Trainer with TorchRecStrategy")
def _lightning(recipe: Recipe) -> TrainedRun:
    return fit_with_lightning(recipe)


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
    foreign = (foreign_cpu_share(cpu_before, cpu_after, usable_cores())
               if cpu_before is not None and cpu_after is not None else None)
    return RunResult(repeat=repeat, position=position, variant=variant.name, samples_per_s=rate,
                     timed_samples=timed_samples, timed_s=timed_s,
                     median_step_samples_per_s=median_step_throughput(clock.ends, clock.samples, warmup_steps),
                     steps=len(clock.ends),
                     setup_s=clock.ends[warmup_steps - 1] - began, auc=quality.auc, logloss=quality.logloss,
                     foreign_cpu_share=foreign, extras=dict(trained.extras),
                     outside_model_ms=outside_model_ms(clock.ends, clock.model_s, warmup_steps))


def run_bench(recipe_args: Sequence[str], variants: Sequence[str], repeats: int = 3, warmup_steps: int = 10,
              progress: Callable[[str], None] | None = None, epochs: int = 1) -> list[RunResult]:
    """Run every variant once per repeat (order rotated each repeat), each from a freshly built recipe.

    Every run builds the model and data afresh from one recipe (same seed, so the same initial weights and the
    same batches), trains with one variant of the training loop (:data:`VARIANTS`), times the steps after the
    warm-up, and scores the trained model on the validation split.
    """
    check_variants(variants)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    runs = []
    for repeat in range(repeats):
        for position, name in enumerate(run_order(variants, repeat)):
            gc.collect()  # free the previous run's tables before building the next
            label = f"repeat {repeat + 1}/{repeats} {name}"
            if progress is not None:
                progress(f"{label}: started")
            with reporting_progress(label, progress) if progress is not None else nullcontext():
                run = _run_once(VARIANTS[name], recipe_args, warmup_steps, repeat, position, epochs)
            runs.append(run)
            if progress is not None:
                progress(f"repeat {repeat + 1}/{repeats} {name}: {run.samples_per_s:,.0f} samples/s over "
                         f"{run.timed_samples} samples ({run.steps} steps), val AUC {run.auc:.4f}, "
                         f"log-loss {run.logloss:.4f}{foreign_note(run.foreign_cpu_share)}")
    return runs


def check_variants(variants: Sequence[str]) -> None:
    """Fail unless ``variants`` names registered variants, at least one and none twice."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown benchmark variant(s) {unknown or variants}; registered: {sorted(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants repeat a name: {list(variants)}")
