"""What one row of each of a model's tables costs in fast memory: the bytes every hot-set source is cut by.

Every part that asks a :class:`~lightning_skew.profile.sources.HotSetSource` for a hot set (the hot/cold
strategies, the popularity DataModule, the stale skipper) describes the tables it serves with
:func:`model_table_bytes`, so a source shared by several parts cuts the same set for each: the rows that fit the
budget at the model's real row size (width x element bytes, plus the embedding optimizer's state per row).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_skew.core.tables import table_sizes
from lightning_skew.profile.budget import row_bytes
from lightning_skew.torchrec.optim import embedding_optimizer_names

__all__ = ["TableBytes", "bytes_by_feature", "model_table_bytes", "trainer_table_bytes"]


@dataclass(frozen=True)
class TableBytes:
    """One embedding table a hot set is cut for.

    Args:
        name: the table's name in the model.
        features: the features (KeyedJaggedTensor keys) that look it up.
        num_rows: its rows.
        bytes_per_row: fast-memory bytes of one row: weights plus the embedding optimizer's state of that row.
    """

    name: str
    features: tuple[str, ...]
    num_rows: int
    bytes_per_row: int


def model_table_bytes(module: nn.Module, optimizer: str | Iterable[str] | None = None) -> list[TableBytes]:
    """The embedding tables of ``module`` (plain, sharded or hot/cold; see
    :func:`~lightning_skew.core.tables.table_sizes`) with the bytes one row of each takes.

    A row takes ``dim x`` its element bytes plus the state of the optimizer its embeddings carry (the one fused
    into them, see :func:`~lightning_skew.torchrec.optim.fuse_embedding_optimizer`), else of ``optimizer`` (the
    strategy's: one name or several), else of plain SGD (no state). Several optimizers: the largest state.

    Args:
        module: the model (a LightningModule or any module holding its tables).
        optimizer: the embedding optimizer(s) when the module does not carry them (yet, or any more: sharding
            moves them into TorchRec's kernels).
    """
    given = [optimizer] if isinstance(optimizer, str) else sorted(optimizer or [])
    names = sorted(embedding_optimizer_names(module)) or given or ["sgd"]
    tables = []
    for size in table_sizes(module):
        per_row = max(row_bytes(size.dim, size.bytes_per_element, name) for name in names)
        tables.append(TableBytes(size.name, tuple(size.features), size.num_rows, per_row))
    return tables


def trainer_table_bytes(trainer: Any) -> list[TableBytes]:
    """The tables of the model a Trainer fits (:func:`model_table_bytes`), with the embedding optimizers its
    strategy found (``embedding_optimizer_names`` of the TorchRec strategies, set at their setup) or will fuse
    (``embedding_optimizer``); ``[]`` without a Trainer or a model."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    if module is None:
        return []
    strategy = trainer.strategy
    found = getattr(strategy, "embedding_optimizer_names", None)
    return model_table_bytes(module, found or getattr(strategy, "embedding_optimizer", None))


def bytes_by_feature(tables: Sequence[TableBytes]) -> dict[str, int]:
    """The bytes a hot row of each feature takes: a feature that looks up several tables (DeepFM's first-order and
    embedding tables) makes its row hot in all of them, so its bytes are theirs summed."""
    sizes: dict[str, int] = {}
    for table in tables:
        for feature in table.features:
            sizes[feature] = sizes.get(feature, 0) + table.bytes_per_row
    return sizes
