"""NaN and infinity do not train silently: readers refuse non-finite dense values by default (or read them as 0
when told), and a fit whose loss diverges stops with an error naming the step and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightning_skew import (
    ColumnarDataModule,
    DLRMModule,
    NonFiniteLossStop,
    SyntheticDataModule,
    TorchRecStrategy,
)
from lightning_skew.core.divergence import NonFiniteLossError

from _support.criteo_files import SIZES, criteo_line, random_lines, write_tsv


def _batches(module: ColumnarDataModule) -> list:
    module.setup("fit")
    return list(module.train_dataloader())


def _columnar(path: Path, **extra) -> ColumnarDataModule:
    return ColumnarDataModule(train_paths=str(path), label="click", sparse_features=["site"],
                              dense_features=["price", {"column": "score", "transform": "none"}], batch_size=4,
                              **extra)


def test_a_csv_with_nan_or_infinity_is_refused_naming_file_line_and_column_or_read_as_zero(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("click,site,price,score\n1,a,3,0.5\n0,b,nan,1\n1,c,2,-inf\n0,d,1,2\n")
    with pytest.raises(ValueError, match=r"clicks.csv, line 3, column 'price': a dense value must be finite .*"
                                         r"non_finite='zero'.*got 'nan'"):
        _batches(_columnar(path))
    zeroed = _columnar(path, non_finite="zero")
    (batch,) = _batches(zeroed)
    assert torch.isfinite(batch.dense_features).all()
    assert batch.dense_features[1, 0] == 0 and batch.dense_features[2, 1] == 0
    assert batch.dense_features[0, 0] == pytest.approx(float(torch.log1p(torch.tensor(3.0))))
    assert zeroed.preparation.counts.non_finite == 2
    assert "replaced 2 non-finite dense values" in zeroed.preparation.counts.summary()
    with pytest.raises(ValueError, match="non_finite must be one of"):
        _columnar(path, non_finite="skip")


def test_a_nan_in_a_parquet_dense_column_is_refused_naming_file_row_and_column(tmp_path):
    path = tmp_path / "clicks.parquet"
    pq.write_table(pa.table({"click": [1, 0, 1, 0], "site": ["a", "b", "c", "d"],
                             "price": [1.0, 2.0, 3.0, 4.0], "score": [0.5, 0.25, float("nan"), 1.0]}), path)
    with pytest.raises(ValueError, match=r"clicks.parquet, row 3, column 'score': a dense value must be finite"):
        _batches(_columnar(path))
    (batch,) = _batches(_columnar(path, non_finite="zero"))
    assert batch.dense_features[:, 1].tolist() == [0.5, 0.25, 0.0, 1.0]


def test_a_label_that_is_not_finite_is_refused_even_with_a_threshold(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("rating,site,price,score\n5,a,1,1\nnan,b,1,1\n")
    module = ColumnarDataModule(train_paths=str(path), label={"column": "rating", "threshold": 4},
                                sparse_features=["site"], batch_size=2)
    with pytest.raises(ValueError, match=r"ratings.csv, line 3, column 'rating': the label is not finite: 'nan'"):
        _batches(module)


@pytest.mark.parametrize("text", ["nan", "inf"])
def test_a_criteo_tsv_with_a_non_finite_integer_feature_is_refused_naming_file_line_and_feature(text, tmp_path):
    from lightning_skew.data.criteo import CriteoTsvDataset

    lines = random_lines(6)
    lines[4] = criteo_line("1", [text] + ["1"] * 12, ["0a"] * 26)
    dataset = CriteoTsvDataset([write_tsv(tmp_path / "day_0", lines)], batch_size=3, num_embeddings_per_feature=SIZES)
    with pytest.raises(ValueError, match=rf"day_0, line 5: malformed Criteo line: integer feature I1.*{text}"):
        list(dataset)


class _DivergesAtStep(DLRMModule):
    """Trains normally, then its loss is NaN from the given step on (as a diverged model's would be)."""

    def __init__(self, *args, nan_from: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_from = nan_from

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step + 1 >= self.nan_from else loss


def test_a_diverging_fit_stops_naming_the_step_at_the_next_check(tmp_path):
    data = SyntheticDataModule(num_embeddings_per_feature=[50, 40], num_dense=3, num_train_samples=64 * 32,
                               num_val_samples=64, batch_size=64, seed=0)
    model = _DivergesAtStep(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                            embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1],
                            nan_from=6)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, log_every_n_steps=10, default_root_dir=str(tmp_path),
                         callbacks=[NonFiniteLossStop()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 6 \(found at step 10;"):
            trainer.fit(model, data)
    assert trainer.global_step == 10  # stopped at the first check after step 6, not at the end of the epoch


@pytest.mark.slow
def test_the_command_exits_non_zero_when_the_loss_becomes_nan(tmp_path):
    rows = "".join(f"{i % 2},s{i % 7},{i % 5}\n" for i in range(600))
    (tmp_path / "clicks.csv").write_text("click,site,price\n" + rows)
    config = tmp_path / "diverges.yaml"
    # Learning rates of 1e30: the first update sends the weights out of range and the second loss is NaN.
    config.write_text(f"""
trainer:
  accelerator: cpu
  devices: 1
  strategy: {{class_path: lightning_skew.TorchRecStrategy}}
  max_epochs: 1
  log_every_n_steps: 5
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  num_sanity_val_steps: 0
model:
  class_path: lightning_skew.models.DLRMModule
  init_args:
    embedding_dim: 4
    dense_arch_layer_sizes: [8, 4]
    over_arch_layer_sizes: [8, 1]
    embedding_optimizer: sgd
    embedding_lr: 1.0e+30
    optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 1.0e+30}}}}
data:
  class_path: lightning_skew.ColumnarDataModule
  init_args:
    train_paths: {tmp_path / 'clicks.csv'}
    label: click
    sparse_features: [site]
    dense_features: [price]
    batch_size: 20
""")
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"}}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "lightning_skew.cli", "fit", "--config", str(config)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, run.stdout[-2000:]
    assert "NonFiniteLossError: the training loss became nan at step 2 (found at step 5;" in run.stderr, \
        run.stderr[-3000:]


@pytest.mark.slow
def test_ranks_stop_together_when_the_loss_of_one_becomes_nan(tmp_path, two_ranks):
    two_ranks("divergence_worker.py", "--out", str(tmp_path), timeout=240)
    reports = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert reports[0] == reports[1]  # the same error at the same step on both ranks, though only rank 1 saw NaN
    assert "the training loss became nan at step 3 (found at step 4;" in reports[0]
    assert reports[0].endswith("global_step 4")


def test_a_nan_in_criteo_npy_dense_values_is_refused_naming_the_day_row_and_column(tmp_path):
    import numpy as np

    from lightning_skew.data.criteo import CriteoNpyDataset

    rng = np.random.default_rng(0)
    for day, rows in enumerate([9, 6]):
        dense = rng.random((rows, 13)).astype(np.float32)  # stored already transformed, as TorchRec writes them
        if day == 1:
            dense[2, 4] = np.nan
        np.save(tmp_path / f"day_{day}_dense.npy", dense)
        np.save(tmp_path / f"day_{day}_sparse.npy", rng.integers(0, 1000, (rows, 26)).astype(np.int32))
        np.save(tmp_path / f"day_{day}_labels.npy", rng.integers(0, 2, rows).astype(np.int32))
    with pytest.raises(ValueError, match=r"day_1_dense.npy, row 3, dense column 5 \(I5\): nan is not finite"):
        list(CriteoNpyDataset(str(tmp_path), 4, SIZES))


def test_the_loss_check_reads_nothing_on_the_host_between_checks(tmp_path):
    # A GPU would wait on any host read (.item(), bool(), a copy to the host): between checks the callback makes
    # none; at a check (every log_every_n_steps) it reads the flag once.
    from torch.utils._python_dispatch import TorchDispatchMode

    reads: list[int] = []

    class CountHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                reads[-1] += 1
            return func(*args, **(kwargs or {}))

    class Watched(NonFiniteLossStop):
        def on_train_batch_end(self, trainer, *args) -> None:
            reads.append(0)
            with CountHostReads():
                super().on_train_batch_end(trainer, *args)

    data = SyntheticDataModule(num_embeddings_per_feature=[50, 40], num_dense=3, num_train_samples=64 * 12,
                               num_val_samples=64, batch_size=64, seed=0)
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=5,
                         default_root_dir=str(tmp_path), callbacks=[Watched()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    assert len(reads) == 12
    assert [step + 1 for step, count in enumerate(reads) if count] == [5, 10]  # the checks only
