"""A Lightning strategy that keeps hot TorchRec rows in fast memory and cold rows in host memory (FAE)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchrec.distributed import DistributedModelParallel

from lightning_skew.core.decisions import SkewBatch, hot_only_step
from lightning_skew.core.id_ranges import check_table_ids, model_bounds
from lightning_skew.core.rowsets import RowSet
from lightning_skew.data.base import RecDataModule
from lightning_skew.hotcold.collection import LAYOUTS, HotColdEmbeddingBagCollection, table_specs
from lightning_skew.hotcold.placement import HOT, Placement, TableSpec
from lightning_skew.hotcold.planning import (
    bytes_per_row,
    embedding_bag_collections,
    hot_set_inside,
    place_collections,
)
from lightning_skew.hotcold.rebalance import all_reduced_counts, move_rows, plan_rebalance
from lightning_skew.hotcold.router import STACKED
from lightning_skew.hotcold.routing import RouteInWorkers, route_batch, routed_ahead, routed_batch_step
from lightning_skew.hotcold.state import (
    flatten_optimizer_state,
    from_original_ids,
    hot_cold_collections,
    inner_weight_keys,
    to_original_ids,
    unflatten_optimizer_state,
)
from lightning_skew.profile.row_sizes import model_table_bytes
from lightning_skew.profile.sources import (
    HotSetSource,
    ProfiledHotRows,
    as_hot_set_source,
    check_source_arguments,
    describe_source,
    resolve_hot_rows,
)
from lightning_skew.torchrec.checkpoint import (
    copy_into_shards,
    gather_unsharded,
    load_sharded_checkpoint,
    read_checkpoint_file,
    save_sharded_checkpoint,
    weights_or_full,
)
from lightning_skew.torchrec.sharding import shard_module
from lightning_skew.torchrec.strategy import TorchRecStrategy

__all__ = ["HotColdStrategy", "ORIGINAL_IDS_FORMAT"]

ORIGINAL_IDS_FORMAT = "original-ids-v1"

#: What the split costs where both parts share one memory: `hotcold` against `lightning` in docs/benchmarks.md.
CPU_SPLIT_RATIO = "0.89-0.96x"


class HotColdStrategy(TorchRecStrategy):
    """:class:`TorchRecStrategy` with every table placed by popularity: hot rows in fast memory, cold rows in
    host memory (FAE's placement, on TorchRec).

    At setup the strategy takes a hot set from its source (``hot_rows``, a saved
    :class:`~lightning_skew.profile.AccessProfile`, or a fresh profile of a sample of the training data), cuts
    it to ``budget_bytes`` (weights plus optimizer state), and replaces every ``EmbeddingBagCollection`` of the
    module by a :class:`~lightning_skew.hotcold.collection.HotColdEmbeddingBagCollection`: tables
    that fit entirely are hot, large tables are split (their hot rows re-indexed into a compact hot shard, the
    whole table kept by row ID as the cold shard), the rest stays cold. TorchRec then shards the hot shards with ``hot_compute_kernel``
    and the cold ones with ``cold_compute_kernel``. Training is exact: placement re-indexes rows, so losses
    and weights match :class:`TorchRecStrategy` to floating-point rounding.

    Args:
        budget_bytes: fast memory for hot rows, optimizer state included (4-byte weights).
        hot_rows: the hot-set source shared with the other parts of the fit (a
            :class:`~lightning_skew.ProfiledHotRows`, any :class:`~lightning_skew.profile.HotSetSource`, or a
            ``RowSet``), asked for the module's tables at their real bytes per row: its hot set is placed as it is,
            so hot batches of a PopularityDataModule with the same source skip the cold rows. ``None``: a
            ``ProfiledHotRows`` of this budget (``profile_path`` or ``sample_fraction`` below).
        profile_path: with ``hot_rows=None``, an access profile (``lightning-skew profile``) to cut the hot set
            from; without one the training data is profiled (``sample_fraction`` of its batches, all ranks'
            counts summed; a source equal to it elsewhere in the fit shares that pass).
        sample_fraction: share of training batches counted by that setup profile (FAE: 5%).
        hot_set_mode: how the profile's hot set spreads over tables (``global``: FAE's cut over all rows).
        rebalance_every_n_steps: every this many optimizer steps, the lookups counted since the last rebalance
            (all ranks summed) choose each split table's hot rows anew (same count per table); rows and their
            optimizer state move between the shards (only the rows that change). ``None``: never.
        rebalance_every_n_epochs: the same at the start of every this many epochs.
        hot_compute_kernel: TorchRec kernel of hot shards (default ``fused``: GPU memory on CUDA).
        cold_compute_kernel: TorchRec kernel of cold shards (default ``fused_uvm`` on CUDA: host memory read by
            the GPU; ``fused`` on CPU).
        layout: how each collection holds its hot and cold tables
            (:class:`~lightning_skew.hotcold.collection.HotColdEmbeddingBagCollection`): ``"stacked"`` (the default
            where both parts use the same kernel, hence the same memory: a split table is one table, its hot slots
            above its cold shard, so a step costs little more than unsplit), ``"fused"`` (the default otherwise: one
            TorchRec collection, so one input and one output distribution a step for both parts, each table placed by
            its own kernel), or ``"separate"`` (two collections; a hot-only step leaves the cold one out).
        **kwargs: every argument of :class:`TorchRecStrategy` (``sharding_types``, ``embedding_optimizer``,
            ``embedding_lr``, ``cache_load_factor``, ``process_group_backend``, ...), passed through; all but
            ``pipeline``, which HotColdStrategy refuses.

    .. note::
        A batch that says it is hot on every rank (a :class:`~lightning_skew.core.decisions.SkewBatch` from a
        PopularityDataModule, any schedule) whose hot set lies inside the placement's hot rows sends the cold
        tables no lookup (with ``layout="separate"`` it leaves the cold collection out): it never touches host
        memory. Give both the same ``hot_rows`` source.

    .. note::
        Checkpoints and exports are in the dataset's own ID space: whole tables and per-row optimizer state,
        named as the original collections name them. They load into a :class:`TorchRecStrategy` run, into an
        unsharded module, or into a HotColdStrategy with another budget, at any world size. Saving gathers the
        tables on rank zero, and loading reads them whole on every rank: one full copy of the tables per
        process, in host memory, while a checkpoint is written or read. A rebalance moves only the rows that
        change hot/cold status.
    """

    strategy_name = "hot_cold"

    def __init__(
        self,
        budget_bytes: int,
        hot_rows: RowSet | HotSetSource | None = None,
        profile_path: str | None = None,
        sample_fraction: float = 0.05,
        hot_set_mode: str = "global",
        rebalance_every_n_steps: int | None = None,
        rebalance_every_n_epochs: int | None = None,
        hot_compute_kernel: str | None = None,
        cold_compute_kernel: str | None = None,
        layout: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("pipeline") is not None:
            raise ValueError(
                f"HotColdStrategy does not take pipeline={kwargs['pipeline']!r}: its collections re-index IDs and "
                "choose hot or cold per batch before the sharded tables, so TorchRec's pipeline cannot distribute a "
                "batch's inputs steps ahead. Use TorchRecStrategy(pipeline=...) without the hot/cold placement, or "
                "HotColdStrategy without a pipeline.")
        super().__init__(**kwargs)
        check_source_arguments(budget_bytes, sample_fraction)
        for name, value in (("rebalance_every_n_steps", rebalance_every_n_steps),
                            ("rebalance_every_n_epochs", rebalance_every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        self.budget_bytes = budget_bytes
        as_hot_set_source(hot_rows, "HotColdStrategy")  # a clear error now for anything else
        self.hot_rows = hot_rows
        self.profile_path = profile_path
        self.sample_fraction = sample_fraction
        self.hot_set_mode = hot_set_mode
        self.rebalance_every_n_steps = rebalance_every_n_steps
        self.rebalance_every_n_epochs = rebalance_every_n_epochs
        self.hot_compute_kernel = hot_compute_kernel
        self.cold_compute_kernel = cold_compute_kernel
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} or None (chosen by the kernels), got {layout!r}")
        self.layout = layout
        self.hot_set_source = ""  # where the hot set came from: popularity datamodule, profile file, fresh profile
        self.rebalances: list[dict[str, float]] = []  # one record per rebalance (also logged)
        self.batches_routed_in_workers = 0  # training batches that arrived routed from the DataLoader's workers
        self._trainer: pl.Trainer | None = None
        self._last_rebalance: tuple[int, int] | None = None  # (epoch, global step) of the last rebalance
        self._collections: dict[str, HotColdEmbeddingBagCollection] = {}  # found once the module is placed
        self._checked_hot_set: tuple[RowSet | None, bool] = (None, False)

    # ----------------------------------------------------------------------------------------- set-up

    @property
    def placements(self) -> dict[str, Placement]:
        """The current placement of every hot/cold collection, by its path in the LightningModule."""
        return {path: c.placement for path, c in self.collections().items()}

    def collections(self) -> dict[str, HotColdEmbeddingBagCollection]:
        """Every hot/cold collection of the LightningModule, by its path (after setup)."""
        return self._collections

    def setup(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        super().setup(trainer)
        kernels = self._kernels()
        if self.root_device.type != "cuda" or kernels["hot"] == kernels["cold"]:
            rank_zero_warn(
                f"HotColdStrategy: the hot and the cold rows live in the same memory here ({self.root_device.type}, "
                f"kernels {kernels['hot']!r} and {kernels['cold']!r}), so the split cannot pay, it only costs (on 2 "
                f"CPU cores the default recipe trains at {CPU_SPLIT_RATIO} of TorchRecStrategy's speed; "
                "docs/benchmarks.md). It pays where the cold rows are in slower memory (CUDA with the cold kernel "
                "'fused_uvm'); here, TorchRecStrategy trains the same model exactly.")
        if trainer.state.fn == TrainerFn.FITTING and self._rebalancing:
            for collection in self.collections().values():
                collection.start_counting()

    @property
    def _rebalancing(self) -> bool:
        return self.rebalance_every_n_steps is not None or self.rebalance_every_n_epochs is not None

    def _shard(self, module: pl.LightningModule) -> DistributedModelParallel:
        if not hot_cold_collections(module):
            self._place(module)
        self._collections = hot_cold_collections(module)  # looked up once, not at every step
        kernels = self._kernels()
        inner = {name: table for c in self._collections.values() for name, table in c.inner_tables().items()}
        # A stacked table holds both parts in one memory: the one both kernels name (see _layout).
        kernel_by_table = {name: kernels[HOT if part == STACKED else part] for name, (_, part) in inner.items()}
        options = self._shard_options()
        # Constraints given for a table follow it into its hot and cold parts (<table>__hot, <table>__cold).
        given = dict(options["table_constraints"] or {})
        unknown = sorted(set(given) - {table for table, _ in inner.values()} - set(inner))
        if unknown:
            raise MisconfigurationException(
                f"HotColdStrategy: table_constraints name tables the model does not have: {unknown}; its tables: "
                f"{sorted({table for table, _ in inner.values()})}")
        options["table_constraints"] = {name: {**given.get(table, {}), **given.get(name, {})}
                                        for name, (table, _) in inner.items() if table in given or name in given}
        return shard_module(module, self.root_device, **options, kernel_by_table=kernel_by_table)

    def _layout(self) -> str:
        """The layout asked for, else ``stacked`` where both parts use one kernel (one memory), else ``fused``."""
        kernels = self._kernels()
        if self.layout == "stacked" and kernels["hot"] != kernels["cold"]:
            raise MisconfigurationException(
                f"HotColdStrategy(layout='stacked') holds a split table's hot and cold rows in one table, so both parts "
                f"need one kernel, but they are {kernels['hot']!r} and {kernels['cold']!r}: use layout='fused' (or "
                "None) to keep the cold rows in their own memory")
        if self.layout is not None:
            return self.layout
        return "stacked" if kernels["hot"] == kernels["cold"] else "fused"

    def _kernels(self) -> dict[str, str]:
        cuda = self.root_device.type == "cuda"
        kernels = {"hot": self.hot_compute_kernel or "fused",
                   "cold": self.cold_compute_kernel or ("fused_uvm" if cuda else "fused")}
        if not cuda and any("uvm" in k for k in kernels.values()):
            raise MisconfigurationException(
                f"HotColdStrategy: the kernels {kernels} need CUDA (UVM is GPU-addressable host memory); on CPU "
                "both parts use 'fused'")
        return kernels

    def _place(self, module: nn.Module) -> None:
        found = embedding_bag_collections(module)
        specs = [spec for _, ebc in found for spec in table_specs(ebc)]
        sizes = bytes_per_row(module, specs, self.embedding_optimizer)
        hot_set = self._hot_set(module, specs)
        try:
            place_collections(module, found, hot_set, self.budget_bytes, sizes,
                              lambda ebc, part: HotColdEmbeddingBagCollection(ebc, part, self._layout()))
        except ValueError as error:
            if self.hot_rows is None or "more than the budget" not in str(error):
                raise
            raise MisconfigurationException(
                f"HotColdStrategy(budget_bytes={self.budget_bytes}): {error}: the hot set given by {self.hot_set_source} "
                "is placed as it is (so that the parts sharing it agree), and its own budget holds more than this "
                "one. Give the source a budget_bytes no larger than HotColdStrategy's, or raise HotColdStrategy's "
                "budget_bytes.") from error

    def _hot_set(self, module: nn.Module, specs: list[TableSpec]) -> RowSet:
        """The hot set from the source (``hot_rows``, else a :class:`ProfiledHotRows` of this budget), asked for
        the module's tables at their real row sizes: the answer every part of the fit that shares the source gets."""
        datamodule = getattr(self._trainer, "datamodule", None)
        source = self.hot_rows
        if source is None:
            fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
            if self.profile_path is None and (datamodule is None or not fitting):
                rank_zero_warn("HotColdStrategy: no hot set (give hot_rows or profile_path) and no training data to "
                               "profile; every table stays cold")
                self.hot_set_source = "none (all cold)"
                features = [f for spec in specs for f in spec.feature_names]
                rows = [spec.num_rows for spec in specs for _ in spec.feature_names]
                return RowSet(features, rows, [torch.zeros(0, dtype=torch.int64) for _ in features])
            if datamodule is not None and self.profile_path is None and \
                    not isinstance(getattr(datamodule, "unwrapped", None), RecDataModule):
                raise MisconfigurationException(
                    f"HotColdStrategy profiles the training data to find hot rows, and {type(datamodule).__name__} "
                    "is not a lightning-skew RecDataModule (which names its features and table sizes). Derive it "
                    "from lightning_skew.RecDataModule (docs/models.md), or give HotColdStrategy hot_rows (a RowSet) "
                    "or profile_path.")
            source = ProfiledHotRows(self.budget_bytes, profile_path=self.profile_path,
                                     sample_fraction=self.sample_fraction, mode=self.hot_set_mode)
        self.hot_set_source = describe_source(source)
        return resolve_hot_rows(source, datamodule, model_table_bytes(module, self.embedding_optimizer))

    def _log_plan(self, trainer: pl.Trainer) -> None:
        super()._log_plan(trainer)
        rows = [[path, *row] for path, placement in self.placements.items() for row in placement.rows()]
        text = "\n".join(f"{path}:\n{placement.describe()}" for path, placement in self.placements.items())
        rank_zero_info(f"Hot/cold placement (hot set: {self.hot_set_source}):\n{text}")
        self.publish_plan(trainer, "hot_cold_placement", ["collection", "table", "placement", "hot_rows",
                                                          "cold_rows", "hot_bytes"], rows, text)

    # ------------------------------------------------------------------------------------- training

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        trainer = self.lightning_module.trainer
        if trainer is not None and trainer.training:
            # The hot/cold split of each training batch is made here, on the host, after the DataModule's hooks
            # and the ID check and before the copy, so the step itself splits nothing (on a GPU the split's
            # data-dependent sizes would stall the device every step; here the device still runs the last step).
            batch = self._route_batch(check_table_ids(self.lightning_module, batch))
        return super().batch_to_device(batch, device, dataloader_idx)

    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer
        if trainer.training and isinstance(dataloader, DataLoader) and dataloader.num_workers > 0 \
                and not self._rebalancing:
            # The loader's workers route its batches (after checking their IDs), so this process does not; a
            # rebalance would make their routes stale, so with rebalancing the batches are routed here.
            dataloader.collate_fn = RouteInWorkers(
                dataloader.collate_fn, {path: (c.router, c.placement_version) for path, c in self.collections().items()},
                model_bounds(self.lightning_module))
        return dataloader

    def _route_batch(self, batch: Any) -> Any:
        if routed_ahead(self.collections(), batch):  # the loader's workers routed it for this placement
            self.batches_routed_in_workers += 1
            routed = batch
        else:
            routed = route_batch(self.collections(), batch)
        if isinstance(routed, SkewBatch) and routed.is_hot and routed.hot_rows is not None:
            self._hot_set_placed(routed.hot_rows)  # checked here, on the host, not in the step
        return routed

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        with hot_only_step(self._hot_only(batch)), routed_batch_step(self.collections(), batch):
            return super().training_step(*args, **kwargs)

    def _hot_only(self, batch: Any) -> bool:
        """Whether this step may leave the cold collections out: the batch says it is hot on every rank, and the
        hot set it refers to lies inside the placement's hot rows (checked once per hot set)."""
        if not (isinstance(batch, SkewBatch) and batch.is_hot and batch.hot_rows is not None):
            return False
        return self._hot_set_placed(batch.hot_rows)

    def _hot_set_placed(self, hot_set: RowSet) -> bool:
        """Whether ``hot_set`` lies inside the placement's hot rows (checked once per hot set, warned if not)."""
        if self._checked_hot_set[0] is not hot_set:
            self._checked_hot_set = (hot_set, hot_set_inside(hot_set, self.placements.values()))
            if not self._checked_hot_set[1]:
                rank_zero_warn("HotColdStrategy: the batches' hot set has rows outside the placement's hot rows, so "
                               "hot batches still run the cold collections")
        return self._checked_hot_set[1]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        trainer = self._trainer
        if trainer is None or not self._rebalancing:
            return
        epoch, step = trainer.current_epoch, trainer.global_step
        if self._last_rebalance is not None and self._last_rebalance[1] == step:
            return
        by_steps = self.rebalance_every_n_steps is not None and step > 0 and step % self.rebalance_every_n_steps == 0
        by_epochs = (self.rebalance_every_n_epochs is not None and batch_idx == 0 and epoch > 0
                     and epoch % self.rebalance_every_n_epochs == 0)
        if by_steps or by_epochs:
            self.rebalance()

    def rebalance(self) -> dict[str, float]:
        """Choose every split table's hot rows anew from the lookups counted since the last rebalance (all ranks
        summed) and move rows and their optimizer state between the shards. Collective. Returns (and logs) the
        cost and effect: seconds, rows moved, and the counted lookups' hot share before and after."""
        start = time.perf_counter()
        collections = self.collections()
        new_placements, moves, record = plan_rebalance(collections)
        move_rows(self.lightning_module.state_dict(), self.fused_optimizer.state_dict(), moves, self._collections)
        for path, placement in new_placements.items():
            collections[path].set_placement(placement)
        for collection in collections.values():
            collection.start_counting()
        trainer = self._trainer
        self._last_rebalance = (trainer.current_epoch, trainer.global_step) if trainer is not None else None
        record = {"rebalance_seconds": time.perf_counter() - start, **record}
        self.rebalances.append(record)
        if trainer is not None and self.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"hot_cold/{k}": v for k, v in record.items()}, step=trainer.global_step)
        rank_zero_info(f"HotColdStrategy rebalance at step {trainer.global_step if trainer else '?'}: "
                       f"{int(record['rows_moved'])} rows moved in {record['rebalance_seconds']:.3f} s; hot share of "
                       f"the counted lookups {record['hot_lookup_share_before']:.3f} -> "
                       f"{record['hot_lookup_share_after']:.3f}")
        return record

    # ------------------------------------------------------------------------- state in the data's ID space

    def _original_weights(self, state: dict[str, Any]) -> dict[str, Tensor]:
        """The tables of a module ``state`` whole, in the dataset's ID space, on rank zero. Collective."""
        keys = inner_weight_keys(self._collections)
        return to_original_ids(gather_unsharded({k: v for k, v in state.items() if k in keys}), self._collections)

    def _original_optimizer_state(self) -> dict[str, Tensor]:
        """The fused optimizer's per-row state (``"<param>::<state>"``) whole, in the dataset's ID space, on rank
        zero. Collective."""
        state = flatten_optimizer_state(self.fused_optimizer.state_dict()["state"])
        return to_original_ids(gather_unsharded(state), self._collections)

    def gather_tables(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Whole tables and their flattened optimizer state (``"<param>::<state>"``), in the dataset's ID space,
        on rank zero (other ranks get empty dicts). Collective."""
        return self._original_weights(self.lightning_module.state_dict()), self._original_optimizer_state()

    def _scatter_tables(self, weights: dict[str, Tensor], optimizer: dict[str, Tensor] | None) -> None:
        """Copy whole tables (and optimizer state) in row-ID order into this rank's shards."""
        collections = self.collections()
        if weights:
            copy_into_shards(self.lightning_module.state_dict(), from_original_ids(weights, collections))
        if optimizer:
            template = self.fused_optimizer.state_dict()
            copy_into_shards(flatten_optimizer_state(template["state"]), from_original_ids(optimizer, collections))
            self.fused_optimizer.load_state_dict(template)

    def unsharded_state_dict(self) -> dict[str, Tensor]:
        keys = inner_weight_keys(self._collections)
        state = self.lightning_module.state_dict()
        return {**{k: v for k, v in state.items() if k not in keys}, **self._original_weights(state)}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Whole tables in the dataset's ID space (on rank zero), so checkpoints outlive the placement.
        return self.unsharded_state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("HotColdStrategy.save_checkpoint takes no storage_options")
        optimizer = self._original_optimizer_state()  # the weights came with checkpoint["state_dict"]
        counts = {path: all_reduced_counts(c).cpu() for path, c in sorted(self.collections().items())
                  if c.counts is not None}
        tensors = {"state_dict": checkpoint["state_dict"],
                   "fused_optimizer": {"state": unflatten_optimizer_state(optimizer)}}
        meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        meta["lightning_skew"] = {
            "world_size": self.world_size, "format": ORIGINAL_IDS_FORMAT,
            "hot_cold": {"placements": {p: pl_.state_dict() for p, pl_ in self.placements.items()},
                         "counts": counts, "last_rebalance": self._last_rebalance}}
        save_sharded_checkpoint(filepath, tensors, meta, self.is_global_zero)

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if path.is_file():  # an unsharded file: load_model_state_dict places its tables
            return weights_or_full(path, read_checkpoint_file(path, weights_only),
                                   self.lightning_module.trainer.state.fn == TrainerFn.FITTING)
        collections = self._collections
        keys = inner_weight_keys(collections)
        state = {k: v for k, v in self.lightning_module.state_dict().items() if k not in keys}
        for path_, collection in collections.items():
            prefix = f"{path_}." if path_ else ""
            for table in collection.placement.tables:
                state[f"{prefix}embedding_bags.{table.spec.name}.weight"] = torch.zeros(
                    table.spec.num_rows, table.spec.embedding_dim)
        optimizer = {}
        for key, value in flatten_optimizer_state(self.fused_optimizer.state_dict()["state"]).items():
            optimizer[key] = torch.zeros(tuple(value.size()), dtype=value.dtype)
        optimizer = to_original_ids(optimizer, collections)  # zeros of whole-table shapes, original names
        template = {"state_dict": state, "fused_optimizer": {"state": unflatten_optimizer_state(optimizer)}}
        meta = load_sharded_checkpoint(path, template)
        self._restore_hot_cold(meta.get("lightning_skew", {}).get("hot_cold"))
        self._scatter_tables({}, flatten_optimizer_state(template["fused_optimizer"]["state"]))
        return {**meta, "state_dict": template["state_dict"]}

    def _restore_hot_cold(self, saved: dict[str, Any] | None) -> None:
        if not saved:
            return
        collections = self.collections()
        for path, state in saved.get("placements", {}).items():
            if path in collections:
                placement = Placement.from_state_dict(state)
                if placement.same_shapes(collections[path].placement):  # same budget: resume the same layout
                    collections[path].set_placement(placement)
        for path, counts in saved.get("counts", {}).items():
            if path in collections and collections[path].counting:
                # Rank zero carries the summed counts; the next all_reduce sums the same totals.
                collections[path].counts = counts.clone() if self.is_global_zero else torch.zeros_like(counts)
        self._last_rebalance = saved.get("last_rebalance")
        if self._last_rebalance is not None:
            self._last_rebalance = tuple(self._last_rebalance)

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        incoming = from_original_ids(checkpoint["state_dict"], self.collections())
        super().load_model_state_dict({**checkpoint, "state_dict": incoming}, strict=strict)


