"""Running the benchmark: each variant built through LightningCLI as ``fit`` builds it, the hand-written TorchRec
baseline, validation scores, repeated side-by-side runs, on one process or on every rank of a launched group."""

from __future__ import annotations

import gc
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch

from lightning_skew.bench.extras import read_inputs, run_extras
from lightning_skew.bench.launch import launched_rank
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
from lightning_skew.bench.types import Quality, Recipe, RunResult, StepClock, TrainedRun, reporting_progress
from lightning_skew.bench.variants import Variant, completed_args
from lightning_skew.cli import SkewCLI, cli_options
from lightning_skew.core.monitor import batch_size_of
from lightning_skew.torchrec.sharding import shard_module


class _ClockStart(pl.Callback):
    """First of the callbacks: notes the batch's size before any other part sees it (the skipper shrinks it) and
    ticks the clock as the step ends, before the others' end-of-step work."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.size = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.size = batch_size_of(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.clock.tick(self.size)


class _ModelClock(pl.Callback):
    """Last of the callbacks: marks the start of the model's work (the others' per-step work is the loop's)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.clock.begin_model()


def _bench_trainer(trainer: Any, root_dir: str, epochs: int) -> None:
    """What the bench changes in a variant's Trainer config: no logger, checkpoints, progress bar, summary or
    validation (the bench scores the trained model itself), ``epochs`` epochs, files under ``root_dir``."""
    callbacks = trainer.get("callbacks") or []
    kept = []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        path = getattr(callback, "class_path", None) or ""
        module, _, name = path.rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name, None) if module else None
        if not (isinstance(cls, type) and issubclass(cls, ModelCheckpoint)):
            kept.append(callback)
    trainer.callbacks = kept
    trainer.logger = False
    trainer.enable_checkpointing = False
    trainer.enable_progress_bar = False
    trainer.enable_model_summary = False
    trainer.num_sanity_val_steps = 0
    trainer.limit_val_batches = 0
    trainer.max_epochs = epochs
    trainer.default_root_dir = root_dir


def _cli(args: Sequence[str], mode: str, root_dir: str = "", epochs: int = 1) -> SkewCLI:
    """``SkewCLI`` on ``args`` (run=False): ``mode`` ``"parse"`` only parses, ``"recipe"`` builds model and data,
    ``"fit"`` also the Trainer that ``fit`` would build (with the bench's changes, :func:`_bench_trainer`)."""

    class _BenchCLI(SkewCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            if mode == "fit":
                _bench_trainer(self.config.trainer, root_dir, epochs)

        def instantiate_classes(self) -> None:
            if mode == "parse":
                return
            if mode == "fit":
                super().instantiate_classes()
                return
            config = self.config.clone()
            del config["trainer"]  # the hand-written loop builds no Trainer
            self.config_init = self.parser.instantiate_classes(config)
            self.datamodule = self.config_init.get("data")
            self.model = self.config_init.get("model")
            self.trainer = None

    with warnings.catch_warnings():
        # `lightning-skew bench ...` leaves sys.argv set; the recipe's arguments are these, on purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _BenchCLI(**cli_options(), save_config_callback=None, args=list(args), run=False)


def recipe_config(recipe_args: Sequence[str]) -> dict[str, Any]:
    """The recipe's full config (``--config recipe.yaml`` and its overrides) as LightningCLI dumps it."""
    cli = _cli(recipe_args, "parse")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*skip_check")
        return yaml.safe_load(cli.parser.dump(cli.config, skip_validation=True))


def build_recipe(recipe_args: Sequence[str], epochs: int = 1) -> Recipe:
    """Model and DataModule from LightningCLI arguments (``--config recipe.yaml --data.init_args.X v ...``).

    The recipe's ``seed_everything`` is applied before the model is built, so every call with the same
    arguments gives the same initial weights.
    """
    cli = _cli(recipe_args, "recipe")
    if cli.datamodule is None:
        raise ValueError("the recipe has no data section; the benchmark needs a DataModule")
    return Recipe(model=cli.model, datamodule=cli.datamodule, epochs=epochs)


def check_runnable(variant: Variant, recipe_args: Sequence[str], recipe: dict[str, Any]) -> None:
    """Parse the variant's arguments (a bad override fails before any run) and refuse one that needs CUDA where
    there is none."""
    if variant.handwritten:
        return
    with tempfile.TemporaryDirectory(prefix="lightning-skew-bench-") as folder:
        cli = _cli([*recipe_args, *completed_args(variant, recipe, Path(folder))], "parse")
    accelerator = str(cli.config.trainer.get("accelerator") or "")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"variant {variant.name!r} trains with accelerator={accelerator!r}: the gpu_* variants "
                           "need CUDA (and FBGEMM's CUDA build); this machine has none")


def ensure_process_group() -> None:
    """Join the launched ranks (env:// rendezvous, gloo) or start a one-process gloo group
    (in-memory store), unless a group exists: TorchRec shards over a process group."""
    if dist.is_initialized():
        return
    if launched_rank() is not None:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def dense_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The one dense optimizer of ``configure_optimizers()``'s answer, for the hand-written loop."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict) and isinstance(configured.get("optimizer"), torch.optim.Optimizer):
        if configured.get("lr_scheduler") is not None:
            raise ValueError("the hand-written loop applies no LR scheduler (TorchRecStrategy would also scale the "
                             "embedding LR by it); benchmark a recipe without lr_scheduler")
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)) and len(configured) == 1:
        return dense_optimizer(configured[0])
    raise ValueError(f"configure_optimizers() returned {type(configured).__name__}; the hand-written loop takes "
                     "one optimizer (or a dict with 'optimizer')")


def train_by_hand(recipe: Recipe) -> TrainedRun:
    """A plain TorchRec training loop: the module sharded as TorchRecStrategy shards it (over every launched
    rank), then forward, BCE loss, backward (embeddings update inside it), dense optimizer step."""
    ensure_process_group()
    module, datamodule = recipe.model, recipe.datamodule
    dmp = shard_module(module, torch.device("cpu"))
    dmp.train()
    optimizer = dense_optimizer(module.configure_optimizers())
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


def fit_variant(args: Sequence[str], epochs: int = 1) -> tuple[TrainedRun, pl.LightningDataModule]:
    """``Trainer.fit`` of the model, data and Trainer that ``lightning-skew fit`` builds from ``args`` (less its
    logger, checkpoints, progress bar and validation), every step timed. Returns the run and its DataModule."""
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="lightning-skew-bench-") as root_dir:
        cli = _cli(args, "fit", root_dir, epochs)
        trainer = cli.trainer
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = _ClockStart(clock)
        trainer.callbacks.insert(0, start)
        trainer.callbacks.append(_ModelClock(clock))
        trainer.fit(cli.model, datamodule=cli.datamodule)
    read = read_inputs(trainer)
    if read is not None and len(read) == len(clock.samples):
        clock.samples = read  # samples/s counts the inputs read, dropped ones included
    return (TrainedRun(model=trainer.strategy.model, clock=clock, device=str(trainer.strategy.root_device),
                       extras=run_extras(trainer, clock.ends)), cli.datamodule)


@torch.no_grad()
def evaluate(model: Callable[[Batch], Tensor], batches: Iterable[Batch], device: str = "cpu") -> Quality:
    """AUC (torchmetrics ``binary_auroc``) and mean log-loss of ``model``'s logits over ``batches``; on several
    ranks every rank scores its share and the scores are over all of them."""
    if isinstance(model, nn.Module):
        model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(model(batch.to(device) if device != "cpu" else batch).detach().float().reshape(-1).cpu())
        labels.append(batch.labels.reshape(-1).float())
    logit = torch.cat(logits) if logits else torch.zeros(0)
    label = torch.cat(labels) if labels else torch.zeros(0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (logit, label))
        logit, label = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    if not logit.numel():
        raise ValueError("no evaluation batches: the held-out split is empty")
    auc = float(binary_auroc(torch.sigmoid(logit), label.long()))
    logloss = float(F.binary_cross_entropy_with_logits(logit, label))
    return Quality(auc=auc, logloss=logloss, samples=label.numel())


def _gathered(value: Any) -> list[Any]:
    """``value`` of every rank (``[value]`` on one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _global_clock(clock: StepClock) -> StepClock:
    """All ranks' steps as one clock: a step ends when its slowest rank ends it and trains every rank's inputs
    (the ranks step together: each step's collectives join them). One process: the clock itself."""
    clocks = _gathered((clock.ends, clock.samples, clock.model_s))
    if len(clocks) == 1:
        return clock
    if len({len(ends) for ends, _, _ in clocks}) != 1:
        raise RuntimeError(f"the ranks ran different numbers of steps: {[len(c[0]) for c in clocks]}")
    merged = StepClock(progress=None)
    merged.ends = [max(step) for step in zip(*(c[0] for c in clocks), strict=True)]
    merged.samples = [sum(step) for step in zip(*(c[1] for c in clocks), strict=True)]
    merged.model_s = list(clocks[0][2])  # rank zero's model time: the rest of its step is the loop's
    return merged


def _foreign_share(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """Other processes' share of the CPUs over a run, this process and the other ranks counted as ours."""
    spans = _gathered((before, after))
    if before is None or after is None or any(b is None or a is None for b, a in spans):
        return None
    own = sum(a.own_cpu_s - b.own_cpu_s for b, a in spans)
    return foreign_cpu_share(before, replace(after, own_cpu_s=before.own_cpu_s + own), usable_cores())


def _run_once(variant: Variant, recipe_args: Sequence[str], recipe: dict[str, Any], warmup_steps: int,
              repeat: int, position: int, epochs: int = 1) -> RunResult:
    began = time.perf_counter()
    cpu_before = CpuSnapshot.take()
    if variant.handwritten:
        built = build_recipe(recipe_args, epochs)
        trained, datamodule = train_by_hand(built), built.datamodule
    else:
        with tempfile.TemporaryDirectory(prefix="lightning-skew-bench-") as folder:
            args = [*recipe_args, *completed_args(variant, recipe, Path(folder))]
            trained, datamodule = fit_variant(args, epochs)
    clock = _global_clock(trained.clock)
    rate, timed_samples, timed_s = throughput(clock.ends, clock.samples, warmup_steps)
    quality = evaluate(trained.model, datamodule.val_dataloader(), trained.device)
    foreign = _foreign_share(cpu_before, CpuSnapshot.take())
    return RunResult(repeat=repeat, position=position, variant=variant.name, samples_per_s=rate,
                     timed_samples=timed_samples, timed_s=timed_s,
                     median_step_samples_per_s=median_step_throughput(clock.ends, clock.samples, warmup_steps),
                     steps=len(clock.ends),
                     setup_s=clock.ends[warmup_steps - 1] - began, auc=quality.auc, logloss=quality.logloss,
                     foreign_cpu_share=foreign, extras=dict(trained.extras),
                     outside_model_ms=outside_model_ms(clock.ends, clock.model_s, warmup_steps))


def run_bench(recipe_args: Sequence[str], variants: Sequence[Variant], repeats: int = 3, warmup_steps: int = 10,
              progress: Callable[[str], None] | None = None, epochs: int = 1) -> list[RunResult]:
    """Run every variant once per repeat (order rotated each repeat), each from a freshly built recipe.

    Every run builds the model and data afresh from the recipe and the variant's arguments (same seed, so the
    same initial weights and the same batches), trains, times the steps after the warm-up, and scores the
    trained model on the validation split. Under launched ranks (``--trainer.devices N``) every rank calls this with
    the same arguments; the figures are global (all ranks' inputs).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = [v.name for v in variants]
    if not variants or len(set(names)) != len(names):
        raise ValueError(f"variants must be at least one, none named twice: {names}")
    if launched_rank() is not None:
        ensure_process_group()  # once, before Lightning or TorchRec look for one
    recipe = recipe_config(recipe_args)
    for variant in variants:
        check_runnable(variant, recipe_args, recipe)
    by_name = {v.name: v for v in variants}
    runs = []
    for repeat in range(repeats):
        for position, name in enumerate(run_order(names, repeat)):
            gc.collect()  # free the previous run's tables before building the next
            label = f"repeat {repeat + 1}/{repeats} {name}"
            if progress is not None:
                progress(f"{label}: started")
            with reporting_progress(label, progress) if progress is not None else nullcontext():
                run = _run_once(by_name[name], recipe_args, recipe, warmup_steps, repeat, position, epochs)
            runs.append(run)
            if progress is not None:
                progress(f"{label}: {run.samples_per_s:,.0f} samples/s over {run.timed_samples} samples "
                         f"({run.steps} steps), val AUC {run.auc:.4f}, log-loss {run.logloss:.4f}"
                         f"{foreign_note(run.foreign_cpu_share)}")
    return runs


def world_size_of(overrides: Sequence[str]) -> int:
    """The ``--trainer.devices N`` (or ``=N``) among the command's overrides, 1 when absent or not a count."""
    value = None
    for i, word in enumerate(overrides):
        if word == "--trainer.devices" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif word.startswith("--trainer.devices="):
            value = word.split("=", 1)[1]
    try:
        return max(1, int(value)) if value is not None else 1
    except ValueError:
        return 1

