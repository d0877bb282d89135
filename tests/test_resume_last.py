"""trainer.fit(ckpt_path="last") from Python resumes from the newest complete checkpoint, as the command does."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_skew import HotColdStrategy, TorchRecStrategy

from _support.small import make_data, make_model


class FirstStep(pl.Callback):
    """The global step at which training started (after any restore)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def _fit(folder: Path, epochs: int, strategy: pl.strategies.Strategy, ckpt_path: str | None = None) -> FirstStep:
    data = make_data(1)
    first = FirstStep()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, default_root_dir=str(folder.parent),
                         callbacks=[first, ModelCheckpoint(dirpath=folder, save_top_k=-1, save_last=True)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="^(?!.*ckpt_path=\"last\")")
        trainer.fit(make_model(data, "adagrad"), data, ckpt_path=ckpt_path)
    return first


def _interrupt(folder: Path) -> list[Path]:
    """Leave the folder as a kill during the first save of last.ckpt and an in-place rewrite of the newest step
    checkpoint would: no last.ckpt (only its hidden staging folder), the newest step checkpoint truncated."""
    last = folder / "last.ckpt"
    shutil.move(last, folder / ".last.ckpt.0123456789ab")
    steps = sorted(folder.glob("epoch=*.ckpt"), key=lambda p: int(p.name.split("step=")[1].split(".")[0]))
    next(steps[-1].glob("*.distcp")).write_bytes(b"")
    return steps


@pytest.mark.parametrize("strategy", [TorchRecStrategy, lambda: HotColdStrategy(budget_bytes=20_000)],
                         ids=["torchrec", "hotcold"])
def test_fit_with_ckpt_path_last_from_python_resumes_from_the_newest_complete_checkpoint(strategy, tmp_path):
    folder = tmp_path / "checkpoints"
    _fit(folder, 2, strategy())
    steps = _interrupt(folder)
    complete = steps[-2]  # the newest whose files are whole
    with pytest.warns(UserWarning, match=r'ckpt_path="last": no last.ckpt .*left only \.last\.ckpt\..*skipped as '
                                         rf"incomplete: {steps[-1].name}.*resuming from the newest complete "
                                         rf"checkpoint, .*{complete.name}"):
        resumed = _fit(folder, 3, strategy(), ckpt_path="last")
    assert resumed.step == int(complete.name.split("step=")[1].split(".")[0]) > 0


def test_without_any_complete_checkpoint_last_starts_afresh_as_lightning_does(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".last.ckpt.0123456789ab").mkdir()
    with pytest.warns(UserWarning, match="no last checkpoint available"):
        first = _fit(folder, 1, TorchRecStrategy(), ckpt_path="last")
    assert first.step == 0
