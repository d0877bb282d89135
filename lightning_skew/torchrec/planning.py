"""Planner settings from a recipe: per-table constraints, the topology, replaceable planner stages, saved plans.

Everything TorchRec's ``EmbeddingShardingPlanner`` takes, in plain YAML types: a table's sharding types,
compute kernels and UVM-cache parameters (``ParameterConstraints``), the devices' memory (``Topology``), and
planner stages (enumerator, storage reservation, proposer, partitioner, performance model) by class path. A plan
saved to a file (JSON: data, nothing to run) is reused unchanged by a later run with the same tables and world size.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.types import (
    BoundsCheckMode,
    CacheAlgorithm,
    CacheParams,
    CacheStatistics,
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
)
from torchrec.types import DataType

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


PLAN_FORMAT = "lightning-skew sharding plan"

# Enumerations a plan holds, by field: written by name.
_ENUMS = {"algorithm": CacheAlgorithm, "precision": DataType, "bounds_check_mode": BoundsCheckMode,
          "output_dtype": DataType}


def _name(value: Any) -> Any:
    return value.name if isinstance(value, Enum) else value


def _encode_sharding(where: str, sharding: ParameterSharding) -> dict[str, Any]:
    if sharding.key_value_params is not None:
        raise ValueError(f"{where}: a plan with key-value (SSD) parameters cannot be saved as plan_path")
    shards = None
    if sharding.sharding_spec is not None:
        if not isinstance(sharding.sharding_spec, EnumerableShardingSpec):
            raise ValueError(f"{where}: a {type(sharding.sharding_spec).__name__} cannot be saved as plan_path")
        shards = [{"offsets": list(m.shard_offsets), "sizes": list(m.shard_sizes), "placement": str(m.placement)}
                  for m in sharding.sharding_spec.shards]
    cache = None
    if sharding.cache_params is not None:
        params = sharding.cache_params
        if params.multipass_prefetch_config is not None:
            raise ValueError(f"{where}: a multipass prefetch configuration cannot be saved as plan_path")
        # ``stats`` feed the planner only; the plan does not need them.
        cache = {f.name: _name(getattr(params, f.name)) for f in dataclasses.fields(params)
                 if f.name not in ("stats", "multipass_prefetch_config")}
    return {"sharding_type": sharding.sharding_type, "compute_kernel": sharding.compute_kernel,
            "ranks": None if sharding.ranks is None else list(sharding.ranks), "shards": shards,
            "cache_params": cache, "enforce_hbm": sharding.enforce_hbm,
            "stochastic_rounding": sharding.stochastic_rounding,
            "bounds_check_mode": _name(sharding.bounds_check_mode), "output_dtype": _name(sharding.output_dtype)}


def _enum(field: str, value: Any) -> Any:
    return None if value is None else _ENUMS[field][value]


def _decode_sharding(entry: dict[str, Any]) -> ParameterSharding:
    shards = entry["shards"]
    spec = None if shards is None else EnumerableShardingSpec(
        [ShardMetadata(shard_offsets=list(s["offsets"]), shard_sizes=list(s["sizes"]), placement=str(s["placement"]))
         for s in shards])
    cache = entry["cache_params"]
    if cache is not None:
        cache = CacheParams(**{k: _enum(k, v) if k in _ENUMS else v for k, v in cache.items()})
    return ParameterSharding(
        sharding_type=str(entry["sharding_type"]), compute_kernel=str(entry["compute_kernel"]),
        ranks=None if entry["ranks"] is None else [int(r) for r in entry["ranks"]], sharding_spec=spec,
        cache_params=cache, enforce_hbm=entry["enforce_hbm"], stochastic_rounding=entry["stochastic_rounding"],
        bounds_check_mode=_enum("bounds_check_mode", entry["bounds_check_mode"]),
        output_dtype=_enum("output_dtype", entry["output_dtype"]))


def save_plan(plan: ShardingPlan, path: str | Path, world_size: int) -> None:
    """Write a plan that a later run can reuse (``plan_path``), as JSON: data only, readable and diffable."""
    path = Path(path)
    modules: dict[str, dict[str, Any]] = {}
    for module_path, module_plan in sorted(plan.plan.items()):
        if not isinstance(module_plan, EmbeddingModuleShardingPlan):
            raise ValueError(f"plan_path {path}: the plan of {module_path!r} is a {type(module_plan).__name__}; only "
                             "embedding module plans can be saved")
        modules[module_path] = {table: _encode_sharding(f"plan_path {path}, table {table!r}", sharding)
                                for table, sharding in sorted(module_plan.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": PLAN_FORMAT, "version": 1, "world_size": world_size, "plan": modules},
                              indent=1))
    tmp.replace(path)


def load_plan(path: str | Path, tables: list[str], world_size: int) -> ShardingPlan:
    """A saved plan, checked against this job's tables and world size (a clear error naming the file).

    The file is JSON and read as data: nothing in it is run (plans written as pickles by older versions are
    refused; delete them to plan anew)."""
    try:
        saved = json.loads(Path(path).read_text())
        if not isinstance(saved, dict) or saved.get("format") != PLAN_FORMAT:
            raise ValueError(f"no {PLAN_FORMAT!r} format field")
        plan = ShardingPlan({module_path: EmbeddingModuleShardingPlan(
            {table: _decode_sharding(entry) for table, entry in module_plan.items()})
            for module_path, module_plan in saved["plan"].items()})
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path} is not a sharding plan written by lightning-skew ({type(error).__name__}: "
                         f"{str(error)[:200]}); plans are JSON files (older versions wrote pickles, which are no "
                         "longer read): delete it or give another plan_path to plan anew") from None
    if saved.get("world_size") != world_size:
        raise ValueError(f"{path} plans {saved.get('world_size')} rank(s), this run has {world_size}; delete it or "
                         "give another plan_path to plan anew")
    planned = sorted(t for module_plan in plan.plan.values() for t in module_plan)
    if planned != sorted(tables):
        raise ValueError(f"{path} plans the tables {planned}, the model has {sorted(tables)}")
    return plan
