"""Popularity batching: regroup any DataModule's training inputs into hot-only and cold batches (FAE, Hotline)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.batch import Batch, concat_batches, select_inputs
from lightning_skew.core.distributed import all_reduce_sum, broadcast_object, distributed
from lightning_skew.core.lookups import count_lookups, hot_input_mask, top_rows
from lightning_skew.core.rowsets import RowSet
from lightning_skew.data.base import RecDataModule, WrappedDataModule
from lightning_skew.popularity.planning import Lookahead, plan_regrouped, plan_stitched
from lightning_skew.popularity.schedules import (
    SCHEDULES,
    EpochStats,
    PopularityBatch,
    fae_order,
    interleave_order,
    stitch_batch,
)
from lightning_skew.profile.row_sizes import trainer_table_bytes
from lightning_skew.profile.sources import HotSetSource, LookedUpRows, as_hot_set_source, resolve_hot_rows

__all__ = [
    "SCHEDULES",
    "EpochStats",
    "HotSetSource",
    "PopularityBatch",
    "PopularityDataModule",
    "concat_batches",
    "count_lookups",
    "fae_order",
    "hot_input_mask",
    "interleave_order",
    "select_inputs",
    "stitch_batch",
    "top_rows",
]

def _sum_counts(counts: list[Tensor]) -> list[Tensor]:
    """Element-wise sums over ranks (the tensors themselves without a process group)."""
    if not distributed():
        return counts
    flat = all_reduce_sum(torch.cat(counts))
    return list(torch.split(flat, [c.numel() for c in counts]))


def _rank_zero_rows(rowset: RowSet) -> RowSet:
    if not distributed():
        return rowset
    rows = broadcast_object([rows.cpu() for rows in rowset.rows])
    return RowSet(list(rowset.feature_names), list(rowset.num_rows), rows)


# ----------------------------------------------------------------------------------------------------------
# The DataModule
# ----------------------------------------------------------------------------------------------------------


class _TrainStream(IterableDataset):
    """The scheduled training batches of one epoch per ``iter`` (runs in the main process: it uses collectives)."""

    def __init__(self, owner: PopularityDataModule) -> None:
        super().__init__()
        self.owner = owner

    def __iter__(self) -> Iterator[PopularityBatch]:
        return self.owner._epoch_batches()

    def __len__(self) -> int:
        return self.owner._num_inner_batches()


class _PopularityLoader(DataLoader):
    """The training loader, stateful in Lightning's terms: its position is the DataModule's, which the same
    checkpoint restores (``PopularityDataModule.load_state_dict``) before the loop reads a batch, so loading the
    loader's copy has nothing left to do; a mid-epoch resume goes on with the next batch."""

    def state_dict(self) -> dict[str, Any]:
        owner = self.dataset.owner  # type: ignore[attr-defined]
        return {"epoch": owner._epoch, "position": owner.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # restored with the DataModule's state (see the class docstring)


class PopularityDataModule(WrappedDataModule):
    """Wraps a :class:`RecDataModule` and regroups its training inputs into hot-only and cold batches.

    An input is *hot* when every one of its lookups hits a hot row (see :func:`hot_input_mask`). The
    wrapper reads the inner module's training batches of size ``B``, classifies their inputs and
    delivers :class:`PopularityBatch` objects (``is_hot`` tells the strategy it may keep the step off
    host memory) on one of three schedules:

    * ``"fae"``: per window of the inner stream, all cold batches, then all hot-only batches (FAE).
    * ``"interleave"``: the same batches, hot ones spread evenly among cold ones in proportion to their
      counts (:func:`interleave_order`), which keeps the gradient mix of the original data.
    * ``"stitch"``: every inner mini-batch as is, reordered hot inputs first, with the split point in
      ``num_hot`` (Hotline): one step per mini-batch, so the loss and optimizer steps are those of the
      unwrapped run, and a Hotline-aware strategy can run ``hot_part()`` and ``cold_part()`` separately.

    Validation and test loaders are the inner module's, never reordered. Feature shapes are forwarded.

    Args:
        datamodule: The inner DataModule (any :class:`RecDataModule`).
        schedule: ``"fae"``, ``"interleave"`` or ``"stitch"``.
        hot_rows: The hot set's source: a :class:`HotSetSource` (such as
            :class:`~lightning_skew.profile.ProfiledHotRows`), asked in :meth:`setup` for the tables of the model
            the Trainer fits (their real bytes per row; none when set up on its own), a
            :class:`~lightning_skew.core.rowsets.RowSet`, or a callable taking the inner DataModule. ``None``
            asks :class:`~lightning_skew.profile.LookedUpRows` for the ``hot_rows_budget`` most looked-up rows of
            the first ``profile_batches`` inner training batches (exact counts, all ranks summed).
        hot_rows_budget: Rows (over all tables) of a hot set the wrapper picks itself: the initial
            profile when ``hot_rows`` is ``None`` and every re-profile.
        window_batches: Inner batches read ahead and scheduled together by ``fae`` and ``interleave``;
            memory is one window of inputs. ``None`` makes the window a whole epoch (FAE's per-epoch
            order, at the cost of holding an epoch of inputs).
        batch_size: Inputs per delivered batch; ``None`` takes the inner loader's (its first batch, the
            largest over ranks).
        shuffle: Shuffle the inputs of each class within a window and draw the interleave phase, from a
            generator seeded by ``(seed, epoch, window)``.
        seed: Seed of the per-epoch order. The same seed and epoch give the same batches.
        reprofile_every_n_epochs: If set, every this many epochs the wrapper counts the lookups it reads
            (all ranks summed) and picks a new hot set of ``hot_rows_budget`` rows, used from the next epoch
            on, so the hot set follows drifting popularity.
        profile_batches: Inner batches a profile counts: the first ones for the initial profile, the
            last ones of the epoch for a re-profile (the most recent popularity). ``None`` counts all.

    .. note::
        **Ranks.** Each window, the ranks exchange their hot and total input counts (one tiny
        ``all_gather``) and agree on ``H = min_r(hot_r) // B`` hot batches and on
        ``ceil((min_r(inputs_r) - H B) / B)`` cold batches, in the same order on every rank, so ``is_hot``
        is the same on all ranks at every step and no rank waits at the epoch's end. Hot inputs beyond
        ``H B`` ride in cold batches (``hot_inputs_in_cold_batches``); inputs beyond the smallest
        rank's count are dropped (``inputs_dropped``), which never happens when every rank reads the same
        number of inputs (the lightning-skew DataModules do). Only the last cold batch of a window
        may be smaller than ``B``. ``stitch`` needs no agreement: it delivers one batch per inner batch,
        so the ranks step together when the inner loader yields as many batches on each (lightning-skew's
        DataModules do); a stitched batch's ``num_hot`` describes this rank's inputs, and its ``is_hot`` is
        agreed over the ranks (one tiny ``all_gather`` per 32 inner batches, read ahead): it is set only when every
        rank's batch is hot.

    .. note::
        **Resume.** :meth:`state_dict` holds the epoch, the position in it (batches the training loop
        consumed, counted in :meth:`on_before_batch_transfer`, so Lightning's one-batch prefetch is not
        counted) and the hot sets in force. A resumed epoch re-reads the inner loader from its start and
        skips the delivered batches without building them, so the next batch is the one the
        uninterrupted run would have delivered. The inner loader must replay the same epoch (as the
        lightning-skew DataModules do); a LightningModule that overrides ``on_before_batch_transfer``
        hides the count from the DataModule, and a resumed epoch then restarts from its first batch.

    .. note::
        Every epoch logs :class:`EpochStats` (``popularity/hot_input_share``, ``hot_batches``,
        ``cold_batches``, ``inputs_dropped``, ...) to the trainer's loggers; :attr:`epoch_stats` keeps them.

    Example::

        >>> from lightning_skew.data.synthetic import SyntheticDataModule
        >>> inner = SyntheticDataModule(num_embeddings_per_feature=[50, 20], num_dense=2, num_train_samples=512,
        ...                             batch_size=64, popularity_exponent=1.5)
        >>> dm = PopularityDataModule(inner, schedule="fae", hot_rows_budget=10)
        >>> dm.setup("fit")
        >>> flags = [batch.is_hot for batch in dm.train_dataloader()]
        >>> len(flags), flags == sorted(flags)  # eight batches, cold ones first
        (8, True)
    """

    def __init__(
        self,
        datamodule: RecDataModule,
        schedule: str = "fae",
        hot_rows: RowSet | HotSetSource | Callable[[RecDataModule], RowSet] | None = None,
        hot_rows_budget: int | None = None,
        window_batches: int | None = 256,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        reprofile_every_n_epochs: int | None = None,
        profile_batches: int | None = None,
    ) -> None:
        super().__init__(datamodule)
        if not isinstance(datamodule, RecDataModule):
            raise TypeError(f"datamodule must be a RecDataModule (yielding torchrec Batches), got {type(datamodule)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        for name, value in (("hot_rows_budget", hot_rows_budget), ("window_batches", window_batches),
                            ("batch_size", batch_size), ("reprofile_every_n_epochs", reprofile_every_n_epochs),
                            ("profile_batches", profile_batches)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
        if hot_rows is None and hot_rows_budget is None:
            raise ValueError("PopularityDataModule needs a hot set: pass hot_rows (a RowSet or a source such as an "
                             "access profile) or hot_rows_budget (rows to keep hot; the wrapper profiles itself)")
        if reprofile_every_n_epochs is not None and hot_rows_budget is None:
            raise ValueError("reprofile_every_n_epochs needs hot_rows_budget (the size of each new hot set)")
        self.save_hyperparameters(ignore=["datamodule", "hot_rows"])
        self.schedule = schedule
        #: the hot-set source asked in setup (``hot_rows``, else :class:`LookedUpRows` of ``hot_rows_budget``)
        self.hot_rows_source = as_hot_set_source(hot_rows, "PopularityDataModule", allow_callable=True) or \
            LookedUpRows(hot_rows_budget, profile_batches)
        self.hot_rows_budget = hot_rows_budget
        self.window_batches = window_batches
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.reprofile_every_n_epochs = reprofile_every_n_epochs
        self.profile_batches = profile_batches
        self.epoch_stats: dict[int, EpochStats] = {}
        # The hot set in force from epoch `_hot_rows_from` on, and the one a re-profile chose for later.
        self._hot_rows: RowSet | None = None
        self._next_hot_rows: tuple[int, RowSet] | None = None
        self._train_loader: Iterable[Batch] | None = None
        self._epoch = -1  # epoch in progress (or last run)
        self._delivered = 0  # batches yielded in that epoch (standalone position)
        self._consumed = 0  # batches the training loop took in that epoch (position under a Trainer)
        self._epoch_length: int | None = None  # batches of that epoch, known once its last batch is planned
        self._resume: tuple[int, int] | None = None

    @property
    def hot_rows(self) -> RowSet | None:
        """The hot set in force for the current (or next) epoch."""
        return self._hot_rows

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage not in (None, "fit") or self._hot_rows is not None:
            return  # a hot set loaded from a checkpoint wins over a fresh profile
        self._hot_rows = self._check_rowset(_rank_zero_rows(self._initial_hot_rows()))

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self.datamodule.train_dataloader()
        return _PopularityLoader(_TrainStream(self), batch_size=None, num_workers=0)

    # -- hot sets -----------------------------------------------------------------------------------------

    def _initial_hot_rows(self) -> RowSet:
        """The source's hot set for the inner data, cut for the model the Trainer fits (its tables' real bytes per
        row; none when this DataModule is set up on its own)."""
        return resolve_hot_rows(self.hot_rows_source, self.datamodule, trainer_table_bytes(self.trainer))

    def _check_rowset(self, rowset: RowSet) -> RowSet:
        if not isinstance(rowset, RowSet):
            raise TypeError(f"the hot-set source returned {type(rowset)}, expected a RowSet")
        expected = dict(zip(self.sparse_feature_names, self.num_embeddings_per_feature, strict=True))
        for name, size in zip(rowset.feature_names, rowset.num_rows, strict=True):
            if name not in expected or expected[name] != size:
                raise ValueError(f"the hot set names feature {name!r} with {size} rows, but the data has "
                                 f"{expected.get(name, 'no such feature')}: was it profiled on another dataset?")
        if len(rowset) == 0:
            rank_zero_warn("PopularityDataModule: the hot set is empty, so no input is hot and every batch is cold")
        return rowset

    def _counting_epoch(self, epoch: int) -> bool:
        every = self.reprofile_every_n_epochs
        return every is not None and (epoch + 1) % every == 0

    # -- epochs -------------------------------------------------------------------------------------------

    def _num_inner_batches(self) -> int:
        if self._train_loader is None:
            self._train_loader = self.datamodule.train_dataloader()
        return len(self._train_loader)

    def _begin_epoch(self) -> int:
        """The epoch to run and the batches of it to skip (a resumed position)."""
        if self.trainer is not None:
            epoch = self.trainer.current_epoch
        else:
            epoch = self._epoch + 1
        skip = 0
        if self._resume is not None:
            resume_epoch, position = self._resume
            self._resume = None
            if self.trainer is None or resume_epoch == epoch:
                epoch, skip = resume_epoch, position
        if self._next_hot_rows is not None and epoch >= self._next_hot_rows[0]:
            self._hot_rows = self._next_hot_rows[1]
            self._next_hot_rows = None
        self._epoch, self._delivered, self._consumed = epoch, skip, skip
        self._epoch_length = None
        return skip

    def _epoch_batches(self) -> Iterator[PopularityBatch]:
        if self._hot_rows is None:
            raise RuntimeError("PopularityDataModule: call setup('fit') before iterating the training loader")
        if self._train_loader is None:
            self._train_loader = self.datamodule.train_dataloader()
        skip = self._begin_epoch()
        epoch, hot_rows = self._epoch, self._hot_rows
        stats = EpochStats(epoch=epoch, hot_rows=len(hot_rows))
        counting = self._counting_epoch(epoch)
        recent: deque[KeyedJaggedTensor] = deque(maxlen=self.profile_batches)
        counts: list[Tensor] | None = None

        def read(batches: Iterable[Batch]) -> Iterator[Batch]:
            nonlocal counts
            for batch in batches:
                if counting and self.profile_batches is None:
                    counts = count_lookups(batch.sparse_features, self.sparse_feature_names,
                                           self.num_embeddings_per_feature, counts)
                elif counting:
                    recent.append(batch.sparse_features)
                yield batch

        def finish(length: int) -> None:
            nonlocal counts
            if counting:
                for sparse in recent:
                    counts = count_lookups(sparse, self.sparse_feature_names, self.num_embeddings_per_feature, counts)
                if counts is not None:
                    rowset = top_rows(_sum_counts(counts), self.sparse_feature_names, self.hot_rows_budget)
                    self._next_hot_rows = (epoch + 1, self._check_rowset(rowset))
            self.epoch_stats[epoch] = stats
            self._epoch_length = length
            self._log_stats(stats)

        inner = Lookahead(read(self._train_loader))
        planned = plan_stitched(inner, hot_rows, stats) if self.schedule == "stitch" else \
            plan_regrouped(inner, hot_rows, stats, epoch, self.schedule, self.batch_size, self.window_batches,
                           self.shuffle, self.seed)
        position = 0
        for make, last in planned:
            position += 1
            if last:
                # Finish before the last batch leaves: a sized loader is never asked for the batch after it.
                finish(position)
            if position <= skip:
                continue  # resumed: these were delivered before the checkpoint
            self._delivered = position
            yield make()
        if self._epoch_length is None:
            finish(position)

    @rank_zero_only
    def _log_stats(self, stats: EpochStats) -> None:
        if self.trainer is None:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(stats.metrics(), step=self.trainer.global_step)

    # -- position and resume ------------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and isinstance(batch, PopularityBatch):
            self._consumed += 1
        return super().on_before_batch_transfer(batch, dataloader_idx)  # the ID check

    @property
    def position(self) -> int:
        """Batches of the current epoch taken so far: by the training loop under a Trainer, else yielded."""
        return self._consumed if self.trainer is not None else self._delivered

    def state_dict(self) -> dict[str, Any]:
        def rows(rowset: RowSet | None) -> list[Tensor] | None:
            return None if rowset is None else [r.clone() for r in rowset.rows]

        return {
            "epoch": self._epoch,
            "position": self.position,
            "epoch_length": self._epoch_length,
            "hot_rows": rows(self._hot_rows),
            "next_hot_rows": None if self._next_hot_rows is None else
            {"from_epoch": self._next_hot_rows[0], "rows": rows(self._next_hot_rows[1])},
            "schedule": self.schedule,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("schedule", "seed"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(f"PopularityDataModule: the checkpoint was made with {key}={state_dict[key]!r}, "
                                 f"this run has {key}={getattr(self, key)!r}; a resumed epoch would not match")

        def rowset(rows: list[Tensor] | None) -> RowSet | None:
            if rows is None:
                return None
            return self._check_rowset(RowSet(self.sparse_feature_names, self.num_embeddings_per_feature, list(rows)))

        self._hot_rows = rowset(state_dict["hot_rows"])
        pending = state_dict["next_hot_rows"]
        self._next_hot_rows = None if pending is None else (pending["from_epoch"], rowset(pending["rows"]))
        self._epoch = state_dict["epoch"]
        self._epoch_length = state_dict["epoch_length"]
        position = state_dict["position"]
        finished = self._epoch_length is not None and position >= self._epoch_length
        # An unfinished epoch resumes at its position; after a finished one the next iteration starts the next.
        self._resume = None if finished or self._epoch < 0 else (self._epoch, position)

