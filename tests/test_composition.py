"""The composition matrix: {TorchRecStrategy, HotColdStrategy, plain placement} x {no popularity batching, fae,
interleave, stitch} x {no skipper, skipper in the step, skipper repacking in the data pipeline}.

Every cell fits, validates, and resumes from a checkpoint taken after the first of two epochs to the same
per-step losses and validation metrics as the uninterrupted run. The default run holds a covering subset
(every pair of choices in at least one cell: 12 cells); ``LIGHTNING_SKEW_FULL_MATRIX=1`` runs all 36.
Exactness across strategies: under one schedule and skipper, HotColdStrategy trains and drops exactly as
TorchRecStrategy.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from strategy_worker import RecordLosses, make_data, make_model  # noqa: E402

from lightning_skew import (  # noqa: E402
    HotColdStrategy,
    PlainHotColdPlacement,
    PopularityDataModule,
    ProfiledHotRows,
    RepackedDataModule,
    StaleEmbeddingSkipper,
    TorchRecStrategy,
)

STRATEGIES = ("torchrec", "hotcold", "plain")
BATCHING = (None, "fae", "interleave", "stitch")
SKIPPER = (None, "instep", "repack")
ROW_BYTES = 4 * (8 + 1)  # dim 8, rowwise_adagrad
BUDGET = 150 * ROW_BYTES


def covering_cells() -> list[tuple[str, str | None, str | None]]:
    """12 cells in which every pair of (strategy, batching, skipper) choices occurs."""
    return [(STRATEGIES[(b + k) % 3], batching, skipper)
            for b, batching in enumerate(BATCHING) for k, skipper in enumerate(SKIPPER)]


CELLS = list(itertools.product(STRATEGIES, BATCHING, SKIPPER)) if os.environ.get("LIGHTNING_SKEW_FULL_MATRIX") \
    else covering_cells()


def _cell_id(cell: tuple) -> str:
    return "-".join(str(part or "none") for part in cell)


def _fit(cell: tuple, root: Path, epochs: int, ckpt_path: str | None = None, save: Path | None = None) -> dict:
    strategy_name, batching, skipping = cell
    hot_rows = ProfiledHotRows(budget_bytes=BUDGET, embedding_dim=8, sample_fraction=0.5)
    data = make_data(1)
    if batching is not None:
        data = PopularityDataModule(data, schedule=batching, hot_rows=hot_rows, window_batches=4, shuffle=False)
    callbacks: list[pl.Callback] = []
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
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(root), callbacks=[*callbacks, record], num_sanity_val_steps=0,
                         deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, ckpt_path=ckpt_path)
        if save is not None:
            trainer.save_checkpoint(save)
        metrics = trainer.validate(model, data, verbose=False)[0]
    return {"losses": record.losses, "val": metrics,
            "dropped": None if skipper is None else skipper.inputs_dropped,
            "skipped_cold": [c.skipped_cold for c in getattr(trainer.strategy, "collections", dict)().values()]}


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=_cell_id)
def test_every_cell_fits_validates_and_resumes_as_the_uninterrupted_run(cell, tmp_path):
    straight = _fit(cell, tmp_path / "straight", epochs=2)
    first = _fit(cell, tmp_path / "first", epochs=1, save=tmp_path / "epoch1.ckpt")
    resumed = _fit(cell, tmp_path / "resumed", epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))

    assert straight["losses"] and all(loss == loss for loss in straight["losses"])
    assert 0.0 < straight["val"]["val_auc"] < 1.0
    torch.testing.assert_close(first["losses"] + resumed["losses"], straight["losses"], atol=1e-5, rtol=0)
    for name, value in straight["val"].items():
        assert resumed["val"][name] == pytest.approx(value, abs=1e-5), name
    if cell[2] is not None:
        assert straight["dropped"] > 0  # the skipper did skip inputs in this cell
    if cell[0] == "hotcold" and cell[1] == "fae":
        assert straight["skipped_cold"] and straight["skipped_cold"][0] > 0  # hot batches left the cold rows out


@pytest.mark.slow
@pytest.mark.parametrize("batching,skipping", [("fae", "repack"), ("stitch", "instep")])
def test_hot_cold_placement_trains_and_drops_exactly_as_torchrec(batching, skipping, tmp_path):
    plain = _fit(("torchrec", batching, skipping), tmp_path / "torchrec", epochs=1)
    placed = _fit(("hotcold", batching, skipping), tmp_path / "hotcold", epochs=1)
    assert placed["dropped"] == plain["dropped"] > 0
    torch.testing.assert_close(placed["losses"], plain["losses"], atol=1e-5, rtol=0)
    for name, value in plain["val"].items():
        assert placed["val"][name] == pytest.approx(value, abs=1e-5), name
