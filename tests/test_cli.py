"""The ``lightning-skew`` command: recipes run end to end, configs survive --print_config and are saved."""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import pytest
import yaml

from _support.cli import ROOT, SMALL
from _support.cli import run_command as _cli

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

def _printed_config(args: list[str], capsys) -> str:
    # In this process (the same parser as the command's, without a second interpreter start per recipe):
    # --print_config prints the whole config and exits before anything is built.
    from lightning_skew.cli import run_cli

    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exit_info:
            run_cli(["fit", *args, "--print_config"])
    assert not exit_info.value.code, capsys.readouterr().err[-3000:]
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_survives_print_config(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = []
    if "criteo" in recipe.name:
        extra = ["--data.init_args.train_paths", "[/data/criteo/day_0]"]
    printed = _printed_config(["--config", str(recipe), *extra], capsys)
    config = yaml.safe_load(printed)
    assert config["trainer"]["strategy"]["class_path"] in ("lightning_skew.TorchRecStrategy",
                                                           "lightning_skew.HotColdStrategy")
    assert config["trainer"]["logger"]["init_args"]["offline"] is True  # no account, no network
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert yaml.safe_load(_printed_config(["--config", str(saved)], capsys)) == config


def test_default_recipe_trains_saves_its_config_and_reports_quality(tmp_path):
    run = _cli("fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic.yaml"), *SMALL, cwd=tmp_path)
    assert "val: auc" in run.stdout and "logloss" in run.stdout and "best attainable auc" in run.stdout
    run_dir = tmp_path / "runs" / "dlrm_synthetic"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["init_args"]["max_rows_per_table"] == 500
    assert "t_cat_0" in (run_dir / "sharding_plan.txt").read_text()
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert (checkpoint / "meta.pt").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb did not record the run offline"
    # The saved config and the sharded checkpoint drive a later command.
    validated = _cli("validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint),
                     cwd=tmp_path)
    assert "val: auc" in validated.stdout


def test_popularity_recipe_profiles_regroups_and_trains(tmp_path):
    inner = "--data.init_args.datamodule.init_args."
    small = [f"{inner}max_rows_per_table", "500", f"{inner}num_train_samples", "8192", f"{inner}num_val_samples",
             "4096", f"{inner}batch_size", "1024", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar",
             "false", "--data.init_args.hot_rows.init_args.budget_bytes", "20000"]
    run = _cli("fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic_popularity.yaml"), *small, cwd=tmp_path)
    assert "val: auc" in run.stdout
    summary = next((tmp_path / "runs" / "dlrm_synthetic_popularity" / "wandb").glob("offline-run-*"))
    assert summary.is_dir()


def test_hot_cold_recipe_places_rows_rebalances_and_trains(tmp_path):
    inner = "--data.init_args.datamodule.init_args."
    small = [f"{inner}max_rows_per_table", "500", f"{inner}num_train_samples", "8192", f"{inner}num_val_samples",
             "4096", f"{inner}batch_size", "1024", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar",
             "false", "--data.init_args.hot_rows.init_args.budget_bytes", "20000",
             "--trainer.strategy.init_args.budget_bytes", "20000",
             "--trainer.strategy.init_args.rebalance_every_n_steps", "3"]
    run = _cli("fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic_hotcold.yaml"), *small, cwd=tmp_path)
    assert "val: auc" in run.stdout
    output = run.stdout + run.stderr
    # The strategy cuts the profile the DataModule's source made (one pass), it does not read the DataModule.
    assert "Hot/cold placement (hot set: profile of 5% of the training batches)" in output
    assert "HotColdStrategy rebalance at step 3" in output
    run_dir = tmp_path / "runs" / "dlrm_synthetic_hotcold"
    assert "split" in (run_dir / "hot_cold_placement.txt").read_text()
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert (checkpoint / "meta.pt").is_file()
    # The checkpoint holds whole tables in the data's row IDs: the hot/cold run validates from it, and so does a
    # plain TorchRecStrategy run.
    hot_cold = _cli("validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint),
                    cwd=tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["trainer"]["strategy"] = {"class_path": "lightning_skew.TorchRecStrategy"}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(config))
    plain = _cli("validate", "--config", str(tmp_path / "plain.yaml"), "--ckpt_path", str(checkpoint), cwd=tmp_path)
    scores = [re.search(r"val: auc ([0-9.]+), logloss ([0-9.]+)", run.stdout).groups() for run in (hot_cold, plain)]
    assert scores[0] == scores[1]  # the same model, whichever strategy loads it


def test_all_techniques_recipe_trains_with_one_hot_set_for_all_parts(tmp_path):
    inner = "--data.init_args.datamodule.init_args."
    data = inner + "datamodule.init_args."
    small = [f"{data}max_rows_per_table", "500", f"{data}num_train_samples", "16384", f"{data}num_val_samples",
             "4096", f"{data}batch_size", "512", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
             f"{inner}hot_rows.init_args.budget_bytes", "20000", "--trainer.strategy.init_args.budget_bytes", "20000"]
    run = _cli("fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic_all.yaml"), *small, cwd=tmp_path)
    assert "val: auc" in run.stdout
    output = run.stdout + run.stderr
    assert "Hot/cold placement (hot set: profile of 5% of the training batches)" in output
    run_dir = tmp_path / "runs" / "dlrm_synthetic_all"
    assert "split" in (run_dir / "hot_cold_placement.txt").read_text()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    skipper = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("StaleEmbeddingSkipper"))
    assert skipper["init_args"]["repack"] is True
    # The skipper and the popularity DataModule name the same source (the anchor); only the budget was overridden.
    shared = config["data"]["init_args"]["datamodule"]["init_args"]["hot_rows"]
    assert skipper["init_args"]["hot_rows"]["class_path"] == shared["class_path"] == "lightning_skew.ProfiledHotRows"
    assert {**skipper["init_args"]["hot_rows"]["init_args"], "budget_bytes": 20000} == shared["init_args"]


def _criteo_tsv(path: Path, count: int, seed: int) -> str:
    """Lines in Criteo's format: label, 13 integers (some negative), 26 hexadecimal hashes, some fields empty."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        dense = ["" if rng.random() < 0.2 else str(rng.randint(-2, 5000)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.getrandbits(32):08x}" for _ in range(26)]
        lines.append("\t".join([str(rng.randint(0, 1)), *dense, *cats]) + "\n")
    path.write_text("".join(lines))
    return str(path)


@pytest.mark.parametrize("recipe", ["dlrm_criteo_kaggle", "dlrm_criteo_terabyte"])
def test_criteo_recipe_fits_on_every_input_as_shipped(recipe, tmp_path):
    train = _criteo_tsv(tmp_path / "day_0", 300, seed=0)
    val = _criteo_tsv(tmp_path / "day_1", 100, seed=1)
    small = ["--data.init_args.train_paths", f"[{train}]", "--data.init_args.val_paths", f"[{val}]",
             "--data.init_args.max_rows_per_table", "100", "--data.init_args.batch_size", "64",
             "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]
    # Warnings shown: the command must not trigger LightningCLI's "args parameter" warning.
    run = _cli("fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"), *small, cwd=tmp_path, show_warnings=True)
    assert "LightningCLI's args parameter" not in run.stdout + run.stderr
    assert "deprecat" not in (run.stdout + run.stderr).lower()  # upstream deprecations filtered (core/upstream.py)
    # The recipe validates every 4,800 batches; a fit of 5 still ends with the metrics of its final weights.
    assert re.search(r"val: auc 0\.\d+, logloss \d\.\d+", run.stdout), run.stdout[-2000:]
    run_dir = tmp_path / "runs" / recipe
    # 300 lines in batches of 64: four full batches and a last one of 44, all trained.
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert "step=5" in checkpoint.name, checkpoint.name
    plan = (run_dir / "sharding_plan.txt").read_text()
    assert "t_C1" in plan and "t_C26" in plan and "cat_" not in plan  # the data set's own column names
    if recipe == "dlrm_criteo_kaggle":  # the saved config and checkpoint validate on every validation line
        validated = _cli("validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint),
                         cwd=tmp_path)
        assert re.search(r"val: auc 0\.\d+, logloss \d\.\d+", validated.stdout), validated.stdout[-2000:]


def test_each_fit_gets_its_own_run_folder_and_says_where(tmp_path):
    # A second fit of the same recipe (here on 2 processes) used to write into the first one's folder: its
    # config.yaml replaced the first's, and `validate --config` of the first then started 2 processes.
    first = _cli("fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic.yaml"), *SMALL, cwd=tmp_path)
    second = _cli("fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic.yaml"), *SMALL, "--trainer.devices", "2",
                  cwd=tmp_path)
    assert "run folder: runs/dlrm_synthetic (" in first.stdout
    assert "run folder: runs/dlrm_synthetic-2 (" in second.stdout
    runs = tmp_path / "runs"
    assert yaml.safe_load((runs / "dlrm_synthetic" / "config.yaml").read_text())["trainer"]["devices"] == 1
    config = yaml.safe_load((runs / "dlrm_synthetic-2" / "config.yaml").read_text())
    assert str(config["trainer"]["devices"]) == "2" and config["trainer"]["default_root_dir"] == "runs/dlrm_synthetic-2"
    assert len(list((runs / "dlrm_synthetic" / "checkpoints").iterdir())) == 1
    assert len(list((runs / "dlrm_synthetic-2" / "checkpoints").iterdir())) == 1
    assert (runs / "dlrm_synthetic-2" / "sharding_plan.txt").is_file()
