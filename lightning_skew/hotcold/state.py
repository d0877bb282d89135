"""State of a module with hot/cold collections, moved to and from the dataset's own ID space.

Inside the module a table ``t`` of a collection at ``prefix`` lives as ``prefix.hot.embedding_bags.t__hot``
and ``prefix.cold.embedding_bags.t__cold``, or both under ``prefix.parts`` when the collection fuses its parts
(see :class:`HotColdEmbeddingBagCollection`). Checkpoints and
exports name it as the original collection did, ``prefix.embedding_bags.t``, with its rows in row-ID order,
so they load into a plain :class:`~lightning_skew.TorchRecStrategy` run, an unsharded module, or a
hot/cold run with another placement. The same holds for the fused optimizer's per-row state, flattened here
as ``"<parameter key>::<state name>"`` (TorchRec names a table's state ``"<table>.<state>"``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_skew.hotcold.collection import (
    COLD_SUFFIX,
    HOT_SUFFIX,
    HotColdEmbeddingBagCollection,
)
from lightning_skew.hotcold.placement import COLD, HOT
from lightning_skew.hotcold.router import STACKED, STACKED_SUFFIX

__all__ = ["flatten_optimizer_state", "from_original_ids", "hot_cold_collections", "inner_weight_key",
           "inner_weight_keys", "original_weight_key", "to_original_ids", "unflatten_optimizer_state"]

SEPARATOR = "::"
SUFFIXES = {HOT: HOT_SUFFIX, COLD: COLD_SUFFIX, STACKED: STACKED_SUFFIX}


def hot_cold_collections(module: nn.Module) -> dict[str, HotColdEmbeddingBagCollection]:
    """Every :class:`HotColdEmbeddingBagCollection` inside ``module``, by its path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, HotColdEmbeddingBagCollection)}


def flatten_optimizer_state(state: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{param key: {state name: value}}`` as ``{"param key::state name": value}``."""
    return {f"{param}{SEPARATOR}{name}": value for param, entries in state.items() for name, value in entries.items()}


def unflatten_optimizer_state(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        param, name = key.split(SEPARATOR, 1)
        out.setdefault(param, {})[name] = value
    return out


def inner_weight_key(path: str, holder: str, inner_table: str) -> str:
    """State key of an inner table's weight: ``<path>.<holder>.embedding_bags.<inner table>.weight``, where
    ``holder`` is the collection's attribute that holds the table
    (:meth:`~lightning_skew.hotcold.collection.HotColdEmbeddingBagCollection.part_attribute`)."""
    prefix = f"{path}." if path else ""
    return f"{prefix}{holder}.embedding_bags.{inner_table}.weight"


def original_weight_key(path: str, table: str) -> str:
    """State key of an original table's weight: ``<path>.embedding_bags.<table>.weight``."""
    prefix = f"{path}." if path else ""
    return f"{prefix}embedding_bags.{table}.weight"


def _inner_keys(collections: dict[str, HotColdEmbeddingBagCollection]) -> dict[str, tuple[str, str, str, str]]:
    """Inner weight key -> (collection path, original table, part, original weight key)."""
    return {inner_weight_key(path, collection.part_attribute(part), inner):
            (path, table, part, original_weight_key(path, table))
            for path, collection in collections.items()
            for inner, (table, part) in collection.inner_tables().items()}


def inner_weight_keys(collections: dict[str, HotColdEmbeddingBagCollection]) -> set[str]:
    """State keys of every inner table's weight."""
    return set(_inner_keys(collections))


def _parse(key: str, inner_keys: dict[str, tuple[str, str, str, str]]) -> tuple[str, str, str, str] | None:
    """For an inner key (weight or flattened optimizer state): (path, table, part, original key)."""
    param, _, state = key.partition(SEPARATOR)
    found = inner_keys.get(param)
    if found is None:
        return None
    path, table, part, original = found
    if state:
        inner_table = table + SUFFIXES[part]
        if not state.startswith(inner_table + "."):
            raise KeyError(f"unexpected optimizer state name {state!r} for table {inner_table!r}")
        original = f"{original}{SEPARATOR}{table}{state[len(inner_table):]}"
    return path, table, part, original


def to_original_ids(flat: dict[str, Tensor], collections: dict[str, HotColdEmbeddingBagCollection]
                    ) -> dict[str, Tensor]:
    """Replace the hot and cold parts of every table in ``flat`` by the whole table in row-ID order.

    ``flat`` holds full (unsharded) tensors: model state keys and/or flattened optimizer state. Other
    entries pass through unchanged. A table whose parts are absent (another rank's) is left out.
    """
    inner_keys = _inner_keys(collections)
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        parsed = _parse(key, inner_keys)
        if parsed is None:
            out[key] = value
            continue
        path, table, part, original = parsed
        entry = parts.setdefault(original, {"path": path, "table": table, HOT: None, COLD: None, STACKED: None})
        entry[part] = value
    for original, entry in parts.items():
        collection = collections[entry["path"]]
        out[original] = collection.merge_table(entry["table"], entry[HOT], entry[COLD], entry[STACKED])
    return out


def from_original_ids(flat: dict[str, Tensor], collections: dict[str, HotColdEmbeddingBagCollection]
                      ) -> dict[str, Tensor]:
    """Inverse of :func:`to_original_ids`: whole tables in ``flat`` become their hot and cold parts under the
    collections' current placements. Other entries pass through unchanged."""
    originals = {original_weight_key(path, t.spec.name): (path, t.spec.name)
                 for path, collection in collections.items() for t in collection.placement.tables}
    out: dict[str, Tensor] = {}
    for key, value in flat.items():
        param, _, state = key.partition(SEPARATOR)
        found = originals.get(param)
        if found is None:
            out[key] = value
            continue
        path, table = found
        if state and not state.startswith(table + "."):
            raise KeyError(f"unexpected optimizer state name {state!r} for table {table!r}")
        for inner, rows in collections[path].split_table(table, value).items():
            part = collections[path].inner_tables()[inner][1]
            inner_key = inner_weight_key(path, collections[path].part_attribute(part), inner)
            if state:
                inner_key = f"{inner_key}{SEPARATOR}{inner}{state[len(table):]}"
            out[inner_key] = rows
    return out
