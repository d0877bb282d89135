"""Sharding a module's TorchRec embeddings with DistributedModelParallel: the plan and the wrap, as functions."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from lightning_skew.core.tables import table_configs
from lightning_skew.torchrec.checkpoint import copy_into_shards
from lightning_skew.torchrec.optim import (
    CUDA_ONLY_EMBEDDING_OPTIMIZERS,
    embedding_modules,
    embedding_optimizer_names,
    fuse_embedding_optimizer,
    has_fused_optimizer,
)
from lightning_skew.torchrec.planning import (
    build_constraints,
    build_planner,
    build_topology,
    load_plan,
    save_plan,
)

__all__ = ["DEFAULT_SHARDING_TYPES", "NARROW_TABLE_CONSTRAINTS", "fbgemm_has_cuda", "plan_rows", "plan_sharding",
           "shard_module", "with_narrow_table_defaults"]

# Sharding types TorchRec offers on every device. Row-wise sharding and the UVM kernels need CUDA;
# data-parallel tables would keep their optimizer state outside the fused optimizer.
DEFAULT_SHARDING_TYPES = ["table_wise", "column_wise", "table_column_wise"]
_DMP_ATTR = "_lightning_skew_dmp"


def plan_sharding(module: nn.Module, env: ShardingEnv, device: torch.device, sharding_types: list[str],
                  compute_kernel: str, local_world_size: int, kernel_by_table: dict[str, str] | None = None,
                  cache_load_factor: float | None = None, table_constraints: dict[str, dict[str, Any]] | None = None,
                  topology: dict[str, Any] | None = None, planner: dict[str, Any] | None = None,
                  plan_path: str | None = None) -> ShardingPlan:
    """TorchRec's planner restricted to ``sharding_types`` and ``compute_kernel`` for every table.

    ``kernel_by_table`` overrides the kernel of some tables; ``cache_load_factor`` sizes the GPU cache of
    ``fused_uvm_caching`` tables (the share of a table's rows cached); ``table_constraints``, ``topology`` and
    ``planner`` are the recipe's planner settings (:mod:`~lightning_skew.torchrec.planning`). Planned on rank 0
    and broadcast, so every rank shards alike. With ``plan_path``, a plan saved there is reused unchanged, and a
    new plan is saved there.
    """
    tables = [cfg.name for _, m in embedding_modules(module) for cfg in table_configs(m)]
    table_constraints = with_narrow_table_defaults(module, table_constraints)
    if plan_path is not None and Path(plan_path).is_file():
        rank_zero_info(f"TorchRec sharding plan: reusing {plan_path}")
        return load_plan(plan_path, tables, env.world_size)
    kernels = {name: (kernel_by_table or {}).get(name, compute_kernel) for name in tables}
    constraints = build_constraints(tables, kernels, sharding_types, cache_load_factor, table_constraints)
    job = build_topology(env.world_size, min(local_world_size, env.world_size), device, topology)
    plan = build_planner(planner, job, constraints).collective_plan(module, None, env.process_group)
    if plan_path is not None and env.rank == 0:
        save_plan(plan, plan_path, env.world_size)
    return plan


#: How a table whose width FBGEMM's batched kernels cannot take (not a multiple of 4, e.g. the dimension-1
#: first-order tables of FM, DeepFM and Wide & Deep) is sharded unless its constraints say otherwise: replicated
#: on every rank (data-parallel, gradients all-reduced) with TorchRec's dense kernel. Such tables are small (one
#: float per row), so a copy on every rank costs little.
NARROW_TABLE_CONSTRAINTS: dict[str, list[str]] = {"sharding_types": ["data_parallel"], "compute_kernels": ["dense"]}


def with_narrow_table_defaults(module: nn.Module, table_constraints: dict[str, dict[str, Any]] | None) -> \
        dict[str, dict[str, Any]]:
    """``table_constraints`` with :data:`NARROW_TABLE_CONSTRAINTS` under those of every table of ``module`` whose
    embedding dimension is not a multiple of 4 (a table's own constraints win, key by key)."""
    constraints = dict(table_constraints or {})
    for _, m in embedding_modules(module):
        for cfg in table_configs(m):
            if cfg.embedding_dim % 4:
                constraints[cfg.name] = {**NARROW_TABLE_CONSTRAINTS, **constraints.get(cfg.name, {})}
    return constraints


def plan_rows(plan: ShardingPlan) -> list[list[str]]:
    """The sharding plan as table rows: module, table, sharding type, compute kernel, ranks."""
    rows = []
    for module_path, module_plan in sorted(plan.plan.items()):
        for table, sharding in sorted(module_plan.items()):
            ranks = ",".join(str(r) for r in (sharding.ranks or []))
            rows.append([module_path, table, sharding.sharding_type, sharding.compute_kernel, ranks])
    return rows


def shard_module(module: nn.Module, device: torch.device, sharding_types: list[str] | None = None,
                 compute_kernel: str = "fused", embedding_optimizer: str | None = None, embedding_lr: float = 0.01,
                 local_world_size: int | None = None, kernel_by_table: dict[str, str] | None = None,
                 cache_load_factor: float | None = None, **planner_settings: Any) -> DistributedModelParallel:
    """Wrap ``module`` in ``DistributedModelParallel`` over the default process group, sharding it in place.

    The module's own initial embedding weights are copied into the shards (DMP alone re-initializes them), so
    a run starts from the same weights whatever the world size or plan. Sharding the same module object again
    returns the first wrapper.

    Args:
        module: any module holding TorchRec embedding collections.
        device: the compute device.
        sharding_types: allowed sharding types (default :data:`DEFAULT_SHARDING_TYPES`).
        compute_kernel: TorchRec compute kernel for every table.
        embedding_optimizer: fused into embeddings that carry no optimizer yet; ``None`` requires one.
        embedding_lr: its learning rate.
        local_world_size: processes per host (default: the world size).
        kernel_by_table: compute kernels of some tables, overriding ``compute_kernel``.
        cache_load_factor: share of rows that ``fused_uvm_caching`` tables cache on the GPU.
        planner_settings: ``table_constraints``, ``topology``, ``planner``, ``plan_path`` (see :func:`plan_sharding`).
    """
    existing = getattr(module, _DMP_ATTR, None)
    if existing is not None:  # a second fit/validate/test with the same module object
        return existing
    if not any(True for _ in embedding_modules(module)):
        raise MisconfigurationException(
            f"{type(module).__name__} holds no TorchRec EmbeddingBagCollection; TorchRecStrategy has nothing to "
            "shard. Use strategy='ddp' for models without TorchRec embeddings.")
    if not has_fused_optimizer(module):
        if embedding_optimizer is None:
            raise MisconfigurationException(
                f"The embeddings of {type(module).__name__} have no optimizer. Call lightning_skew.torchrec.optim."
                "fuse_embedding_optimizer(self, ...) in the module, or give TorchRecStrategy(embedding_optimizer="
                "'rowwise_adagrad', embedding_lr=...).")
        fuse_embedding_optimizer(module, embedding_optimizer, embedding_lr)
    if device.type == "cuda" and not fbgemm_has_cuda():
        raise MisconfigurationException(
            "TorchRec's sharded embeddings run on CUDA only with FBGEMM's CUDA build (the fbgemm-gpu package), and "
            "this one has no CUDA kernels (fbgemm-gpu-cpu?). Install fbgemm-gpu for your CUDA version; or, for hot "
            "rows on the GPU and cold rows in host memory without it, place the module with lightning_skew."
            "strategies.plain_hot_cold.place_hot_cold and train it with strategy='auto' on one GPU.")
    cuda_only = embedding_optimizer_names(module) & CUDA_ONLY_EMBEDDING_OPTIMIZERS
    if cuda_only and device.type != "cuda":
        raise MisconfigurationException(
            f"The embedding optimizer {sorted(cuda_only)} runs in TorchRec's fused kernels only on CUDA; FBGEMM's "
            "CPU kernels offer sgd, adagrad and rowwise_adagrad. Choose one of those on CPU.")
    prefixes = tuple(name + "." for name, _ in embedding_modules(module))
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()
               if isinstance(v, torch.Tensor) and not v.is_meta and k.startswith(prefixes)}
    _quiet_torchrec_logs()
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    local_world_size = local_world_size or env.world_size
    # TorchRec reads the local world size from the environment (and warns when it is absent).
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world_size))
    plan = plan_sharding(module, env, device, list(sharding_types or DEFAULT_SHARDING_TYPES), compute_kernel,
                         int(os.environ["LOCAL_WORLD_SIZE"]), kernel_by_table, cache_load_factor, **planner_settings)
    dmp = DistributedModelParallel(module, env=env, device=device, plan=plan)
    live = module.state_dict()
    copy_into_shards(live, initial)
    # Replicated (data_parallel) tables are plain tensors sharing the live weights: DMP re-initialized them too.
    with torch.no_grad():
        for key, value in initial.items():
            target = live.get(key)
            if isinstance(target, torch.Tensor) and not isinstance(target, ShardedTensor) \
                    and target.shape == value.shape:
                target.copy_(value.to(target.device))
    object.__setattr__(module, _DMP_ATTR, dmp)
    return dmp


def fbgemm_has_cuda() -> bool:
    """Whether FBGEMM's operators run on CUDA tensors here (its CUDA build is installed and a GPU is present)."""
    if not torch.cuda.is_available():
        return False
    try:
        torch.ops.fbgemm.asynchronous_complete_cumsum(torch.zeros(1, dtype=torch.int64, device="cuda"))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def _quiet_torchrec_logs() -> None:
    # The planner and DMP log warnings on every CPU run that are about TorchRec internals, not user setup.
    for name in ("torchrec", "torchrec.distributed", "torchrec.distributed.planner",
                 "torchrec.distributed.planner.types", "torchrec.distributed.planner.storage_reservations",
                 "torchrec.distributed.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cache_load_factor_for(module: nn.Module, budget_bytes: int, optimizer: str | None = None) -> float:
    """The UVM cache load factor whose GPU cache holds ``budget_bytes`` of ``module``'s rows with their optimizer
    state: ``budget / (all rows x bytes per row)``, at most 1.

    Bytes per row are those every hot-set source is cut by
    (:func:`~lightning_skew.profile.row_sizes.model_table_bytes`: weights plus the state of the embeddings'
    optimizer, the one fused into them, else ``optimizer``, else row-wise Adagrad's), so a cache and a hot shard of
    one budget hold the same bytes.
    """
    from lightning_skew.core.tables import table_sizes
    from lightning_skew.profile.budget import row_bytes
    from lightning_skew.profile.row_sizes import model_table_bytes

    if budget_bytes < 1:
        raise ValueError(f"the cache budget must be positive, got {budget_bytes} bytes")
    try:
        total = sum(t.num_rows * t.bytes_per_row for t in model_table_bytes(module, optimizer or "rowwise_adagrad"))
    except ValueError:  # an optimizer whose state size is not known: weights and one state element per row
        total = sum(t.num_rows * row_bytes(t.dim, t.bytes_per_element) for t in table_sizes(module))
    if total == 0:
        raise ValueError(f"{type(module).__name__} has no embedding tables to cache")
    return min(1.0, budget_bytes / total)

