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
from pathlib import Path

import pytest
import torch

from _support.composition import BATCHING, SKIPPER, STRATEGIES, fit_cell
from _support.launch import launch

WORKER = Path(__file__).with_name("composition_worker.py")


def covering_cells() -> list[tuple[str, str | None, str | None]]:
    """12 cells in which every pair of (strategy, batching, skipper) choices occurs."""
    return [(STRATEGIES[(b + k) % 3], batching, skipper)
            for b, batching in enumerate(BATCHING) for k, skipper in enumerate(SKIPPER)]


CELLS = list(itertools.product(STRATEGIES, BATCHING, SKIPPER)) \
    if os.environ.get("LIGHTNING_SKEW_FULL_MATRIX") or os.environ.get("LIGHTNING_SKEW_FULL_TESTS") \
    else covering_cells()


def _cell_id(cell: tuple) -> str:
    return "-".join(str(part or "none") for part in cell)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=_cell_id)
def test_every_cell_fits_validates_and_resumes_as_the_uninterrupted_run(cell, tmp_path):
    straight = fit_cell(cell, tmp_path / "straight", epochs=2)
    first = fit_cell(cell, tmp_path / "first", epochs=1, save=tmp_path / "epoch1.ckpt")
    resumed = fit_cell(cell, tmp_path / "resumed", epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))

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
    plain = fit_cell(("torchrec", batching, skipping), tmp_path / "torchrec", epochs=1)
    placed = fit_cell(("hotcold", batching, skipping), tmp_path / "hotcold", epochs=1)
    assert placed["dropped"] == plain["dropped"] > 0
    torch.testing.assert_close(placed["losses"], plain["losses"], atol=1e-5, rtol=0)
    for name, value in plain["val"].items():
        assert placed["val"][name] == pytest.approx(value, abs=1e-5), name
    _assert_same_weights(placed["weights"], plain["weights"])


def _assert_same_weights(actual: dict, expected: dict) -> None:
    tables = [k for k in expected if "embedding_bags" in k]
    assert tables and set(actual) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("batching,skipping", [("interleave", "repack"), ("stitch", "instep")])
def test_on_two_ranks_hot_cold_placement_trains_and_drops_exactly_as_torchrec(batching, skipping, tmp_path):
    results = {}
    for strategy in ("torchrec", "hotcold"):
        out = tmp_path / strategy
        launch(WORKER, 2, ["--out", str(out), "--cell", f"{strategy},{batching},{skipping}"], timeout=240)
        results[strategy] = torch.load(out / "result.pt", weights_only=False)
    placed, plain = results["hotcold"], results["torchrec"]
    assert placed["dropped"] == plain["dropped"] > 0
    torch.testing.assert_close(placed["losses"], plain["losses"], atol=1e-5, rtol=0)
    _assert_same_weights(placed["weights"], plain["weights"])
