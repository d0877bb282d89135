"""Planner settings from a recipe: per-table constraints, the topology, replaceable planner stages, saved plans.

Everything TorchRec's ``EmbeddingShardingPlanner`` takes, in plain YAML types: a table's sharding types,
compute kernels and UVM-cache parameters (``ParameterConstraints``), the devices' memory (``Topology``), and
planner stages (enumerator, storage reservation, proposer, partitioner, performance model) by class path. A plan
saved to a file is reused unchanged by a later run with the same tables and world size.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.types import CacheAlgorithm, CacheParams, CacheStatistics, ShardingPlan

__all__ = ["build_constraints", "build_planner", "build_topology", "load_plan", "save_plan"]

_CONSTRAINT_KEYS = {"sharding_types", "compute_kernels", "cache_load_factor", "cache_algorithm", "min_partition",
                    "enforce_hbm", "stochastic_rounding", "cache_statistics"}


def _cache(load_factor: float | None, algorithm: str | None, stats: Any = None) -> CacheParams | None:
    if stats is not None:  # a CacheStatistics, or its class_path spec (lightning_skew.tiers.ProfileCacheStatistics)
        stats = instantiate(stats)
        if not isinstance(stats, CacheStatistics):
            raise ValueError(f"cache_statistics must be a torchrec CacheStatistics (e.g. "
                             f"lightning_skew.tiers.ProfileCacheStatistics), got {type(stats).__name__}")
    if load_factor is None and algorithm is None and stats is None:
        return None
    if load_factor is not None and not 0 < load_factor <= 1:
        raise ValueError(f"cache_load_factor must lie in (0, 1], got {load_factor}")
    choice = None
    if algorithm is not None:
        names = {a.name.lower(): a for a in CacheAlgorithm}
        if algorithm.lower() not in names:
            raise ValueError(f"cache_algorithm must be one of {sorted(names)}, got {algorithm!r}")
        choice = names[algorithm.lower()]
    return CacheParams(algorithm=choice, load_factor=load_factor, stats=stats)


def build_constraints(tables: list[str], kernels: dict[str, str], sharding_types: list[str],
                      cache_load_factor: float | None, per_table: dict[str, dict[str, Any]] | None) -> \
        dict[str, ParameterConstraints]:
    """One ``ParameterConstraints`` per table: the strategy's defaults, overridden by ``per_table[name]``
    (keys: sharding_types, compute_kernels, cache_load_factor, cache_algorithm, min_partition, enforce_hbm,
    stochastic_rounding, cache_statistics: a ``CacheStatistics`` or its class_path spec, which TorchRec's
    ``EmbeddingOffloadScaleupProposer`` sizes UVM caches by). A name that is no table, or an unknown key, is an
    error that lists the choices."""
    per_table = dict(per_table or {})
    unknown = sorted(set(per_table) - set(tables))
    if unknown:
        raise ValueError(f"table_constraints name tables the model does not have: {unknown}; its tables: {tables}")
    constraints = {}
    for name in tables:
        given = dict(per_table.get(name, {}))
        bad = sorted(set(given) - _CONSTRAINT_KEYS)
        if bad:
            raise ValueError(f"table_constraints[{name!r}]: unknown keys {bad}; allowed: {sorted(_CONSTRAINT_KEYS)}")
        compute_kernels = list(given.pop("compute_kernels", [kernels[name]]))
        caching = any(k == "fused_uvm_caching" for k in compute_kernels)
        cache = _cache(given.pop("cache_load_factor", cache_load_factor if caching else None),
                       given.pop("cache_algorithm", None), given.pop("cache_statistics", None))
        constraints[name] = ParameterConstraints(
            sharding_types=list(given.pop("sharding_types", sharding_types)), compute_kernels=compute_kernels,
            cache_params=cache, **given)
    return constraints


def build_topology(world_size: int, local_world_size: int, device: torch.device,
                   settings: dict[str, Any] | None) -> Topology:
    """TorchRec's ``Topology`` for this job, with ``settings`` (e.g. ``hbm_cap``, ``ddr_cap`` in bytes, bandwidths)."""
    settings = dict(settings or {})
    for fixed in ("world_size", "local_world_size", "compute_device"):
        if fixed in settings:
            raise ValueError(f"topology: {fixed!r} comes from the Trainer, not from the recipe")
    try:
        return Topology(world_size=world_size, local_world_size=local_world_size, compute_device=device.type,
                        **settings)
    except TypeError as error:
        allowed = [p for p in inspect.signature(Topology.__init__).parameters if p not in ("self", "world_size",
                                                                                          "local_world_size",
                                                                                          "compute_device")]
        raise ValueError(f"topology: {error}; allowed settings: {allowed}") from None


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{path!r} is not a class path (module.Class)")
    return getattr(importlib.import_module(module), name)


def instantiate(spec: Any, **context: Any) -> Any:
    """An object from ``{"class_path": ..., "init_args": {...}}`` (nested specs too); the ``context`` arguments
    (``topology``, ``constraints``, ``batch_size``) are passed where the class takes them. Other values as they are."""
    if isinstance(spec, dict) and "class_path" in spec:
        cls = _import(spec["class_path"])
        args = {k: instantiate(v, **context) for k, v in dict(spec.get("init_args") or {}).items()}
        accepted = inspect.signature(cls).parameters
        for name, value in context.items():
            if name in accepted and name not in args:
                args[name] = value
        return cls(**args)
    if isinstance(spec, list):
        return [instantiate(item, **context) for item in spec]
    return spec


def build_planner(planner: dict[str, Any] | None, topology: Topology,
                  constraints: dict[str, ParameterConstraints]) -> Any:
    """The planner: TorchRec's ``EmbeddingShardingPlanner`` unless ``planner`` names another class; its stages
    (``enumerator``, ``storage_reservation``, ``proposer``, ``partitioner``, ``performance_model``, ``stats``) by
    class path in ``planner["init_args"]``, each built with this job's topology and constraints."""
    spec = dict(planner or {"class_path": "torchrec.distributed.planner.EmbeddingShardingPlanner"})
    spec.setdefault("class_path", "torchrec.distributed.planner.EmbeddingShardingPlanner")
    return instantiate(spec, topology=topology, constraints=constraints)


def save_plan(plan: ShardingPlan, path: str | Path, world_size: int) -> None:
    """Write a plan that a later run can reuse (``plan_path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"plan": plan, "world_size": world_size}, tmp)
    tmp.replace(path)


def load_plan(path: str | Path, tables: list[str], world_size: int) -> ShardingPlan:
    """A saved plan, checked against this job's tables and world size (a clear error naming the file)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        plan = saved["plan"]
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path} is not a sharding plan written by lightning-skew ({error})") from None
    if saved.get("world_size") != world_size:
        raise ValueError(f"{path} plans {saved.get('world_size')} rank(s), this run has {world_size}; delete it or "
                         "give another plan_path to plan anew")
    planned = sorted(t for module_plan in plan.plan.values() for t in module_plan)
    if planned != sorted(tables):
        raise ValueError(f"{path} plans the tables {planned}, the model has {sorted(tables)}")
    return plan
