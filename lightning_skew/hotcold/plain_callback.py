"""PlainHotColdPlacement: the plain-PyTorch hot/cold split as a callback, so recipes can turn it on in YAML."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_skew.core.rowsets import RowSet
from lightning_skew.hotcold.collection import table_specs
from lightning_skew.hotcold.placement import Placement
from lightning_skew.hotcold.plain import place_hot_cold
from lightning_skew.hotcold.planning import embedding_bag_collections
from lightning_skew.hotcold.state import hot_cold_collections
from lightning_skew.profile.row_sizes import model_table_bytes
from lightning_skew.profile.sources import (
    HotSetSource,
    ProfiledHotRows,
    as_hot_set_source,
    check_source_arguments,
    resolve_hot_rows,
)
from lightning_skew.torchrec.optim import embedding_modules
from lightning_skew.torchrec.strategy import TorchRecStrategy

__all__ = ["PlainHotColdPlacement"]


class PlainHotColdPlacement(pl.Callback):
    """At the start of ``fit``, places the LightningModule's embedding tables hot and cold with plain PyTorch
    embedding bags (:func:`~lightning_skew.hotcold.plain.place_hot_cold`): hot rows move with the
    module (to the GPU under ``accelerator="gpu"``), cold rows stay in host memory.

    It is the path for a GPU without FBGEMM's CUDA build, under a strategy that does not shard (``"auto"``, one
    process); with TorchRec's sharding use :class:`~lightning_skew.HotColdStrategy` instead. The hot
    set is cut to ``budget_bytes`` from a saved access profile (``profile_path``) or from a fresh profile of
    ``sample_fraction`` of the training batches (deterministic: the same rows on every run). The plan is printed
    and kept in :attr:`placements`.

    Checkpoints: the module's weights are saved in the dataset's ID space (whole tables, the unsplit module's
    keys), and this callback's state holds the embedding optimizers' state the same way, so a run resumes
    exactly, under this budget or another, and the weights load into the unsplit module.

    Args:
        budget_bytes: fast memory for hot rows, optimizer state included (4-byte weights).
        profile_path: an ``AccessProfile`` file (``lightning-skew profile``); ``None`` profiles at setup.
        sample_fraction: share of training batches profiled when there is no ``profile_path``.
        cold_device: where the cold rows live and are looked up.
        hot_rows: the hot-set source (a :class:`~lightning_skew.ProfiledHotRows` or a ``RowSet``) shared with the
            other parts of the fit; ``None`` builds one from ``budget_bytes``, ``profile_path`` and
            ``sample_fraction``.
    """

    def __init__(self, budget_bytes: int, profile_path: str | None = None, sample_fraction: float = 0.05,
                 cold_device: str = "cpu", hot_rows: RowSet | HotSetSource | None = None) -> None:
        check_source_arguments(budget_bytes, sample_fraction)
        self.budget_bytes = budget_bytes
        self.profile_path = profile_path
        self.sample_fraction = sample_fraction
        self.cold_device = cold_device
        as_hot_set_source(hot_rows, "PlainHotColdPlacement")  # a clear error now for anything else
        self.hot_rows = hot_rows
        self.placements: dict[str, Placement] = {}
        self._pending_optimizer_state: dict[str, Any] | None = None  # restored before the module was placed
        self._module: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._module = pl_module
        if hot_cold_collections(pl_module):  # placed already: a second fit of the same module
            return
        if isinstance(trainer.strategy, TorchRecStrategy):
            raise MisconfigurationException(
                "PlainHotColdPlacement places tables for a strategy that does not shard; under TorchRecStrategy use "
                "HotColdStrategy(budget_bytes=...) instead")
        if trainer.world_size > 1:
            raise MisconfigurationException(
                f"PlainHotColdPlacement runs on one process (world size {trainer.world_size}); for several use "
                "HotColdStrategy")
        # Callbacks are set up before Lightning calls configure_model: a model that builds its tables there (sized
        # from trainer.datamodule) builds them now. Lightning asks configure_model to be idempotent, and calls it again.
        if not any(True for _ in embedding_modules(pl_module)):
            pl_module.configure_model()
        if trainer.datamodule is None and self.profile_path is None and self.hot_rows is None:
            raise MisconfigurationException("PlainHotColdPlacement needs a DataModule to profile, or profile_path")
        specs = [spec for _, ebc in embedding_bag_collections(pl_module) for spec in table_specs(ebc)]
        dims = {spec.embedding_dim for spec in specs}
        if len(dims) != 1:
            raise MisconfigurationException(f"PlainHotColdPlacement needs one embedding dimension across tables, got "
                                            f"{sorted(dims)}; use place_hot_cold with a hot set of your own")
        source = self.hot_rows if self.hot_rows is not None else ProfiledHotRows(
            self.budget_bytes, profile_path=self.profile_path, sample_fraction=self.sample_fraction)
        hot_set = resolve_hot_rows(source, trainer.datamodule, model_table_bytes(pl_module))
        self.placements = place_hot_cold(pl_module, hot_set, self.budget_bytes, self.cold_device)
        text = "\n".join(f"{path}:\n{placement.describe()}" for path, placement in self.placements.items())
        rank_zero_info(f"Hot/cold placement (plain PyTorch, cold rows in {self.cold_device}):\n{text}")
        if self._pending_optimizer_state is not None:
            self._load_optimizer_state(pl_module, self._pending_optimizer_state)

    def state_dict(self) -> dict[str, Any]:
        module = self._module
        if module is None:
            return {}
        return {"optimizer_state": {path: c.optimizer_state() for path, c in hot_cold_collections(module).items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizer_state")
        if saved is None:
            return
        if self._module is not None and hot_cold_collections(self._module):
            self._load_optimizer_state(self._module, saved)
        else:
            self._pending_optimizer_state = saved

    def _load_optimizer_state(self, module: nn.Module, saved: dict[str, Any]) -> None:
        for path, collection in hot_cold_collections(module).items():
            if path in saved:
                collection.load_optimizer_state(saved[path])
        self._pending_optimizer_state = None
