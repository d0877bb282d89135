"""Three users' models, each with its own DataModule, under every technique alone and all together: each cell fits,
validates and checkpoints (one cell per model also resumes), or refuses at setup naming both parts and what to do.

The models (tests/_support/user_models.py): a DeepFM with dimension-1 first-order tables on a RecDataModule of the
user's, a two-tower model on MovieLens-100k through ColumnarDataModule (when .data/ml-100k is present), and a model
with plain ``torch.nn.EmbeddingBag`` tables on a plain LightningDataModule.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_skew import (
    ColumnarDataModule,
    HotColdStrategy,
    PlainHotColdPlacement,
    PopularityDataModule,
    ProfiledHotRows,
    RepackedDataModule,
    StaleEmbeddingSkipper,
    TorchRecStrategy,
)

from _support.user_models import FEATURES, DeepFM, PlainBags, PlainClicks, TwoTower, UserClicks

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT / ".data" / "ml-100k"
BUDGET = 3000


def movielens() -> ColumnarDataModule:
    init = yaml.safe_load((ROOT / "recipes" / "dlrm_movielens.yaml").read_text())["data"]["init_args"]
    return ColumnarDataModule(**{**init, "root": str(MOVIELENS), "batch_size": 4096})


MODELS = {
    "deepfm": lambda: (DeepFM(), UserClicks()),
    "twotower": lambda: (TwoTower(), movielens()),
    "plainbags": lambda: (PlainBags(list(FEATURES), PlainClicks.SIZES, 2), PlainClicks()),
}


def hot_rows() -> ProfiledHotRows:
    return ProfiledHotRows(BUDGET, embedding_dim=8, sample_fraction=1.0)


def technique(name: str, data: pl.LightningDataModule):
    """(strategy, callbacks, data) of one technique, or of all together."""
    if name == "torchrec":
        return TorchRecStrategy(), [], data
    if name == "hotcold":
        return HotColdStrategy(budget_bytes=BUDGET), [], data
    if name == "plain_placement":
        return "auto", [PlainHotColdPlacement(budget_bytes=BUDGET)], data
    if name == "popularity":
        return "auto", [], PopularityDataModule(data, schedule="interleave", hot_rows=hot_rows())
    if name == "skipper":
        return "auto", [StaleEmbeddingSkipper(repack=True, evaluate_every_n_steps=2,
                                              sample_batches=2)], RepackedDataModule(data)
    assert name == "all"
    # One hot set for all parts, cut for DeepFM's rows of two tables per feature (44 bytes, not the source's 36).
    source = ProfiledHotRows(BUDGET * 36 // 44, embedding_dim=8, sample_fraction=1.0)
    return (HotColdStrategy(budget_bytes=BUDGET, hot_rows=source),
            [StaleEmbeddingSkipper(repack=True, evaluate_every_n_steps=2, sample_batches=2, hot_rows=source)],
            RepackedDataModule(PopularityDataModule(data, schedule="interleave", hot_rows=source)))


# What a cell must refuse, and the words its error must hold (both parts named, and what to do).
REFUSED = {
    ("deepfm", "plain_placement"): ("PlainHotColdPlacement needs one embedding dimension", "place_hot_cold"),
    ("plainbags", "torchrec"): ("PlainBags holds no TorchRec EmbeddingBagCollection; TorchRecStrategy", "ddp"),
    ("plainbags", "hotcold"): ("PlainBags holds no TorchRec EmbeddingBagCollection", "EmbeddingBagCollection"),
    ("plainbags", "plain_placement"): ("PlainBags holds no TorchRec EmbeddingBagCollection", "docs/models.md"),
    ("plainbags", "popularity"): ("datamodule must be a RecDataModule", "PlainClicks"),
    ("plainbags", "all"): ("RecDataModule", "PlainClicks"),
}
TECHNIQUES = ["torchrec", "hotcold", "plain_placement", "popularity", "skipper", "all"]
# A few cells by default; LIGHTNING_SKEW_FULL_SUITE=1 runs all 18.
DEFAULT_CELLS = {("deepfm", "all"), ("deepfm", "hotcold"), ("twotower", "all"), ("twotower", "plain_placement"),
                 ("plainbags", "skipper"), ("plainbags", "hotcold"), ("deepfm", "plain_placement")}
FULL = bool(__import__("os").environ.get("LIGHTNING_SKEW_FULL_SUITE"))
CELLS = [(m, t) for m in MODELS for t in TECHNIQUES if FULL or (m, t) in DEFAULT_CELLS]


def fit(model, data, strategy, callbacks, root: Path, epochs: int = 1, ckpt_path: str | None = None) -> pl.Trainer:
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, callbacks=[*callbacks, checkpoint],
                         max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=2,
                         default_root_dir=str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(("model_name", "technique_name"), CELLS, ids=[f"{m}-{t}" for m, t in CELLS])
def test_a_users_model_fits_validates_and_checkpoints_or_is_refused_at_setup(model_name, technique_name, tmp_path):
    if model_name == "twotower" and not MOVIELENS.is_dir():
        pytest.skip("MovieLens-100k is not in .data/ml-100k")
    model, data = MODELS[model_name]()
    refused = REFUSED.get((model_name, technique_name))
    if refused is not None:
        with pytest.raises(Exception) as error:
            strategy, callbacks, data = technique(technique_name, data)
            fit(model, data, strategy, callbacks, tmp_path)
        assert all(words in str(error.value) for words in refused), str(error.value)
        return
    strategy, callbacks, data = technique(technique_name, data)
    trainer = fit(model, data, strategy, callbacks, tmp_path)
    assert trainer.global_step > 0 and 0 < float(trainer.callback_metrics["val_auc"]) < 1
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_users_model_resumes_from_its_checkpoint(model_name, tmp_path):
    if model_name == "twotower" and not MOVIELENS.is_dir():
        pytest.skip("MovieLens-100k is not in .data/ml-100k")
    name = {"deepfm": "hotcold", "twotower": "torchrec", "plainbags": "plain_lightning"}[model_name]
    model, data = MODELS[model_name]()
    strategy = "auto" if name == "plain_lightning" else technique(name, data)[0]
    first = fit(model, data, strategy, [], tmp_path)
    model, data = MODELS[model_name]()
    strategy = "auto" if name == "plain_lightning" else technique(name, data)[0]
    resumed = fit(model, data, strategy, [], tmp_path, epochs=2, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert resumed.global_step == 2 * first.global_step > 0
    assert 0 < float(resumed.callback_metrics["val_auc"]) < 1


def test_a_users_model_gains_every_technique_from_a_yaml_recipe(tmp_path):
    # DeepFM sized by its DataModule (the CLI links the sizes to the model's like-named arguments), under the hot/cold
    # strategy, popularity batching and the repacking skipper, with one hot-set source; fit, then resume.
    import subprocess

    recipe = tmp_path / "deepfm_all.yaml"
    recipe.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  strategy: {{class_path: lightning_skew.HotColdStrategy, init_args: {{budget_bytes: {BUDGET}}}}}
  max_epochs: 1
  num_sanity_val_steps: 0
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_skew.StaleEmbeddingSkipper
      init_args:
        repack: true
        evaluate_every_n_steps: 2
        sample_batches: 2
        hot_rows: &hot_rows
          class_path: lightning_skew.ProfiledHotRows
          init_args: {{budget_bytes: {BUDGET * 36 // 44}, embedding_dim: 8, sample_fraction: 1.0}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / "checkpoints"}, save_last: true}}
model:
  class_path: user_models.DeepFM
data:
  class_path: lightning_skew.RepackedDataModule
  init_args:
    datamodule:
      class_path: lightning_skew.PopularityDataModule
      init_args:
        schedule: interleave
        hot_rows: *hot_rows
        datamodule: {{class_path: user_models.UserClicks}}
""")
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / '_support'}", "PYTHONWARNINGS": "ignore"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)

    def run(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "lightning_skew.cli", "fit", "--config", str(recipe), *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    first = run()
    assert "val: auc 0." in first and "first_order_user__" in first and "data_parallel" in first
    resumed = run("--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"))
    assert "val: auc 0." in resumed


def test_a_plain_embedding_bag_model_on_a_plain_datamodule_names_its_table_when_an_id_is_out_of_range(tmp_path):
    model = PlainBags(list(FEATURES), [5, *PlainClicks.SIZES[1:]], 2)  # 'user' IDs reach 59
    with pytest.raises(ValueError, match=r"PlainClicks \(train batch\): feature 'user' has ID \d+ outside its table "
                                         r"of 5 rows .*table 'bags.user'"):
        fit(model, PlainClicks(), "auto", [], tmp_path)
