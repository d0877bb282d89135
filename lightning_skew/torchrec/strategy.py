"""A Lightning strategy that trains under TorchRec's ``DistributedModelParallel``."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline.train_pipelines import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer

from lightning_skew.core.id_ranges import check_table_ids, model_bounds
from lightning_skew.torchrec.atomic import remove
from lightning_skew.torchrec.checkpoint import (
    copy_into_shards,
    gather_unsharded,
    load_sharded_checkpoint,
    read_checkpoint_file,
    save_sharded_checkpoint,
    weights_or_full,
)
from lightning_skew.torchrec.optim import embedding_optimizer_names
from lightning_skew.torchrec.pipeline import (
    PipelinedLoader,
    StepStream,
    build_pipeline,
    check_pipeline,
    check_pipeline_name,
    check_same_batch,
)
from lightning_skew.torchrec.resume import resolving_last
from lightning_skew.torchrec.sharding import (
    DEFAULT_SHARDING_TYPES,
    cache_load_factor_for,
    plan_rows,
    shard_module,
)
from lightning_skew.torchrec.upstream import pipeline_model_attached, pipelined_modules

__all__ = ["TorchRecStrategy", "read_checkpoint_file", "weights_or_full"]

SHARDED_FORMAT = "sharded-v1"

# Hooks Lightning calls around its own backward and optimizer step; under a pipeline TorchRec runs both, so a
# module or callback that overrides one of these would silently lose it.
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


class TorchRecStrategy(DDPStrategy):
    """Runs any LightningModule that holds TorchRec ``EmbeddingBagCollection`` s under TorchRec's
    ``DistributedModelParallel`` (DMP): embedding tables sharded by TorchRec's planner and trained with a fused
    optimizer, the dense rest replicated with DDP (DMP's own wrap; Lightning adds none). CPU + gloo with one or
    more processes, or CUDA + NCCL.

    Args:
        sharding_types: sharding types the planner may choose per table (TorchRec names). Default
            ``table_wise``, ``column_wise``, ``table_column_wise``, which work on CPU and GPU.
        compute_kernel: TorchRec compute kernel for every table (``fused``; ``fused_uvm`` and
            ``fused_uvm_caching`` need CUDA).
        cache_load_factor: with ``compute_kernel="fused_uvm_caching"``, the share of each table's rows that
            TorchRec's UVM cache keeps on the GPU (TorchRec's default when ``None``).
        cache_budget_bytes: instead of ``cache_load_factor``, the bytes of rows and optimizer state the cache
            holds (the load factor is computed from the model's tables at setup,
            :func:`~lightning_skew.torchrec.sharding.cache_load_factor_for`): a cache of a hot/cold budget.
        embedding_optimizer: optimizer for modules whose embeddings carry none yet (see
            :func:`~lightning_skew.torchrec.optim.fuse_embedding_optimizer`); ``None`` requires the module to choose one.
        embedding_lr: learning rate for ``embedding_optimizer``.
        table_constraints: per table name, TorchRec planner constraints overriding the defaults above:
            ``sharding_types``, ``compute_kernels``, ``cache_load_factor``, ``cache_algorithm`` (``lru``/``lfu``),
            ``min_partition``, ``enforce_hbm``, ``stochastic_rounding``.
        topology: TorchRec ``Topology`` settings, e.g. ``hbm_cap`` and ``ddr_cap`` (bytes of fast and host
            memory per device) and bandwidths; world size and device come from the Trainer.
        planner: the planner by class path (default TorchRec's ``EmbeddingShardingPlanner``), with its stages
            (``enumerator``, ``storage_reservation``, ``proposer``, ``partitioner``, ``performance_model``) as
            class paths in its ``init_args``; each is built with this job's topology and constraints.
        plan_path: a file for the sharding plan: reused unchanged when it exists (same tables and world size),
            else written once planned.
        pipeline: train through one of TorchRec's train pipelines: ``"sparse_dist"`` (``TrainPipelineSparseDist``:
            the next batch's sparse inputs are distributed while the current one trains; CPU and CUDA),
            ``"semi_sync"`` (``TrainPipelineSemiSync``: embeddings looked up one step early; CUDA only) or
            ``"prefetch"`` (``PrefetchTrainPipelineSparseDist``: UVM cache rows prefetched; CUDA and
            ``fused_uvm_caching`` tables). ``None`` (default): Lightning's plain step. See the note below.
        process_group_backend: ``gloo`` or ``nccl``; default by device.
        timeout: collective timeout.
        start_method: how Lightning starts processes (see ``DDPStrategy``).

    .. note::
        Embedding rows are updated inside the backward pass (TorchRec's fused optimizers), so gradient
        accumulation and gradient clipping cannot apply to them: both raise an error at setup. Dense LR
        schedules reach the embedding optimizer: its learning rate is scaled by the ratio of the first dense
        param group's current to initial learning rate, before every training step.

    .. note::
        With ``pipeline``, each training step is one ``progress`` of TorchRec's pipeline: it reads the loader up to
        two batches ahead, distributes their sparse features early, and runs the forward (your ``training_step``,
        which must return the loss), the backward and the dense optimizer's step itself. Lightning keeps its
        loop, callbacks, logging, LR schedulers, validation and checkpoints; ``on_train_batch_start`` and
        ``on_train_batch_end`` see the batch of their step, which they may read but not change. Not supported,
        with an error at setup: manual optimization, more than one optimizer, loss scaling (``16-mixed``), and
        overrides of ``optimizer_step``, ``on_before_backward``, ``on_after_backward`` or
        ``on_before_optimizer_step`` (TorchRec's pipeline runs the backward and the step without them).

    .. note::
        Checkpoints are directories (``torch.distributed.checkpoint`` shards of every rank, plus ``meta.pt``);
        they resume at any world size and under any sharding plan (the reads are planned by chunk).
        :meth:`export_unsharded_checkpoint` writes an ordinary Lightning checkpoint file whose weights load into
        the unsharded module; given as ``ckpt_path`` it starts a new run from those weights (optimizers fresh).

    Example::

        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=TorchRecStrategy())
        trainer.fit(DLRMModule(...), datamodule)
    """

    strategy_name = "torchrec"

    def __init__(
        self,
        sharding_types: list[str] | None = None,
        compute_kernel: str = "fused",
        cache_load_factor: float | None = None,
        embedding_optimizer: str | None = None,
        embedding_lr: float = 0.01,
        table_constraints: dict[str, dict[str, Any]] | None = None,
        topology: dict[str, Any] | None = None,
        planner: dict[str, Any] | None = None,
        plan_path: str | None = None,
        pipeline: str | None = None,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        cache_budget_bytes: int | None = None,
    ) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method)
        self.sharding_types = list(sharding_types or DEFAULT_SHARDING_TYPES)
        self.compute_kernel = compute_kernel
        if cache_load_factor is not None and not 0 < cache_load_factor <= 1:
            raise ValueError(f"cache_load_factor must lie in (0, 1], got {cache_load_factor}")
        self.cache_load_factor = cache_load_factor
        if cache_budget_bytes is not None and (cache_load_factor is not None or cache_budget_bytes < 1):
            raise ValueError(f"cache_budget_bytes ({cache_budget_bytes}) sizes the cache instead of cache_load_factor "
                             f"({cache_load_factor}): give one of them, a positive number of bytes")
        self.cache_budget_bytes = cache_budget_bytes
        self.embedding_optimizer = embedding_optimizer
        self.embedding_lr = embedding_lr
        self.table_constraints = table_constraints
        self.topology = topology
        self.planner = planner
        self.plan_path = plan_path
        check_pipeline_name(pipeline)
        self.pipeline = pipeline
        self._train_pipeline: TrainPipelineSparseDist | None = None
        self._stream: StepStream | None = None
        self._step_args: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        self._embedding_base_lrs: list[float] = []
        self._lr_scale: float | None = None  # None: push the learning rate at the next step
        #: the embedding optimizers of the module (found at setup, before sharding fuses them into the kernels)
        self.embedding_optimizer_names: set[str] = set()

    # ----------------------------------------------------------------------------------------- set-up

    def _configure_launcher(self) -> None:
        # ckpt_path="last" falls back to the newest complete checkpoint (torchrec/resume.py says why it is here).
        super()._configure_launcher()
        self._launcher = resolving_last(self._launcher)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Shards exist only once DMP has sharded the module.
        return True

    @property
    def dmp(self) -> DistributedModelParallel:
        """The ``DistributedModelParallel`` that wraps the LightningModule (after setup)."""
        model = self.model
        if not isinstance(model, DistributedModelParallel):
            raise RuntimeError("TorchRecStrategy has not sharded the module yet (call after setup)")
        return model

    @property
    def fused_optimizer(self) -> CombinedOptimizer:
        """TorchRec's fused embedding optimizer (its param groups and state)."""
        return self.dmp.fused_optimizer

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self._check_trainer_flags(trainer)
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        # What the embeddings will run, read before sharding hides it in the kernels (row sizes of hot sets need it).
        self.embedding_optimizer_names = embedding_optimizer_names(self.lightning_module) or \
            ({self.embedding_optimizer} if self.embedding_optimizer else set())
        self.model = self._shard(self.lightning_module)
        model_bounds(self.lightning_module, refresh=True)  # the tables batches must fit, as sharded
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._embedding_base_lrs = [group["lr"] for group in self.fused_optimizer.param_groups]
            self._lr_scale = None
            if self.pipeline is not None:
                self._check_pipeline_step(trainer)
        self.setup_precision_plugin()
        self._log_plan(trainer)

    def _check_trainer_flags(self, trainer: pl.Trainer) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                "TorchRecStrategy does not support accumulate_grad_batches > 1: TorchRec's fused optimizers update "
                "embedding rows inside every backward pass. Raise the batch size instead.")
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                "TorchRecStrategy does not support gradient clipping: embedding gradients never materialize (the "
                "fused optimizer consumes them in backward), so a global norm cannot be formed. Remove "
                "gradient_clip_val, or clip dense gradients in your LightningModule's configure_gradient_clipping.")

    def _check_pipeline_step(self, trainer: pl.Trainer) -> None:
        """Fail unless TorchRec's pipeline can run this fit's training step: the device and kernels it needs, and
        no part that expects Lightning's own backward and optimizer step."""
        check_pipeline(self.pipeline, self.root_device, [row[3] for row in plan_rows(self.dmp.plan)])
        module = self.lightning_module
        what = f"TorchRecStrategy(pipeline={self.pipeline!r})"
        if not module.automatic_optimization:
            raise MisconfigurationException(
                f"{what} runs the backward and the optimizer step itself, so {type(module).__name__} cannot use "
                "manual optimization; set automatic_optimization = True, or train without the pipeline.")
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"{what} steps one dense optimizer; {type(module).__name__}.configure_optimizers gave "
                f"{len(self.optimizers)}.")
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise MisconfigurationException(
                f"{what} runs the backward itself, without the loss scaling of precision='16-mixed'; use "
                "precision='bf16-mixed' or '32-true', or train without the pipeline.")
        overridden = [f"{type(module).__name__}.{hook}" for hook in ("optimizer_step", *_STEP_HOOKS)
                      if is_overridden(hook, module)]
        overridden += [f"{type(callback).__name__}.{hook}" for callback in trainer.callbacks for hook in _STEP_HOOKS
                       if is_overridden(hook, callback, parent=pl.Callback)]
        if overridden:
            raise MisconfigurationException(
                f"{what} runs the backward and the dense optimizer's step inside TorchRec's pipeline, where "
                f"Lightning does not call {', '.join(overridden)}. Remove them, or train without the pipeline.")

    def _shard(self, module: pl.LightningModule) -> DistributedModelParallel:
        options = self._shard_options()
        if self.cache_budget_bytes is not None:
            options["cache_load_factor"] = cache_load_factor_for(module, self.cache_budget_bytes,
                                                                 self.embedding_optimizer)
        return shard_module(module, self.root_device, **options)

    def _shard_options(self) -> dict[str, Any]:
        """The sharding settings of this strategy, as :func:`~lightning_skew.torchrec.sharding.shard_module` takes
        them (one place, so that subclasses pass all of them on)."""
        return {"sharding_types": self.sharding_types, "compute_kernel": self.compute_kernel,
                "embedding_optimizer": self.embedding_optimizer, "embedding_lr": self.embedding_lr,
                "local_world_size": self.num_processes, "cache_load_factor": self.cache_load_factor,
                "table_constraints": self.table_constraints, "topology": self.topology, "planner": self.planner,
                "plan_path": self.plan_path}

    def _log_plan(self, trainer: pl.Trainer) -> None:
        rows = plan_rows(self.dmp.plan)
        text = "\n".join(["module | table | sharding type | compute kernel | ranks"] + [" | ".join(r) for r in rows])
        rank_zero_info(f"TorchRec sharding plan ({self.world_size} rank(s)):\n{text}")
        self.publish_plan(trainer, "sharding_plan", ["module", "table", "sharding_type", "compute_kernel", "ranks"],
                          rows, str(self.dmp.plan))

    def publish_plan(self, trainer: pl.Trainer, name: str, columns: list[str], rows: list[list[str]],
                     text: str) -> None:
        """Log a plan as a table to every logger that takes tables, and write it to ``<log_dir>/<name>.txt``.
        Collective (``trainer.log_dir`` is broadcast from rank zero); rank zero writes."""
        # Without a logger the log dir is the working directory, where the plan does not belong.
        log_dir = trainer.log_dir if trainer.loggers else None
        if not self.is_global_zero:
            return
        for logger in trainer.loggers:
            log_text = getattr(logger, "log_text", None)
            if callable(log_text):
                log_text(key=name, columns=columns, data=rows)
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / f"{name}.txt").write_text(text + "\n")

    # ------------------------------------------------------------------------------------- training

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._follow_dense_lr_schedule()
        if not self._pipelining():
            return super().training_step(*args, **kwargs)
        assert self._stream is not None
        batch = args[0] if args else kwargs.pop("batch")
        check_same_batch(batch, self._stream.trained_next())
        self._step_args = (args[1:], kwargs)
        pipeline = self._pipeline_for_step()
        first = not pipelined_modules(pipeline)
        output = pipeline.progress(self._stream.for_pipeline)
        self._stream.step_done()
        if first and not pipelined_modules(pipeline):
            rank_zero_warn(f"TorchRecStrategy(pipeline={self.pipeline!r}): no sharded module of "
                           f"{type(self.lightning_module).__name__} takes its input straight from the batch (e.g. "
                           "batch.sparse_features) in its forward, so none is pipelined and the steps run unpipelined")
        return output

    def _pipelining(self) -> bool:
        """Whether this training step runs through the pipeline (a fit with ``pipeline``, in its training loop)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return self.pipeline is not None and trainer is not None and trainer.training and self._stream is not None

    def _pipeline_for_step(self) -> TrainPipelineSparseDist:
        if self._train_pipeline is None:
            self._train_pipeline = build_pipeline(self.pipeline, self.dmp, self.optimizers[0], self.root_device,
                                                  self._pipelined_training_step)
        elif not pipeline_model_attached(self._train_pipeline):
            # Re-install the pipelined forwards (taken off for validation) without distributing the batch in hand
            # again: its inputs were distributed before.
            self._train_pipeline.attach(self.dmp, sparse_dist=False)
        # The pipeline trains only when its model (the DMP wrapper) is in training mode. Lightning's validation
        # puts the wrapper in eval mode and restores only the LightningModule's modes, so set the wrapper's own
        # flag (not its children's: their modes are Lightning's).
        self.dmp.training = True
        return self._train_pipeline

    def _pipelined_training_step(self, batch: Any) -> tuple[Tensor, Any]:
        """The pipeline's forward: the LightningModule's ``training_step`` through DMP (so DDP's hooks fire), as
        ``(loss, output)``."""
        args, kwargs = self._step_args
        output = super().training_step(batch, *args, **kwargs)
        loss = output if isinstance(output, Tensor) else output.get("loss") if isinstance(output, dict) else None
        if loss is None:
            raise MisconfigurationException(
                f"TorchRecStrategy(pipeline={self.pipeline!r}): {type(self.lightning_module).__name__}.training_step "
                "must return the loss (a tensor, or a dict with 'loss'): TorchRec's pipeline runs its backward.")
        return loss, output

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self._pipelining():
            return closure_loss  # the pipeline ran it inside training_step
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self._pipelining():
            return closure()  # training_step: the pipeline's forward, backward and dense optimizer step
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer
        if self.pipeline is None or not trainer.training:  # only the training loader feeds the pipeline
            return dataloader
        return PipelinedLoader(dataloader, self._start_epoch, lambda: trainer.training)

    def _start_epoch(self, stream: StepStream) -> None:
        self._stream = stream
        if self._train_pipeline is not None and self._train_pipeline.batches:
            self._train_pipeline.reset()  # batches read ahead in an epoch cut short (limit_train_batches)

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        # IDs are checked against the tables the module holds on the host, before the copy (any DataModule).
        batch = check_table_ids(self.lightning_module, batch)
        if self._pipelining():
            # The pipeline copies the batch itself; the hooks (and the batch Lightning shows) stay on the host.
            device = torch.device("cpu")
        return super().batch_to_device(batch, device, dataloader_idx)

    def _detach_pipeline(self) -> None:
        """Give the sharded modules their own forwards back (validation, testing, after the fit)."""
        if self._train_pipeline is not None and pipeline_model_attached(self._train_pipeline):
            self._train_pipeline.detach()

    def on_validation_start(self) -> None:
        self._detach_pipeline()
        super().on_validation_start()

    def on_test_start(self) -> None:
        self._detach_pipeline()
        super().on_test_start()

    def on_predict_start(self) -> None:
        self._detach_pipeline()
        super().on_predict_start()

    def on_train_end(self) -> None:
        self._detach_pipeline()
        self._train_pipeline = None
        self._stream = None
        super().on_train_end()

    def _follow_dense_lr_schedule(self) -> None:
        if not self.optimizers or not self._embedding_base_lrs:
            return
        group = self.optimizers[0].param_groups[0]
        scale = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
        if scale == self._lr_scale:
            return
        for group_, base in zip(self.fused_optimizer.param_groups, self._embedding_base_lrs, strict=True):
            group_["lr"] = base * scale
        self.fused_optimizer.step()  # only pushes the new learning rate into the fused kernels
        self._lr_scale = scale

    # ----------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("TorchRecStrategy.save_checkpoint takes no storage_options")
        tensors = {"state_dict": checkpoint["state_dict"], "fused_optimizer": self.fused_optimizer.state_dict()}
        meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        meta["lightning_skew"] = {"world_size": self.world_size, "format": SHARDED_FORMAT}
        save_sharded_checkpoint(filepath, tensors, meta, self.is_global_zero)

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if path.is_file():  # an ordinary (unsharded) Lightning checkpoint: load_model_state_dict shards it
            return weights_or_full(path, read_checkpoint_file(path, weights_only),
                                   self.lightning_module.trainer.state.fn == TrainerFn.FITTING)
        template = {"state_dict": self.lightning_module.state_dict(),
                    "fused_optimizer": self.fused_optimizer.state_dict()}
        # torch.distributed.checkpoint plans the reads by chunk: the saved shards need not match this run's (another
        # world size, another sharding plan), each rank reads the pieces of its own shards.
        meta = load_sharded_checkpoint(path, template)
        self.fused_optimizer.load_state_dict(template["fused_optimizer"])
        return {**meta, "state_dict": template["state_dict"]}

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        incoming = checkpoint["state_dict"]
        current = module.state_dict()
        sharded = copy_into_shards(current, incoming)
        already = [k for k, v in incoming.items() if v is current.get(k)]  # loaded in place from shards
        rest = {k: v for k, v in incoming.items() if k not in sharded and k not in already}
        missing, unexpected = module.load_state_dict(rest, strict=False)
        missing = [k for k in missing if k not in sharded and k not in already and k in current]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Loading the checkpoint into {type(module).__name__}: missing keys {missing}, "
                               f"unexpected keys {unexpected}")

    def remove_checkpoint(self, filepath: str | os.PathLike) -> None:
        if self.is_global_zero:
            remove(filepath)

    def unsharded_state_dict(self) -> dict[str, torch.Tensor]:
        """The LightningModule's state with every table whole, on rank zero (other ranks: the rest). Collective."""
        return gather_unsharded(self.lightning_module.state_dict())

    def export_unsharded_checkpoint(self, filepath: str | os.PathLike) -> None:
        """Write an ordinary Lightning checkpoint whose ``state_dict`` holds full (unsharded) tables.

        It loads with ``YourModule.load_from_checkpoint(filepath)`` (no TorchRec sharding needed) and predicts
        as the sharded model does. A collective: call it on every rank; rank zero writes.
        """
        module = self.lightning_module
        state = self.unsharded_state_dict()
        if self.is_global_zero:
            checkpoint = {"state_dict": state, "pytorch-lightning_version": pl.__version__,
                          module.CHECKPOINT_HYPER_PARAMS_KEY: dict(module.hparams)}
            Path(filepath).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(filepath) + ".tmp")
            torch.save(checkpoint, tmp)
            os.replace(tmp, filepath)
        self.barrier("export_unsharded_checkpoint")
