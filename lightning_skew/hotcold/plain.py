"""Hot/cold placement with plain PyTorch embedding bags: hot rows live with the model, cold rows in host memory.

TorchRec's sharded kernels (what :class:`~lightning_skew.HotColdStrategy` uses) need FBGEMM's
CUDA build to run on a GPU. Where only the CPU build is installed, this path places the same split without
them: :class:`PlainHotColdEmbeddingBagCollection` keeps the hot shard in the module's own device (moved with
the LightningModule, so on the GPU under ``accelerator="gpu"``) and pins the cold shard to ``cold_device``
(host memory): the cold lookups run there and only their pooled output crosses to the GPU. Both shards train
with sparse gradients (only the rows a step looked up are touched) and the embedding optimizer applied in
backward, as TorchRec fuses it.

:func:`place_hot_cold` replaces every ``EmbeddingBagCollection`` of a module by such a collection, for a
single-process run under any Lightning strategy that does not shard (``"auto"``, one device).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lightning_skew.core.rowsets import RowSet
from lightning_skew.hotcold.collection import (
    HotColdEmbeddingBagCollection,
    table_specs,
)
from lightning_skew.hotcold.placement import COLD, HOT, Placement
from lightning_skew.hotcold.planning import bytes_per_row, embedding_bag_collections, place_collections
from lightning_skew.hotcold.state import (
    from_original_ids,
    inner_weight_keys,
    original_weight_key,
    to_original_ids,
)
from lightning_skew.torchrec.optim import sparse_capable
from lightning_skew.torchrec.upstream import apply_optimizer_in_backward, in_backward_optimizers

__all__ = ["PlainHotColdEmbeddingBagCollection", "place_hot_cold"]


class PlainHotColdEmbeddingBagCollection(HotColdEmbeddingBagCollection):
    """A :class:`~lightning_skew.hotcold.collection.HotColdEmbeddingBagCollection` computed with
    ``torch.nn.functional.embedding_bag`` instead of TorchRec's kernels, its cold shard pinned to ``cold_device``.

    Moving the module (``.to()``, ``.cuda()``, Lightning's move to the root device) moves the hot shard and
    leaves the cold shard where it is; the embedding optimizers' state follows its rows. Lookups are split
    on the batch's device; the cold ones are copied to ``cold_device``, pooled there, and the pooled values
    copied back. Every table trains with sparse gradients and its embedding optimizer in backward
    (row-wise Adagrad as :class:`~lightning_skew.torchrec.optim.SparseRowWiseAdagrad`, Adagrad or SGD), so a step touches
    only the rows it looked up. Pooling is exact: the same outputs, gradients and updates as the original
    collection, to floating-point rounding.

    Its ``state_dict`` is in the dataset's ID space: each table whole, under the original collection's keys
    (``embedding_bags.<table>.weight``), so it loads into the unsplit module, and ``load_state_dict`` takes an
    unsplit collection's or another placement's tables. The embedding optimizers' state, which a plain module
    keeps outside its ``state_dict``, comes and goes through :meth:`optimizer_state` and
    :meth:`load_optimizer_state` (the :class:`~lightning_skew.PlainHotColdPlacement` callback puts it
    in Lightning checkpoints).

    Args:
        ebc: the collection to replace (plain, not sharded), its embedding optimizer already fused in.
        placement: the hot rows of each of its tables.
        cold_device: where the cold shard lives and is looked up (host memory: ``"cpu"``).
    """

    def __init__(self, ebc: EmbeddingBagCollection, placement: Placement, cold_device: str | torch.device = "cpu"
                 ) -> None:
        super().__init__(ebc, placement)
        self.cold_device = torch.device(cold_device)
        if self.cold is not None:
            self.cold.to(self.cold_device)
        # Per part: its pooled output's keys and their widths, in the order a TorchRec collection gives them.
        self._part_layout = {
            id(part): ([n for names in get_embedding_names_by_table(part.embedding_bag_configs()) for n in names],
                       [cfg.embedding_dim for cfg in part.embedding_bag_configs() for _ in cfg.feature_names])
            for part in (self.hot, self.cold) if part is not None}
        self.register_state_dict_post_hook(_state_to_original_ids)
        self.register_load_state_dict_pre_hook(_state_from_original_ids)

    def _part_optimizer(self, table: str, classes: list[type]) -> type:
        """The sparse-gradient form of the table's embedding optimizer (the parts train with sparse gradients)."""
        if not classes:
            raise ValueError(f"table {table!r} carries no embedding optimizer; call lightning_skew.torchrec.optim."
                             "fuse_embedding_optimizer on the module before placing it")
        return sparse_capable(classes[0])

    # -- devices ------------------------------------------------------------------------------------------

    def _apply(self, fn: Any, recurse: bool = True) -> PlainHotColdEmbeddingBagCollection:
        before = self._optimizers()
        cold = self._modules.pop("cold", None)  # the cold shard stays in host memory
        try:
            super()._apply(fn, recurse)
        finally:
            if cold is not None:
                self._modules["cold"] = cold
        # The optimizers' state follows its rows; a move that made new Parameters (to or from "meta", say)
        # gets the optimizer applied in backward again, with its state.
        for key, (old_weight, optimizers) in before.items():
            weight = self._weight(key)
            if weight is not old_weight and not in_backward_optimizers(weight):
                for optimizer in optimizers:
                    apply_optimizer_in_backward(type(optimizer), [weight], dict(optimizer.defaults))
                    in_backward_optimizers(weight)[-1].state[weight] = optimizer.state[old_weight]
            for optimizer in in_backward_optimizers(weight):
                optimizer.state[weight] = _on_device(optimizer.state[weight], weight.device)
        return self

    def _weight(self, key: tuple[str, str]) -> Tensor:
        return getattr(self, key[0]).embedding_bags[key[1]].weight

    def _optimizers(self) -> dict[tuple[str, str], tuple[Tensor, list[torch.optim.Optimizer]]]:
        """``(part, inner table) -> (weight, its optimizers applied in backward)``."""
        return {(part_name, name): (bag.weight, in_backward_optimizers(bag.weight))
                for part_name in ("hot", "cold") if getattr(self, part_name) is not None
                for name, bag in getattr(self, part_name).embedding_bags.items()}

    # -- forward ------------------------------------------------------------------------------------------

    def _pool(self, part: nn.Module, features: KeyedJaggedTensor) -> KeyedTensor:
        """Sum-pool each feature's bags with its table's weight, on the device the part lives in. A part with no
        lookups in the batch is not touched at all (a hot-only batch never reaches host memory); its pooled
        values are zeros, made where the batch is."""
        weights = {cfg.name: part.embedding_bags[cfg.name].weight for cfg in part.embedding_bag_configs()}
        device = next(iter(weights.values())).device
        out_device = features.values().device
        keys = list(features.keys())
        batch_size = features.stride()
        names, widths = self._part_layout[id(part)]
        if features.values().numel() == 0:
            if part is self.cold:
                self.skipped_cold += 1
            dtype = next(iter(weights.values())).dtype
            return KeyedTensor(keys=names, length_per_key=widths,
                               values=torch.zeros(batch_size, sum(widths), dtype=dtype, device=out_device))
        # Blocking copies: a non-blocking copy from the GPU to host memory may be read before it lands.
        values = features.values().to(device).long()
        lengths = features.lengths().to(device).long().view(len(keys), batch_size)
        per_sample = features.weights_or_none()
        per_sample = None if per_sample is None else per_sample.to(device)
        counts = lengths.sum(1).tolist()
        ids = torch.split(values, counts)
        bag_weights = torch.split(per_sample, counts) if per_sample is not None else [None] * len(keys)
        zero = lengths.new_zeros(1)
        pooled = []
        for cfg in part.embedding_bag_configs():
            for feature in cfg.feature_names:
                index = keys.index(feature)
                offsets = torch.cat([zero, torch.cumsum(lengths[index], 0)])
                pooled.append(F.embedding_bag(ids[index], weights[cfg.name], offsets, mode="sum", sparse=True,
                                              per_sample_weights=bag_weights[index], include_last_offset=True))
        return KeyedTensor(keys=names, length_per_key=widths,
                           values=torch.cat(pooled, dim=1).to(out_device, non_blocking=True))

    # -- state in the dataset's ID space -------------------------------------------------------------------

    def state_to_original_ids(self, state: dict[str, Any], prefix: str) -> None:
        """Each table of ``state`` (this module's entries under ``prefix``) whole, in row-ID order, under the
        original collection's key (the ``state_dict`` hook)."""
        collections = {prefix.rstrip("."): self}
        inner = inner_weight_keys(collections)
        parts = {key: state.pop(key).cpu() for key in [k for k in state if k in inner]}  # the shards' devices differ
        state.update(to_original_ids(parts, collections))

    def state_from_original_ids(self, state: dict[str, Any], prefix: str) -> None:
        """Whole tables in ``state`` (any placement's, or an unsplit collection's) as this placement's parts (the
        ``load_state_dict`` pre-hook)."""
        path = prefix.rstrip(".")
        originals = {original_weight_key(path, t.spec.name) for t in self.placement.tables}
        whole = {key: state.pop(key) for key in [k for k in state if k in originals]}
        state.update(from_original_ids(whole, {path: self}))

    def optimizer_state(self) -> dict[str, dict[str, Any]]:
        """The embedding optimizers' state per original table, per-row tensors whole in row-ID order (on the
        CPU); for checkpoints (see :class:`~lightning_skew.PlainHotColdPlacement`)."""
        by_table: dict[str, dict[str, dict[str, Any]]] = {}
        for inner, (table, part) in self.inner_tables().items():
            weight = getattr(self, part).embedding_bags[inner].weight
            for optimizer in in_backward_optimizers(weight):
                by_table.setdefault(table, {})[part] = optimizer.state[weight]
        out: dict[str, dict[str, Any]] = {}
        for table, parts in by_table.items():
            names = {name for state in parts.values() for name in state}
            out[table] = {}
            for name in sorted(names):
                hot, cold = parts.get(HOT, {}).get(name), parts.get(COLD, {}).get(name)
                if any(isinstance(v, Tensor) and v.dim() for v in (hot, cold)):  # per-row state
                    out[table][name] = self.merge_table(table, None if hot is None else hot.cpu(),
                                                        None if cold is None else cold.cpu())
                else:  # a scalar (a step count): the hot part's, else the cold part's
                    out[table][name] = hot if hot is not None else cold
        return out

    def load_optimizer_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Inverse of :meth:`optimizer_state`, under this collection's placement (any budget's state fits)."""
        for inner, (table, part) in self.inner_tables().items():
            if table not in state:
                continue
            weight = getattr(self, part).embedding_bags[inner].weight
            entries = {}
            for name, value in state[table].items():
                if isinstance(value, Tensor) and value.dim():
                    value = self.split_table(table, value)[inner]
                entries[name] = value
            for optimizer in in_backward_optimizers(weight):
                optimizer.state[weight] = _on_device(entries, weight.device)


def _state_to_original_ids(module: PlainHotColdEmbeddingBagCollection, state: dict[str, Any], prefix: str,
                           metadata: Any) -> None:
    module.state_to_original_ids(state, prefix)


def _state_from_original_ids(module: PlainHotColdEmbeddingBagCollection, state: dict[str, Any], prefix: str,
                             *args: Any) -> None:
    module.state_from_original_ids(state, prefix)


def _on_device(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """An optimizer's per-parameter state with its per-row tensors on ``device`` (scalar step counts stay on the
    CPU, where torch's optimizers keep them)."""
    return {k: v.to(device) if isinstance(v, Tensor) and v.dim() else v for k, v in state.items()}


def place_hot_cold(module: nn.Module, hot_rows: RowSet, budget_bytes: int, cold_device: str | torch.device = "cpu"
                   ) -> dict[str, Placement]:
    """Replace every ``EmbeddingBagCollection`` of ``module`` by a :class:`PlainHotColdEmbeddingBagCollection`:
    the rows of ``hot_rows`` (a profile's hot set, see :class:`~lightning_skew.profile.AccessProfile`) cut to
    ``budget_bytes`` of weights plus optimizer state form the hot shards, the rest stays in ``cold_device``.

    Call it on the LightningModule before ``trainer.fit`` (the embedding optimizer fused in, as
    :class:`~lightning_skew.models.DLRMModule` does), and train with a strategy that does not shard (one
    process). Returns the placement of each collection, by its path in ``module``.
    """
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
    placed = [name for name, m in module.named_modules() if isinstance(m, HotColdEmbeddingBagCollection)]
    if placed:
        raise ValueError(f"{type(module).__name__} is placed already (hot/cold collections at {placed}); place the "
                         "module as built, once")
    found = embedding_bag_collections(module)
    specs = [spec for _, ebc in found for spec in table_specs(ebc)]
    place_collections(module, found, hot_rows, budget_bytes, bytes_per_row(module, specs),
                      lambda ebc, part: PlainHotColdEmbeddingBagCollection(ebc, part, cold_device))
    return {name: m.placement for name, m in module.named_modules()
            if isinstance(m, PlainHotColdEmbeddingBagCollection)}
