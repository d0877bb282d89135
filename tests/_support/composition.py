"""One composition cell (strategy x popularity batching x skipper) as a fit, in the test process or as one rank of
composition_worker.py."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_skew import (
    HotColdStrategy,
    PlainHotColdPlacement,
    PopularityDataModule,
    ProfiledHotRows,
    RepackedDataModule,
    StaleEmbeddingSkipper,
    TorchRecStrategy,
)

from _support.small import RecordLosses, make_data, make_model

STRATEGIES = ("torchrec", "hotcold", "plain")
BATCHING = (None, "fae", "interleave", "stitch")
SKIPPER = (None, "instep", "repack")
ROW_BYTES = 4 * (8 + 1)  # dim 8, rowwise_adagrad
BUDGET = 150 * ROW_BYTES


def fit_cell(cell: tuple, root: Path, epochs: int, ckpt_path: str | None = None, save: Path | None = None,
             world_size: int = 1, first_callbacks: tuple[pl.Callback, ...] = ()) -> dict:
    strategy_name, batching, skipping = cell
    hot_rows = ProfiledHotRows(budget_bytes=BUDGET, embedding_dim=8, sample_fraction=0.5)
    data = make_data(world_size)
    if batching is not None:
        data = PopularityDataModule(data, schedule=batching, hot_rows=hot_rows, window_batches=4, shuffle=False)
    callbacks: list[pl.Callback] = list(first_callbacks)
    skipper = None
    if skipping is not None:
        skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=2, target_drop_fraction=0.3, tolerance=0.05,
                                        sample_batches=2, repack=skipping == "repack")
        callbacks.append(skipper)
        if skipping == "repack":
            data = RepackedDataModule(data)
    if strategy_name == "torchrec":
        strategy: object = TorchRecStrategy()
    elif strategy_name == "hotcold":
        strategy = HotColdStrategy(budget_bytes=BUDGET, hot_rows=hot_rows)
    else:
        strategy = "auto"
        callbacks.append(PlainHotColdPlacement(budget_bytes=BUDGET, hot_rows=hot_rows))
    record = RecordLosses()
    model = make_model(data, "rowwise_adagrad")
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(root), callbacks=[*callbacks, record], num_sanity_val_steps=0,
                         deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, ckpt_path=ckpt_path)
        if save is not None:
            trainer.save_checkpoint(save)
        metrics = trainer.validate(model, data, verbose=False)[0]
        # Whole tables in the dataset's ID space (rank zero), whatever the strategy placed where.
        weights = trainer.strategy.unsharded_state_dict() if isinstance(trainer.strategy, TorchRecStrategy) \
            else model.state_dict()
    return {"weights": {k: v.detach().cpu().clone() for k, v in weights.items() if isinstance(v, torch.Tensor)},
            "losses": record.losses, "val": metrics,
            "dropped": None if skipper is None else skipper.inputs_dropped,
            "skipped_cold": [c.skipped_cold for c in getattr(trainer.strategy, "collections", dict)().values()],
            "routed_forwards": [c.routed_forwards for c in getattr(trainer.strategy, "collections", dict)().values()]}
