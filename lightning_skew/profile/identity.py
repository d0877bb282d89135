"""What data a profile describes: a DataModule's description, its fingerprint, and how two descriptions differ."""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["LOADER_ONLY_ARGUMENTS", "check_tables", "describe_datamodule", "description_difference",
           "fingerprint"]

# DataModule arguments that change how data is loaded, not which data: left out of a dataset description.
LOADER_ONLY_ARGUMENTS = frozenset({"batch_size", "num_workers", "pin_memory", "persistent_workers", "rank",
                                   "world_size"})


# The tables' shapes: checked on their own (:func:`check_tables`), so left out of a description.
TABLE_ARGUMENTS = frozenset({"num_embeddings_per_feature", "sparse_feature_names", "dense_in_features"})


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def describe_datamodule(datamodule: Any) -> dict[str, Any]:
    """What data a DataModule delivers, as a JSON-able dict: its class and the arguments that pick the data.

    Reads ``hparams`` (``save_hyperparameters``); a DataModule without them is described by its public
    attributes of plain types. Arguments in ``LOADER_ONLY_ARGUMENTS`` (batch size, workers) are left
    out: they change how the data is loaded, not which data it is; so are the tables' shapes (``TABLE_ARGUMENTS``),
    which a profile checks on their own. A DataModule that LightningCLI built inside a wrapper is described by its
    own block of the configuration, not the wrapper's.
    """
    cls = type(datamodule)
    source = _own_configuration(cls, dict(getattr(datamodule, "hparams", {}) or {}))
    if not source:
        source = {k: v for k, v in vars(datamodule).items() if not k.startswith("_") and _plain(v)}
    arguments = {k: v for k, v in source.items()
                 if not k.startswith("_") and k not in LOADER_ONLY_ARGUMENTS | TABLE_ARGUMENTS and _plain(v)}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "arguments": arguments}


def _names_class(class_path: Any, cls: type) -> bool:
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) is cls
    except ImportError:
        return False


def _nested_configuration(value: Any, cls: type) -> dict[str, Any] | None:
    """The ``init_args`` (and ``dict_kwargs``) of the first ``{"class_path": <cls>, ...}`` inside ``value``."""
    if isinstance(value, dict):
        if _names_class(value.get("class_path"), cls):
            return {**dict(value.get("init_args") or {}), **dict(value.get("dict_kwargs") or {})}
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _nested_configuration(item, cls)
            if found is not None:
                return found
    return None


def _own_configuration(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """A DataModule's own arguments. LightningCLI hands the configuration of the DataModule it builds (``data``) to
    every DataModule built inside it as well, so a DataModule inside a wrapper (``PopularityDataModule``) records the
    wrapper's configuration, hot-set source and all; its own arguments are the nested block that names its class."""
    given = hparams.get("_class_path")
    if given is None or _names_class(given, cls):
        return hparams
    nested = _nested_configuration(hparams, cls)
    return hparams if nested is None else nested


def fingerprint(description: dict[str, Any]) -> str:
    """A short hash of a description: equal for equal descriptions, whatever the order of their keys."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def description_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """How the profile's description ``saved`` and the ``current`` one differ, for an error message."""
    if saved.get("class") != current.get("class"):
        return f"class {saved.get('class')} (profile) vs {current.get('class')} (here)"
    left, right = saved.get("arguments", {}), current.get("arguments", {})
    parts = [f"{key}={left.get(key, '<unset>')!r} (profile) vs {right.get(key, '<unset>')!r} (here)"
             for key in sorted(set(left) | set(right)) if left.get(key) != right.get(key)]
    return "; ".join(parts) or "descriptions differ"


def check_tables(profile_names: Sequence[str], profile_rows: Sequence[int], feature_names: Sequence[str],
                 num_rows: Sequence[int], where: str) -> None:
    """Raise ``ValueError`` (starting with ``where``) unless the profile's tables are ``feature_names``, ``num_rows``."""
    profile_names = list(profile_names)
    if list(feature_names) != profile_names:
        missing = [n for n in feature_names if n not in profile_names]
        extra = [n for n in profile_names if n not in feature_names]
        detail = (f"features missing from the profile: {missing}; features only in the profile: {extra}"
                  if missing or extra else "the same features in another order")
        raise ValueError(f"{where} describes other tables: {detail} (profile: {profile_names}, "
                         f"here: {list(feature_names)})")
    differ = [f"{name!r} has {mine} rows in the profile, {theirs} here"
              for name, mine, theirs in zip(profile_names, profile_rows, num_rows, strict=True)
              if int(mine) != int(theirs)]
    if differ:
        raise ValueError(f"{where} describes other table sizes: " + "; ".join(differ))
