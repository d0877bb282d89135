"""Finding a model's embedding tables, plain, sharded by TorchRec, or split hot/cold, and reading their rows.

Every part that looks at tables (the optimizer set-up, sharding, placement, stale skipping) finds them here.
A table is seen in the dataset's row-ID space whatever its layout: a module that re-lays its tables out
(the hot/cold collection) describes them itself through ``watched_tables()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

__all__ = ["TablePart", "TableSize", "WatchedTable", "available_memory", "bag_configs", "check_tables_fit_memory",
           "embedding_modules", "is_embedding_module", "table_configs", "table_sizes", "watched_tables",
           "weight_pieces"]


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux ``MemAvailable``), or ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_tables_fit_memory(tables: list[tuple[str, int, int]], bytes_per_value: int = 4,
                            available: int | None = None) -> None:
    """Raise ``MemoryError`` naming the largest table when ``tables`` (``(name, rows, width)``) need more bytes than
    the host has available (``available``, default :func:`available_memory`), before anything is allocated.

    Every table is built whole in host memory first (TorchRec's strategies then copy it into their shards)."""
    available = available_memory() if available is None else available
    if available is None:
        return
    sizes = [(rows * width * bytes_per_value, name, rows, width) for name, rows, width in tables]
    needed = sum(size for size, *_ in sizes)
    if needed <= available:
        return
    size, name, rows, width = max(sizes)
    raise MemoryError(f"the embedding tables need {needed / 1e9:.1f} GB of host memory, {available / 1e9:.1f} GB "
                      f"are available: table {name!r} alone is {rows} rows x {width} x {bytes_per_value} bytes = "
                      f"{size / 1e9:.1f} GB. Give it fewer rows (num_embeddings, max_rows_per_table, hashing into a "
                      "smaller table) or a smaller embedding_dim")


def is_embedding_module(module: nn.Module) -> bool:
    """A plain or sharded TorchRec embedding collection."""
    if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
        return True
    # Sharded collections replace the plain ones in place; import lazily, distributed is heavy.
    from torchrec.distributed.embedding import ShardedEmbeddingCollection
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    return isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection))


def embedding_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every (sharded or plain) TorchRec embedding collection inside ``module``."""
    for name, child in module.named_modules():
        if is_embedding_module(child):
            yield name, child


def bag_configs(module: nn.Module) -> list[EmbeddingBagConfig] | None:
    """The table configs of a plain or sharded ``EmbeddingBagCollection`` (``None`` for other modules).

    TorchRec's ``ShardedEmbeddingBagCollection`` offers no public accessor for its configs (1.8); this is the
    one place that reads its ``_embedding_bag_configs``.
    """
    if hasattr(module, "embedding_bag_configs"):
        return list(module.embedding_bag_configs())
    configs = getattr(module, "_embedding_bag_configs", None)
    return None if configs is None else list(configs)


def table_configs(module: nn.Module) -> list[Any]:
    """The table configs of a plain TorchRec embedding collection (bag or sequence); ``[]`` for other modules."""
    for getter in ("embedding_bag_configs", "embedding_configs"):
        configs = getattr(module, getter, None)
        if callable(configs):
            return list(configs())
    return []


def weight_pieces(weight: Tensor) -> list[tuple[int, int, Tensor]]:
    """``(first_row, first_column, block)`` of every part of a weight this rank holds (live views)."""
    if isinstance(weight, ShardedTensor):
        return [(int(s.metadata.shard_offsets[0]), int(s.metadata.shard_offsets[1]), s.tensor)
                for s in weight.local_shards()]
    return [(0, 0, weight)]


@dataclass(frozen=True)
class TablePart:
    """Where some rows of a table live: ``module.state_dict()[key]``, row ``row_map[r]`` for table row ``r``
    (``-1``: not in this part; ``None``: the part holds every row at its own ID)."""

    module: nn.Module
    key: str
    row_map: Tensor | None = None


@dataclass
class WatchedTable:
    """One embedding table in the dataset's row-ID space, whatever its layout.

    Args:
        name: the table's name.
        features: the features (KeyedJaggedTensor keys) that look it up.
        num_rows, dim: its shape.
        parts: returns the parts that hold its rows now (a re-laid-out table can move rows between them).
    """

    name: str
    features: list[str]
    num_rows: int
    dim: int
    parts: Callable[[], list[TablePart]]

    def read_rows(self, rows: Tensor, states: dict[int, dict[str, Any]] | None = None) -> Tensor:
        """``[len(rows), dim]`` float copies of ``rows`` as far as this rank holds them, ``-inf`` elsewhere (a MAX
        over ranks completes them). ``states`` caches ``module.state_dict()`` by module across calls of one read."""
        states = {} if states is None else states
        out = torch.full((rows.numel(), self.dim), float("-inf"))
        for part in self.parts():
            if id(part.module) not in states:
                states[id(part.module)] = part.module.state_dict()
            target = rows if part.row_map is None else part.row_map[rows]
            for first_row, first_col, block in weight_pieces(states[id(part.module)][part.key]):
                held = (target >= first_row) & (target < first_row + block.shape[0])
                if bool(held.any()):
                    picked = block[(target[held] - first_row).to(block.device)].float().cpu()
                    out[held, first_col:first_col + block.shape[1]] = picked
        return out


def watched_tables(module: nn.Module) -> list[WatchedTable]:
    """Every embedding-bag table of ``module``: plain and sharded collections, modules that describe their
    own tables (``watched_tables()``, such as the hot/cold collection), and plain ``torch.nn.EmbeddingBag`` tables
    whose features can be told (see :func:`table_sizes`). Sequence embeddings are not included."""
    tables: list[WatchedTable] = []
    described: list[str] = []
    collections: list[str] = []  # TorchRec collections, which hold plain bags of their own
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in described):
            continue  # inside a module that described its tables itself
        own = getattr(child, "watched_tables", None)
        if callable(own) and child is not module:
            tables.extend(own())
            described.append(name)
            continue
        if isinstance(child, nn.EmbeddingBag) and not any(name.startswith(p + ".") for p in collections):
            features = _plain_table_features(module, name, child)
            if features:
                part = [TablePart(child, "weight")]
                tables.append(WatchedTable(name, list(features), child.num_embeddings, child.embedding_dim,
                                           lambda part=part: part))
            continue
        if not is_embedding_module(child):
            continue
        collections.append(name)
        configs = bag_configs(child)
        if configs is None:
            continue
        keys = set(child.state_dict().keys())
        for config in configs:
            key = f"embedding_bags.{config.name}.weight"
            if key not in keys:
                raise ValueError(f"table {config.name!r} has no weight {key!r} in its module")
            part = [TablePart(child, key)]
            tables.append(WatchedTable(config.name, list(config.feature_names), config.num_embeddings,
                                       config.embedding_dim, lambda part=part: part))
    return tables


@dataclass(frozen=True)
class TableSize:
    """The shape of one embedding table as the data sees it: its name, the features that look it up, its rows, its
    width and the bytes of one weight element (4 for fp32)."""

    name: str
    features: tuple[str, ...]
    num_rows: int
    dim: int
    bytes_per_element: int = 4


def table_sizes(module: nn.Module) -> list[TableSize]:
    """The tables of ``module`` as :func:`watched_tables` finds them (plain, sharded and hot/cold collections), read
    from their configs only (nothing is copied): what a batch's IDs must fit.

    Plain ``torch.nn.EmbeddingBag`` / ``nn.Embedding`` tables are found too when their features can be told: a
    table in an ``nn.ModuleDict`` under its feature's name (``self.bags = nn.ModuleDict({feature: EmbeddingBag})``),
    or one that carries ``feature_names`` (a list of KeyedJaggedTensor keys) as an attribute.
    """
    sizes: list[TableSize] = []
    inside: list[str] = []  # modules whose tables are described already (collections hold plain bags inside)
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        own = getattr(child, "watched_tables", None)
        if callable(own) and child is not module:
            sizes.extend(TableSize(t.name, tuple(t.features), t.num_rows, t.dim) for t in own())
            inside.append(name)
        elif is_embedding_module(child):
            sizes.extend(TableSize(c.name, tuple(c.feature_names), c.num_embeddings, c.embedding_dim,
                                   _element_bytes(c))
                         for c in (bag_configs(child) or table_configs(child)))
            inside.append(name)
        elif isinstance(child, (nn.EmbeddingBag, nn.Embedding)):
            features = _plain_table_features(module, name, child)
            if features:
                sizes.append(TableSize(name, features, child.num_embeddings, child.embedding_dim,
                                       child.weight.element_size()))
    return sizes


def _element_bytes(config: Any) -> int:
    """Bytes of one weight element of a TorchRec table config (its ``data_type``; fp32 when it names none)."""
    from torchrec.types import DataType

    data_type = getattr(config, "data_type", DataType.FP32)
    return {DataType.FP32: 4, DataType.FP16: 2, DataType.BF16: 2, DataType.INT8: 1, DataType.UINT8: 1,
            DataType.INT4: 1, DataType.INT2: 1}.get(data_type, 4)


def _plain_table_features(module: nn.Module, name: str, table: nn.Module) -> tuple[str, ...]:
    given = getattr(table, "feature_names", None)
    if given is not None:
        return tuple([given] if isinstance(given, str) else given)
    parent_name, _, key = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    return (key,) if isinstance(parent, nn.ModuleDict) else ()
