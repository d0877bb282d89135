"""StaleEmbeddingSkipper: drop training inputs whose lookups only hit embedding rows that stopped moving (Slipstream)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.batch import select_inputs, split_lookups
from lightning_skew.core.decisions import input_weights, replace_inputs, require_decisions, set_decisions
from lightning_skew.core.rowsets import RowSet, lookup_members
from lightning_skew.core.tables import WatchedTable, watched_tables
from lightning_skew.profile.row_sizes import trainer_table_bytes
from lightning_skew.profile.sources import HotSetSource, as_hot_set_source, resolve_hot_rows
from lightning_skew.stale.guard import AccuracyGuard, backed_off
from lightning_skew.stale.staleness import (
    IDLE_CEILING,
    drop_mask,
    keep_at_least_one,
    next_window,
    rows_left,
    sampled_inputs,
    unweighted_lookups,
    weighted_drop,
)
from lightning_skew.stale.tracker import (
    candidates_from_rowset,
    counted_candidates,
    row_changes,
    search_threshold,
    snapshot_rows,
    stale_rows,
)

__all__ = ["StaleEmbeddingSkipper"]


class StaleEmbeddingSkipper(pl.Callback):
    """Finds embedding rows that stopped changing and drops the inputs whose lookups only hit them (Slipstream).

    Every ``evaluate_every_n_steps`` steps it compares the candidate rows with a snapshot taken at the previous
    evaluation: a row is *stale* when its largest per-element absolute change over the window is below the
    threshold. Until the next evaluation, inputs with at least ``min_stale_lookups`` lookups on stale rows are
    removed from the batch in ``on_train_batch_start``, so forward and backward run on the smaller batch. With
    ``repack=True`` they are removed in the data pipeline instead: the training loader's batches are filtered
    as they arrive and the kept inputs are packed into full batches, so the epoch takes fewer, full-size steps
    (the model never sees the dropped inputs, and no step runs on a small batch).
    Rows that move again (popularity drift) leave the stale set at the next evaluation, because every
    evaluation decides afresh from the last window.

    Candidate rows are the rows of ``hot_rows`` (a :class:`~lightning_skew.core.rowsets.RowSet` or a
    :class:`~lightning_skew.profile.HotSetSource` such as :class:`~lightning_skew.profile.ProfiledHotRows`, asked
    for the model's tables at their real bytes per row, as every part sharing it asks), or, when it is
    ``None``, the ``max_candidate_rows`` rows looked up most often in the last ``sample_batches`` batches (all
    ranks): the first snapshot is then taken at step ``evaluate_every_n_steps``, the first decision at twice
    that. A stale set that drops no input of the sample is not applied; while not even every candidate stale
    would drop 1% of the sample (uniform IDs), the wait to the next evaluation doubles, up to
    ``max_idle_windows`` windows. docs/stale.md says more, and why TorchRec's ``ModelDeltaTracker`` is not used.

    The threshold is ``threshold`` when given; else, at every evaluation, a bisection finds the threshold at
    which the share of inputs dropped on the recent batches (up to ``sample_batches`` kept, all ranks together)
    lies within ``tolerance`` of ``target_drop_fraction``.

    Logs (progress bar and logger, every ``log_every_n_steps``): ``stale/drop_share`` (inputs dropped since the
    last log), ``stale/rows``, ``stale/threshold``, ``stale/overhead`` (the callback's own time as a share of
    the wall time of the steps), ``stale/backoffs`` and ``stale/reactivated`` (rows that left the stale set
    because they moved again, since the start).

    Args:
        hot_rows: candidate rows (a ``RowSet`` or a hot-set source, asked once at the start of training);
            ``None`` takes the most looked-up rows of each window.
        max_candidate_rows: rows over all tables that are snapshotted when ``hot_rows`` is ``None``.
        evaluate_every_n_steps: window, in optimizer steps, between snapshots and stale-set decisions.
        threshold: fixed staleness threshold; ``None`` searches one for ``target_drop_fraction``.
        target_drop_fraction: share of inputs to drop (automatic threshold only).
        tolerance: accepted distance of the measured drop share from the target.
        relative: compare the change to the row's largest absolute element instead of absolutely.
        min_stale_lookups: an input is dropped when at least this many of its lookups hit stale rows;
            ``None`` (default) requires all of them.
        sample_batches: recent batches kept as the sample for the threshold search.
        guard_metric: a metric of ``trainer.callback_metrics`` watched after each validation (default
            ``"val_auc"``, what :class:`~lightning_skew.models.DLRMModule` logs; a run that does not log it is
            warned once and trains unguarded); ``None`` disables the accuracy guard.
        guard_mode: ``"max"`` when larger is better (AUC), ``"min"`` when smaller is (log-loss).
        guard_margin: a back-off happens when the metric is worse than its best by more than this.
        backoff_factor: each back-off multiplies the target drop fraction (or the fixed threshold) by this;
            below 1% the skipping pauses for the rest of the run.
        log_every_n_steps: logging interval; default the Trainer's ``log_every_n_steps``.
        repack: drop in the data pipeline and refill full batches from the following inputs, through a
            :class:`~lightning_skew.stale.repack.RepackedDataModule` around the DataModule (or a
            :class:`~lightning_skew.stale.repack.RepackedLoader` around a loader given to ``fit``); the loader then
            has no length, and an epoch ends when its inputs do. Exact resume from checkpoints taken at the end
            of an epoch (Lightning's default).
        repack_min_fill: with ``repack``, a batch goes on as soon as it holds this share of the batch size
            (see :func:`~lightning_skew.stale.repack.repack_batches`): a batch that lost only a few inputs is
            trained as it is instead of being joined with the next one, which costs time at every step.
        keep_one_in: of the inputs the stale set would drop, keep a deterministic one in ``keep_one_in`` (drawn
            from ``seed``, the rank and the input's place in the stream, so a resumed run draws the same) and
            weight its loss by ``keep_one_in``: the dense gradient stays an unbiased estimate of the full
            batch's, and the stale rows still see (scaled) updates, so they can wake up. ``1`` drops them all.
            Needs a model that honours per-input ``weights`` (refused at setup otherwise).
        freeze_stale_lookups: the lookups on stale rows of the inputs trained with weight 1 are served without
            gradient (the batch's ``frozen_sparse``): the input still trains the dense part and its other rows,
            while the fused embedding backward and optimizer skip the stale rows (Slipstream's skipped updates).
            Needs a model that honours ``frozen_sparse`` (refused at setup otherwise).
        seed: seed of the ``keep_one_in`` draws.
        max_idle_windows: while evaluations find nothing to skip, the window doubles up to this many times
            ``evaluate_every_n_steps`` (``1``: a fixed window). Not with ``freeze_stale_lookups``, which freezes
            lookups even where it drops no input.

    .. note::
        A batch is never emptied: when every input would be dropped, its first input is kept. Inputs are
        dropped on each rank from its own batch, so ranks may train on different numbers of inputs; the stale
        set and threshold are the same on every rank (changes and search counts are all-reduced).

    .. note::
        Batches must be ``torchrec.datasets.utils.Batch``-like (``dense_features``, ``sparse_features``,
        ``labels``); their tensors are replaced in place. With gradient accumulation the loss scale of the
        dropped steps changes; TorchRecStrategy forbids accumulation anyway.

    Example::

        trainer = pl.Trainer(strategy=TorchRecStrategy(),
                             callbacks=[StaleEmbeddingSkipper(target_drop_fraction=0.3,
                                                              guard_margin=0.002)])
        trainer.fit(DLRMModule(...), SyntheticDataModule())
    """

    def __init__(
        self,
        hot_rows: RowSet | HotSetSource | None = None,
        max_candidate_rows: int = 200_000,
        evaluate_every_n_steps: int = 100,
        threshold: float | None = None,
        target_drop_fraction: float = 0.3,
        tolerance: float = 0.02,
        relative: bool = False,
        min_stale_lookups: int | None = None,
        sample_batches: int = 8,
        guard_metric: str | None = "val_auc",
        guard_mode: str = "max",
        guard_margin: float = 0.002,
        backoff_factor: float = 0.5,
        log_every_n_steps: int | None = None,
        repack: bool = False,
        repack_min_fill: float = 0.9,
        keep_one_in: int = 1,
        freeze_stale_lookups: bool = False,
        seed: int = 0,
        max_idle_windows: int = 16,
    ) -> None:
        if keep_one_in < 1:
            raise ValueError(f"keep_one_in must be at least 1 (1: drop every droppable input), got {keep_one_in}")
        if max_idle_windows < 1:
            raise ValueError(f"max_idle_windows must be at least 1 (1: a fixed window), got {max_idle_windows}")
        if not 0.0 < repack_min_fill <= 1.0:
            raise ValueError(f"repack_min_fill must lie in (0, 1], got {repack_min_fill}")
        _validate(max_candidate_rows, evaluate_every_n_steps, threshold, target_drop_fraction, tolerance,
                  min_stale_lookups, sample_batches, backoff_factor)
        as_hot_set_source(hot_rows, "StaleEmbeddingSkipper")  # a clear error now for anything else
        self.hot_rows = hot_rows
        self.max_candidate_rows = max_candidate_rows
        self.evaluate_every_n_steps = evaluate_every_n_steps
        self.fixed_threshold = threshold
        self.target_drop_fraction = target_drop_fraction
        self.tolerance = tolerance
        self.relative = relative
        self.min_stale_lookups = min_stale_lookups
        self.sample_batches = sample_batches
        self.guard = AccuracyGuard(guard_metric, guard_mode, guard_margin, owner="StaleEmbeddingSkipper")
        self.backoff_factor = backoff_factor
        self.log_every_n_steps = log_every_n_steps
        self.repack = repack
        self.repack_min_fill = repack_min_fill
        self.keep_one_in = keep_one_in
        self.freeze_stale_lookups = freeze_stale_lookups
        self.seed = seed
        self.max_idle_windows = max_idle_windows
        self.lookups_frozen = 0  # lookups served without gradient (this process, not saved)
        self.lookups_seen = 0
        self.pulled_per_batch: list[int] = []  # repack: inputs read from the loader for each batch trained
        self._fed = False  # repack: a RepackedLoader handed on a batch

        self._fit_trainer: pl.Trainer | None = None  # the ranks agree through its strategy
        self._tables: list[WatchedTable] = []
        self._fixed_candidates: list[Tensor] | None = None
        # Decision state (saved): the current window's candidates and snapshots, the stale set in force.
        self.candidates: list[Tensor] = []
        self.snapshots: list[Tensor] = []
        self.stale: RowSet | None = None
        self.threshold: float = float("nan")
        self.target: float = target_drop_fraction
        self.fixed_scale: float = 1.0
        self.last_evaluation_step: int = -1
        self.window: int = evaluate_every_n_steps  # steps to the next evaluation (longer while nothing is skippable)
        self.evaluations = 0
        self.inputs_seen = 0
        self.inputs_dropped = 0
        self.reactivated = 0  # rows that left the stale set at an evaluation (they moved again), all evaluations
        self.sample_share = 0.0  # drop share of the stale set in force on the sample, all ranks
        # Per-rank state (saved for every rank): recent batches' KJTs.
        self.sample: deque[KeyedJaggedTensor] = deque(maxlen=sample_batches)
        # Logging window (not saved: figures of the interval between two logs).
        self._log_seen = self._log_dropped = 0
        self._own_s = 0.0
        self._log_started: float | None = None
        self.seconds = 0.0  # the callback's own time in this process (not saved)

    # ------------------------------------------------------------------------------------------ identity

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            hot_rows=type(self.hot_rows).__name__ if self.hot_rows is not None else None,
            max_candidate_rows=self.max_candidate_rows, evaluate_every_n_steps=self.evaluate_every_n_steps,
            threshold=self.fixed_threshold, target_drop_fraction=self.target_drop_fraction,
            tolerance=self.tolerance, relative=self.relative, min_stale_lookups=self.min_stale_lookups,
            guard_metric=self.guard.metric, repack=self.repack, keep_one_in=self.keep_one_in,
            freeze_stale_lookups=self.freeze_stale_lookups)

    # ------------------------------------------------------------------------------------------ set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit_trainer = trainer
        if stage != "fit":
            return
        pipeline = getattr(trainer.strategy, "pipeline", None)
        if pipeline is not None and not self.repack:
            raise MisconfigurationException(
                f"StaleEmbeddingSkipper(repack=False) drops inputs from each batch in on_train_batch_start, but "
                f"{type(trainer.strategy).__name__}(pipeline={pipeline!r}) has taken that batch from the loader and "
                "distributed its sparse features a step or two earlier, so the change cannot reach the step. Use "
                "StaleEmbeddingSkipper(repack=True) with lightning_skew.RepackedDataModule (inputs dropped in the data "
                "pipeline, before the pipeline reads them), or pipeline=None.")
        if pipeline is not None and self.freeze_stale_lookups:
            raise MisconfigurationException(
                f"StaleEmbeddingSkipper(freeze_stale_lookups=True) moves the stale lookups of each batch into its "
                f"frozen_sparse in on_train_batch_start and looks them up in a second pass, but "
                f"{type(trainer.strategy).__name__}(pipeline={pipeline!r}) has distributed that batch's sparse "
                "features already and runs one lookup per step. Use freeze_stale_lookups=False, or pipeline=None.")
        decisions = (["weights"] if self.keep_one_in > 1 else []) + (["frozen_sparse"] if self.freeze_stale_lookups
                                                                     else [])
        require_decisions(pl_module, decisions, f"StaleEmbeddingSkipper(keep_one_in={self.keep_one_in}, "
                          f"freeze_stale_lookups={self.freeze_stale_lookups})")
        if trainer.strategy.root_device.type == "cuda" and (not self.repack or self.freeze_stale_lookups):
            rank_zero_warn("StaleEmbeddingSkipper decides in the training step here (repack=False or "
                           "freeze_stale_lookups=True): each step copies its lookups to the host and waits for the "
                           "decision, which stalls the GPU. repack=True with lightning_skew.RepackedDataModule decides "
                           "in the data pipeline instead, before the batch is moved.")
        if trainer.accumulate_grad_batches > 1:
            rank_zero_warn("StaleEmbeddingSkipper with accumulate_grad_batches > 1: dropped inputs change the "
                           "weight of the accumulated micro-batches")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tables = watched_tables(pl_module)
        if not self._tables:
            raise ValueError(f"StaleEmbeddingSkipper: {type(pl_module).__name__} holds no TorchRec "
                             "EmbeddingBagCollection whose rows it could watch")
        if self.hot_rows is not None and self._fixed_candidates is None:
            # The source is asked for this model's tables at their real row sizes, as the other parts sharing it ask.
            hot_set = resolve_hot_rows(self.hot_rows, trainer.datamodule, trainer_table_bytes(trainer))
            self._fixed_candidates = candidates_from_rowset(hot_set, self._tables)
        if self.snapshots:  # resumed: the snapshot belongs to the tables found now
            if [s.shape for s in self.snapshots] != [(c.numel(), t.dim) for c, t in
                                                     zip(self.candidates, self._tables, strict=True)]:
                raise ValueError("StaleEmbeddingSkipper: the checkpoint's snapshots do not match the model's "
                                 "tables; was it saved from another model?")

    # ------------------------------------------------------------------------------------------ per step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if self.repack and not self._fed:
            raise MisconfigurationException(
                "StaleEmbeddingSkipper(repack=True) drops inputs in the data pipeline, but no batch came through it: "
                "wrap the DataModule in lightning_skew.RepackedDataModule, or the training loader in "
                "lightning_skew.stale.repack.RepackedLoader(loader, skipper)")
        with self._timed():
            if not self.repack:
                self._record(batch)
            if self._due(step):
                self._evaluate(step)
            if not self.repack:
                kept = self._kept(batch)
                if kept is not None:
                    # Lightning hands training_step this very object: it takes the kept inputs and their decisions.
                    replace_inputs(batch, select_inputs(batch, kept.to(batch.labels.device)))
            if self.freeze_stale_lookups:
                self._freeze(batch)
            self._log(trainer, pl_module, step)

    def _due(self, step: int) -> bool:
        """Whether ``step`` evaluates: the first at a multiple of the window (counted candidates need a window of
        recent batches first, so not at step 0), then ``window`` steps after the last."""
        if self.last_evaluation_step < 0:
            warming_up = self._fixed_candidates is None and step == 0 and not self.snapshots
            return step % self.evaluate_every_n_steps == 0 and not warming_up
        return step - self.last_evaluation_step >= self.window

    def record_read(self, inputs: int) -> None:
        """The data pipeline read ``inputs`` inputs for the batch it hands on next (repack mode)."""
        self.pulled_per_batch.append(inputs)
        self._fed = True

    def kept_inputs(self, batch: Any) -> Tensor | None:
        """Positions of the inputs of ``batch`` that the stale set in force keeps (at least one; ``None`` when
        it keeps all), with ``batch`` recorded in the sample and the counts. The data-pipeline path of
        ``repack``."""
        with self._timed():
            self._record(batch)
            return self._kept(batch)

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Counts the time inside as the callback's own (for ``stale/overhead`` and ``seconds``)."""
        began = time.perf_counter()
        if self._log_started is None:
            self._log_started = began
        try:
            yield
        finally:
            ended = time.perf_counter()
            self.seconds += ended - began
            # A log inside the block starts a new window at its own moment: only the time after it counts in it.
            self._own_s += ended - max(began, self._log_started or began)

    def _record(self, batch: Any) -> None:
        sparse = getattr(batch, "sparse_features", None)
        if not isinstance(sparse, KeyedJaggedTensor):
            raise TypeError(f"StaleEmbeddingSkipper needs torchrec Batch-like batches with a KeyedJaggedTensor in "
                            f"sparse_features, got {type(batch).__name__}")
        self.sample.append(sparse.to(torch.device("cpu")))

    def _kept(self, batch: Any) -> Tensor | None:
        """Positions of the inputs of the last recorded batch to keep (``None``: all), counted; with
        ``keep_one_in`` the kept share of the droppable ones is weighted on ``batch`` (its ``weights``)."""
        size = batch.sparse_features.stride()
        kept = None
        dropped = 0
        if self.stale is not None and self.sample_share > 0:
            droppable = drop_mask(self.sample[-1], self.stale, self.min_stale_lookups)
            drop = droppable
            if self.keep_one_in > 1:
                sampled = sampled_inputs(size, self.keep_one_in, self.seed, self._rank(),
                                         self.inputs_seen)
                drop, weights = weighted_drop(droppable, sampled, self.keep_one_in)
                set_decisions(batch, weights=weights.to(batch.labels.device))
            drop = keep_at_least_one(drop)
            dropped = int(drop.sum())
            if dropped:
                kept = torch.nonzero(~drop).flatten()
        self.inputs_seen += size
        self.inputs_dropped += dropped
        self._log_seen += size
        self._log_dropped += dropped
        return kept

    def _freeze(self, batch: Any) -> None:
        """Serve the stale lookups of the inputs of weight 1 without gradient (``batch.frozen_sparse``). Once a
        stale set is in force every rank freezes (an empty set of lookups, if it has none): a sharded model then
        runs its extra lookup on every rank alike."""
        sparse = batch.sparse_features
        if self.stale is None:  # (a stale set that drops no input still freezes lookups)
            set_decisions(batch, weights=input_weights(batch), frozen_sparse=None)
            return
        weights = input_weights(batch)
        member = lookup_members(sparse, self.stale) & unweighted_lookups(sparse, weights)  # weighted: all rows train
        fresh, frozen = split_lookups(sparse, member)
        batch.sparse_features = fresh
        set_decisions(batch, weights=weights, frozen_sparse=frozen)
        self.lookups_frozen += int(member.sum())
        self.lookups_seen += member.numel()

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        every = self.log_every_n_steps or max(trainer.log_every_n_steps, 1)
        if step % every or self._log_seen == 0:
            return
        now = time.perf_counter()
        wall = max(now - (self._log_started or now), 1e-9)
        stale_rows = len(self.stale) if self.stale is not None else 0
        figures = {"stale/drop_share": self._log_dropped / self._log_seen, "stale/rows": float(stale_rows),
                   "stale/threshold": 0.0 if self.threshold != self.threshold else self.threshold,
                   "stale/overhead": self._own_s / wall, "stale/backoffs": float(self.guard.backoffs),
                   "stale/reactivated": float(self.reactivated)}
        for name, value in figures.items():
            pl_module.log(name, value, prog_bar=name in ("stale/drop_share", "stale/rows"), on_step=True,
                          on_epoch=False, batch_size=1)
        self._log_seen = self._log_dropped = 0
        self._own_s = 0.0
        self._log_started = now

    # ------------------------------------------------------------------------------------------ ranks

    def _rank(self) -> int:
        return self._fit_trainer.global_rank if self._fit_trainer is not None else 0

    def _reduce(self, tensor: Tensor, op: str) -> Tensor:
        """``tensor`` summed or maxed over the ranks, through the Trainer's strategy (as Lightning's callbacks agree)."""
        trainer = self._fit_trainer
        if trainer is None or trainer.world_size == 1:
            return tensor
        strategy = trainer.strategy
        return strategy.reduce(tensor.to(strategy.root_device, copy=True), reduce_op=op).to(tensor.device)

    # ------------------------------------------------------------------------------------------ decisions

    @torch.no_grad()
    def _evaluate(self, step: int) -> None:
        if self.snapshots:
            changes = row_changes(self._tables, self.candidates, self.snapshots, self.relative, self._reduce)
            fixed = None if self.fixed_threshold is None else self.fixed_threshold * self.fixed_scale
            self.threshold, self.sample_share, ceiling = search_threshold(
                self._tables, self.candidates, changes, list(self.sample), self.target, self.tolerance, fixed,
                self.min_stale_lookups, self._reduce)
            self.window = next_window(self.window, self.evaluate_every_n_steps, self.max_idle_windows,
                                      idle=ceiling < IDLE_CEILING and not self.freeze_stale_lookups)
            previous = self.stale
            self.stale = stale_rows(self._tables, self.candidates, changes, self.threshold)
            self.reactivated += rows_left(previous, self.stale)
            self.evaluations += 1
        self.candidates = self._fixed_candidates if self._fixed_candidates is not None else \
            counted_candidates(self._tables, self.sample, self.max_candidate_rows, self._reduce)
        self.snapshots = snapshot_rows(self._tables, self.candidates, self._reduce)
        self.last_evaluation_step = step

    # ------------------------------------------------------------------------------------------ accuracy guard

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only validations inside a fit judge the skipping: not the sanity check, not a standalone trainer.validate()
        # (the conditions of Lightning's EarlyStopping; a hook called outside any Trainer function, as a unit test
        # does, still counts).
        if trainer.state.fn not in (None, TrainerFn.FITTING) or trainer.sanity_checking:
            return
        value = self.guard.fell(trainer.callback_metrics)
        # Every rank backs off when any saw the metric fall (as EarlyStopping stops all when any rank would).
        if not trainer.strategy.reduce_boolean_decision(value is not None, all=False):
            return
        if value is None:  # another rank's metric fell: count the back-off here too
            self.guard.backoffs += 1
            value = float(trainer.callback_metrics.get(self.guard.metric, float("nan")))
        if self.fixed_threshold is not None:
            self.fixed_scale *= self.backoff_factor
            what = f"threshold now {self.fixed_threshold * self.fixed_scale:.3g}"
        else:
            self.target = backed_off(self.target, self.backoff_factor)
            what = f"target drop fraction now {self.target:.3g}" + (" (skipping paused)" if not self.target else "")
        self.stale = None  # takes effect now, not at the next evaluation
        rank_zero_info(f"StaleEmbeddingSkipper: {self.guard.metric} {value:.4f} fell more than {self.guard.margin} "
                       f"below its best {self.guard.best:.4f}; backing off ({what})")

    # ------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        local = {"sample": [(kjt.keys(), kjt.values(), kjt.lengths()) for kjt in self.sample]}
        # Every rank's window, so each resumes its own (dump_checkpoint runs on all ranks): each rank's in turn.
        strategy = self._fit_trainer.strategy if self._fit_trainer is not None else None
        world_size = self._fit_trainer.world_size if self._fit_trainer is not None else 1
        per_rank = [local] if strategy is None or world_size == 1 else \
            [strategy.broadcast(local, src=r) for r in range(world_size)]
        return {
            "candidates": self.candidates, "snapshots": self.snapshots,
            "stale": None if self.stale is None else (self.stale.feature_names, self.stale.num_rows, self.stale.rows),
            "threshold": self.threshold, "target": self.target, "fixed_scale": self.fixed_scale,
            "last_evaluation_step": self.last_evaluation_step, "window": self.window, "evaluations": self.evaluations,
            "backoffs": self.guard.backoffs, "best_metric": self.guard.best, "inputs_seen": self.inputs_seen,
            "inputs_dropped": self.inputs_dropped, "sample_share": self.sample_share, "reactivated": self.reactivated,
            "fixed_candidates": self._fixed_candidates, "per_rank": per_rank,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.candidates = list(state_dict["candidates"])
        self.snapshots = list(state_dict["snapshots"])
        stale = state_dict["stale"]
        self.stale = None if stale is None else RowSet(*stale)
        for name in ("threshold", "target", "fixed_scale", "last_evaluation_step", "evaluations", "inputs_seen",
                     "inputs_dropped", "sample_share"):
            setattr(self, name, state_dict[name])
        self.guard.backoffs, self.guard.best = state_dict["backoffs"], state_dict["best_metric"]
        self.reactivated = state_dict.get("reactivated", 0)  # absent from checkpoints of earlier versions
        self.window = state_dict.get("window", self.evaluate_every_n_steps)
        self._fixed_candidates = state_dict["fixed_candidates"]
        per_rank = state_dict["per_rank"]
        rank = self._rank()
        if len(per_rank) != (self._fit_trainer.world_size if self._fit_trainer is not None else 1):
            raise ValueError(f"StaleEmbeddingSkipper: the checkpoint was written by {len(per_rank)} rank(s); resume "
                             "it on the same number")
        own = per_rank[rank]
        self.sample = deque((KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths)
                             for keys, values, lengths in own["sample"]), maxlen=self.sample_batches)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _validate(max_candidate_rows: int, every: int, threshold: float | None, target: float, tolerance: float,
              min_stale_lookups: int | None, sample_batches: int, backoff_factor: float) -> None:
    if max_candidate_rows < 1 or every < 1 or sample_batches < 1:
        raise ValueError(f"max_candidate_rows, evaluate_every_n_steps and sample_batches must be positive, got "
                         f"{max_candidate_rows}, {every}, {sample_batches}")
    if threshold is not None and threshold < 0:
        raise ValueError(f"threshold must be >= 0 (or None for the automatic search), got {threshold}")
    if not 0.0 <= target < 1.0 or not 0.0 <= tolerance < 1.0:
        raise ValueError(f"target_drop_fraction and tolerance must lie in [0, 1), got {target}, {tolerance}")
    if min_stale_lookups is not None and min_stale_lookups < 1:
        raise ValueError(f"min_stale_lookups must be >= 1 or None (all lookups), got {min_stale_lookups}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"backoff_factor must lie in (0, 1), got {backoff_factor}")
