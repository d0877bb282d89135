"""The columnar recipes end to end: MovieLens-100k (the real files) and Avazu (a small file in its format)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from lightning_skew import (
    ColumnarDataModule,
    DLRMModule,
    PopularityDataModule,
    ProfiledHotRows,
    StaleEmbeddingSkipper,
    TorchRecStrategy,
)

from _support.cli import Command, start_command
from _support.columnar_files import MOVIELENS, MOVIELENS_MISSING, ROOT, avazu_rows, write_avazu

MOVIELENS_RECIPE = ROOT / "recipes" / "dlrm_movielens.yaml"
AVAZU_RECIPE = ROOT / "recipes" / "dlrm_avazu.yaml"
needs_movielens = pytest.mark.skipif(not (MOVIELENS / "ml-100k.inter").is_file(), reason=MOVIELENS_MISSING)


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> dict[str, tuple[Command, Path]]:
    """The module's commands, each in its own folder, started together when the first test needs one: they run side
    by side (and beside the in-process test), each test then waits for its own."""
    started = {}
    if (MOVIELENS / "ml-100k.inter").is_file():
        folder = tmp_path_factory.mktemp("movielens_fit")
        started["movielens_fit"] = (start_command(
            "fit", "--config", str(MOVIELENS_RECIPE), "--data.init_args.root", str(MOVIELENS), "--trainer.max_epochs",
            "1", "--trainer.enable_progress_bar", "false", cwd=folder), folder)
        folder = tmp_path_factory.mktemp("movielens_profile")
        started["movielens_profile"] = (start_command(
            "profile", "--config", str(MOVIELENS_RECIPE), "--data.init_args.root", str(MOVIELENS), "--budget", "40kB",
            "--sample-fraction", "1", "--output-dir", str(folder / "profile"), "--no-wandb", "--no-progress",
            cwd=folder), folder)
    folder = tmp_path_factory.mktemp("avazu")
    train = write_avazu(folder / "train.csv.gz", avazu_rows(8000, days=3), compress=True)
    started["avazu"] = (start_command(
        "fit", "--config", str(AVAZU_RECIPE), "--data.init_args.train_paths", f"[{train}]",
        "--data.init_args.batch_size", "500", "--trainer.enable_progress_bar", "false", cwd=folder), folder)
    yield started
    for command, _ in started.values():
        command.result(check=False)  # waited for, whichever tests ran


def _auc(stdout: str) -> float:
    match = re.search(r"val: auc ([0-9.]+), logloss ([0-9.]+)", stdout)
    assert match, stdout[-2000:]
    return float(match.group(1))


@needs_movielens
def test_movielens_recipe_trains_under_torchrec_strategy_to_the_measured_auc(commands):
    command, tmp_path = commands["movielens_fit"]
    run = command.result()
    # Measured: 0.698 after one epoch (0.703 after the recipe's two); a model that learned nothing gives 0.5.
    assert _auc(run.stdout) > 0.68
    run_dir = tmp_path / "runs" / "dlrm_movielens"
    plan = (run_dir / "sharding_plan.txt").read_text()
    assert all(f"t_{name}" in plan for name in ("user_id", "item_id", "genres"))
    # The tables the vocabularies made: 751 users and 1616 items rated in the training time and 19 genres, each
    # table with its missing and out-of-vocabulary rows.
    assert all(f"[{rows}, 16]" in plan for rows in (753, 1618, 21))


@needs_movielens
def test_the_profile_command_runs_on_movielens(commands):
    command, tmp_path = commands["movielens_profile"]
    output = tmp_path / "profile"
    run = command.result()
    assert "profiled 79999 inputs" in run.stdout  # every training row: 78 batches of 1024 and one of 127
    assert "genres" in run.stdout and "item_id" in run.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert summary and (output / "profile.pt").is_file()


@needs_movielens
def test_popularity_batching_and_the_stale_skipper_run_on_movielens():
    init = yaml.safe_load(MOVIELENS_RECIPE.read_text())["data"]["init_args"]
    data = ColumnarDataModule(**{**init, "root": str(MOVIELENS), "batch_size": 2048})
    hot_rows = ProfiledHotRows(budget_bytes=60_000, sample_fraction=0.5)
    popularity = PopularityDataModule(data, schedule="fae", hot_rows=hot_rows)
    skipper = StaleEmbeddingSkipper(hot_rows=hot_rows, evaluate_every_n_steps=10, sample_batches=4)
    pl.seed_everything(0)
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       embedding_dim=16, over_arch_layer_sizes=[64, 32, 1])
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, callbacks=[skipper])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, popularity)
    stats = popularity.epoch_stats[0]
    assert stats.inputs == 79999 and stats.hot_batches > 0 and stats.cold_batches > 0
    assert skipper.inputs_seen == stats.inputs - stats.inputs_dropped
    assert float(trainer.callback_metrics["val_auc"]) > 0.6


def test_avazu_recipe_trains_on_a_file_in_avazus_format(commands):
    command, tmp_path = commands["avazu"]
    run = command.result()
    # The clicks follow site_id (each site its own click rate, about 0.75 attainable).
    assert _auc(run.stdout) > 0.6
    plan = (tmp_path / "runs" / "dlrm_avazu" / "sharding_plan.txt").read_text()
    assert "t_device_ip" in plan and "t_C21" in plan
