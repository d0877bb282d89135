"""Bagpipe on the plain-PyTorch GPU path: the cold rows a step needs move into the hot shard before it runs.

The data pipeline looks ahead: :class:`LookaheadDataModule` hands each training batch the distinct rows of
the next ``window`` batches (on the host, never moved). Before each step, :class:`LookaheadPrefetch` turns
every split table's hot shard (GPU memory) into a lookahead cache, as the ``lookahead`` policy of
:mod:`lightning_skew.tiers.lookahead` replays it. The step's cold rows come in (weights and per-row
optimizer state, from the cold shard in host memory), and they take the slots of the hot rows that the coming
batches need furthest ahead (rows no coming batch needs go first, then the higher row ID). The rows that
leave are written back. Moving rows relocates them and nothing else, so training is exact. The tier simulator
shows what this saves (the lookahead rows of ``lightning-skew profile --tiers``).

.. note::
    The moves run at the start of each step and are not yet overlapped with the previous step: writing a row
    back waits for the previous step's update of it. The rows each step moves are logged
    (``prefetch/rows_moved``).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.decisions import SkewBatch
from lightning_skew.data.base import RecDataModule, WrappedDataModule
from lightning_skew.hotcold.collection import COLD_SUFFIX, HOT_SUFFIX
from lightning_skew.hotcold.plain import PlainHotColdEmbeddingBagCollection
from lightning_skew.hotcold.state import hot_cold_collections
from lightning_skew.tiers.lookahead import refresh_plan
from lightning_skew.torchrec.upstream import in_backward_optimizers

__all__ = ["LookaheadBatch", "LookaheadDataModule", "LookaheadPrefetch", "distinct_rows", "move_plain_rows",
           "prefetch_for"]


def _per_row_state(weight: Tensor) -> dict[str, Tensor]:
    """The per-row tensors of the (first) optimizer applied to ``weight`` in backward, by name."""
    optimizers = in_backward_optimizers(weight)
    if not optimizers:
        return {}
    return {name: value for name, value in optimizers[0].state[weight].items()
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == weight.shape[0]}


def _matched_state(hot: Tensor, cold: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Pairs of per-row optimizer state of the two shards. State one shard's optimizer has not made yet (it makes
    it at its first step) is made now as it would be, from ``initial_accumulator_value`` (0 if none)."""
    hot_state, cold_state = _per_row_state(hot), _per_row_state(cold)
    for have, lack, weight in ((hot_state, cold_state, cold), (cold_state, hot_state, hot)):
        for name, value in have.items():
            if name not in lack:
                optimizer = in_backward_optimizers(weight)[0]
                start = float(optimizer.param_groups[0].get("initial_accumulator_value", 0.0))
                lack[name] = torch.full((weight.shape[0], *value.shape[1:]), start, dtype=value.dtype,
                                        device=weight.device)
                optimizer.state[weight][name] = lack[name]
    return [(hot_state[name], cold_state[name]) for name in sorted(hot_state)]


def move_plain_rows(collection: PlainHotColdEmbeddingBagCollection, moves: dict[str, tuple[Tensor, Tensor]]) -> int:
    """Swap rows of a plain hot/cold collection: per table, ``(slots, incoming)``. Each slot's row goes back to the
    cold shard (weights and per-row optimizer state), the incoming cold row takes the slot, and lookups route by
    the new placement. Returns the rows moved in."""
    placement = collection.placement
    new_rows, moved = [], 0
    for table in placement.tables:
        slots, incoming = moves.get(table.spec.name, (None, None))
        if slots is None or slots.numel() == 0:
            new_rows.append(table.hot_rows)
            continue
        evicted = table.hot_rows[slots]
        hot = collection.hot.embedding_bags[table.spec.name + HOT_SUFFIX].weight
        cold = collection.cold.embedding_bags[table.spec.name + COLD_SUFFIX].weight
        pairs = [(hot, cold), *_matched_state(hot, cold)]
        with torch.no_grad():
            for fast, slow in pairs:
                fast_slots = slots.to(fast.device)
                slow[evicted.to(slow.device)] = fast[fast_slots].to(slow.device)
                fast[fast_slots] = slow[incoming.to(slow.device)].to(fast.device, non_blocking=True)
        rows = table.hot_rows.clone()
        rows[slots] = incoming
        new_rows.append(rows)
        moved += int(incoming.numel())
    collection.set_placement(placement.with_hot_rows(new_rows))
    return moved


@dataclass
class LookaheadBatch(SkewBatch):
    """A :class:`~lightning_skew.core.decisions.SkewBatch` that carries the sparse features of the coming batches.

    Args:
        upcoming: per batch, this one first and then the coming ones, the distinct rows each feature looks up
            (:func:`distinct_rows`), on the host; moving the batch to a device leaves them there (they feed
            host-side decisions).
    """

    upcoming: tuple[dict[str, Tensor], ...] = ()


def distinct_rows(features: KeyedJaggedTensor) -> dict[str, Tensor]:
    """The distinct rows each feature of a batch looks up (on the host)."""
    values = features.values().cpu()
    lengths = features.length_per_key()
    return {key: torch.unique(part) for key, part in zip(features.keys(), torch.split(values, lengths), strict=True)}


def _with_lookahead(batch: Any, upcoming: tuple[dict[str, Tensor], ...]) -> LookaheadBatch:
    skew = batch if isinstance(batch, SkewBatch) else SkewBatch.of(batch, is_hot=False, num_hot=0)
    # Every field of the batch's contract kept (deduplicated and routed lookups included).
    return LookaheadBatch(**{f.name: getattr(skew, f.name) for f in dataclasses.fields(SkewBatch)},
                          upcoming=upcoming)


def lookahead_batches(batches: Any, window: int) -> Iterator[LookaheadBatch]:
    """``batches`` with each one's :attr:`LookaheadBatch.upcoming`: its distinct rows per feature and the next
    ``window`` batches' (fewer at the end of the epoch)."""
    queue: deque = deque()  # (batch, its distinct rows per feature), each computed once
    for batch in batches:
        queue.append((batch, distinct_rows(batch.sparse_features)))
        if len(queue) > window:
            first, rows = queue.popleft()
            yield _with_lookahead(first, (rows, *(r for _, r in queue)))
    while queue:
        first, rows = queue.popleft()
        yield _with_lookahead(first, (rows, *(r for _, r in queue)))


class LookaheadDataModule(WrappedDataModule):
    """Wraps a :class:`~lightning_skew.data.base.RecDataModule` so that each training batch carries the sparse
    features of the next ``window`` batches (:class:`LookaheadBatch`), for :class:`LookaheadPrefetch`.

    Args:
        datamodule: the data (any RecDataModule or wrapper of one).
        window: how many coming batches each batch shows (Bagpipe's lookahead).

    .. note::
        The wrapper reads ``window`` batches ahead of training. A run resumed mid-epoch resumes the inner data
        at its own position, not the wrapper's.
    """

    def __init__(self, datamodule: RecDataModule, window: int = 64) -> None:
        super().__init__(datamodule)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.window = window

    def train_dataloader(self) -> Any:
        return _Lookahead(self.datamodule.train_dataloader(), self.window)


class _Lookahead:
    def __init__(self, loader: Any, window: int) -> None:
        self.loader, self.window = loader, window

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[LookaheadBatch]:
        return lookahead_batches(self.loader, self.window)


class LookaheadPrefetch(pl.Callback):
    """Bagpipe's lookahead on the plain-PyTorch GPU path: before each training step, every split table's hot
    shard in GPU memory takes the step's cold rows from host memory, evicting the rows the coming batches need
    furthest ahead (:func:`refresh_plan`, :func:`move_plain_rows`).

    Use it with :class:`~lightning_skew.PlainHotColdPlacement` (the tables placed hot and cold with plain PyTorch)
    and the DataModule wrapped in :class:`LookaheadDataModule`, under ``accelerator="gpu"``. It needs CUDA: on
    the CPU the hot shard is host memory too, and there is nothing to prefetch into.

    Example (YAML)::

        data:
          class_path: lightning_skew.tiers.prefetch.LookaheadDataModule
          init_args: {window: 64, datamodule: {class_path: lightning_skew.SyntheticDataModule}}
        trainer:
          accelerator: gpu
          callbacks:
            - {class_path: lightning_skew.PlainHotColdPlacement, init_args: {budget_bytes: 8000000}}
            - class_path: lightning_skew.tiers.prefetch.LookaheadPrefetch
    """

    def __init__(self) -> None:
        self.rows_moved = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise MisconfigurationException(
                f"LookaheadPrefetch moves cold rows into GPU memory ahead of the steps that need them; this run "
                f"trains on {device} (CUDA available: {torch.cuda.is_available()}). Train with accelerator='gpu', "
                "or leave the callback out (lightning-skew profile --tiers shows what it would save)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        upcoming = getattr(batch, "upcoming", ())
        if not upcoming:
            raise MisconfigurationException("LookaheadPrefetch needs batches that show the coming ones: wrap the "
                                            "DataModule in lightning_skew.tiers.prefetch.LookaheadDataModule")
        collections = hot_cold_collections(pl_module)
        if not collections or not all(isinstance(c, PlainHotColdEmbeddingBagCollection)
                                      for c in collections.values()):
            raise MisconfigurationException("LookaheadPrefetch moves rows of plain hot/cold collections: add the "
                                            "PlainHotColdPlacement callback before it")
        moved = sum(prefetch_for(collection, upcoming) for collection in collections.values())
        self.rows_moved += moved
        pl_module.log("prefetch/rows_moved", float(moved), on_step=True, on_epoch=False)


def prefetch_for(collection: PlainHotColdEmbeddingBagCollection,
                 upcoming: Sequence[dict[str, Tensor] | KeyedJaggedTensor]) -> int:
    """Refresh every split table of ``collection`` for the step whose rows are ``upcoming[0]`` (per feature, as
    :func:`distinct_rows` gives them, or the batches' features themselves)."""
    per_step = [distinct_rows(step) if isinstance(step, KeyedJaggedTensor) else step for step in upcoming]
    moves = {}
    for table in collection.placement.tables:
        if table.kind != "split":
            continue
        steps = [torch.cat([step[f] for f in table.spec.feature_names if f in step] or
                           [torch.zeros(0, dtype=torch.int64)]).cpu() for step in per_step]
        moves[table.spec.name] = refresh_plan(table.hot_rows, steps)
    return move_plain_rows(collection, moves)
