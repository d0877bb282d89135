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
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer

from lightning_skew.torchrec.atomic import remove
from lightning_skew.torchrec.checkpoint import (
    copy_into_shards,
    gather_unsharded,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from lightning_skew.torchrec.sharding import DEFAULT_SHARDING_TYPES, plan_rows, shard_module

__all__ = ["TorchRecStrategy"]

SHARDED_FORMAT = "sharded-v1"

def weights_or_full(path: Path, checkpoint: dict[str, Any], fitting: bool = True) -> dict[str, Any]:
    """A checkpoint file as Lightning restores it. An export (weights only, no optimizer state, as
    :meth:`TorchRecStrategy.export_unsharded_checkpoint` writes) starts a new run from its weights: the
    embedding and dense optimizers and the loops start fresh, which is said once."""
    if "optimizer_states" in checkpoint:
        return checkpoint
    if fitting:
        rank_zero_warn(f"{path} holds weights only (an export): the run starts from these weights at epoch 0, with "
                       "fresh optimizer state (embedding and dense)")
    return {**checkpoint, "optimizer_states": [], "lr_schedulers": []}


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
        process_group_backend: ``gloo`` or ``nccl``; default by device.
        timeout: collective timeout.
        start_method: how Lightning starts processes (see ``DDPStrategy``).

    .. note::
        Embedding rows are updated inside the backward pass (TorchRec's fused optimizers), so gradient
        accumulation and gradient clipping cannot apply to them: both raise an error at setup. Dense LR
        schedules reach the embedding optimizer: its learning rate is scaled by the ratio of the first dense
        param group's current to initial learning rate, before every training step.

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
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
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
        self.embedding_optimizer = embedding_optimizer
        self.embedding_lr = embedding_lr
        self.table_constraints = table_constraints
        self.topology = topology
        self.planner = planner
        self.plan_path = plan_path
        self._embedding_base_lrs: list[float] = []
        self._lr_scale: float | None = None  # None: push the learning rate at the next step

    # ----------------------------------------------------------------------------------------- set-up

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
        self.model = self._shard(self.lightning_module)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._embedding_base_lrs = [group["lr"] for group in self.fused_optimizer.param_groups]
            self._lr_scale = None
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

    def _shard(self, module: pl.LightningModule) -> DistributedModelParallel:
        return shard_module(module, self.root_device, **self._shard_options())

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
        return super().training_step(*args, **kwargs)

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
            return weights_or_full(path, torch.load(path, map_location="cpu", weights_only=bool(weights_only)),
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
