"""A small TorchRecStrategy fit that checkpoints every few steps, stopped early or resumed from a checkpoint: what the
mid-epoch resume tests of every DataModule compare (losses of every step, the final unsharded weights)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_skew import RecDataModule, TorchRecStrategy

from _support.small import RecordLosses, make_model


def fit(make_data: Callable[[], RecDataModule], root: Path, ckpt_path: str | None = None, max_steps: int = -1,
        every_n_steps: int | None = None, epochs: int = 2) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Fit ``epochs`` epochs (or ``max_steps``), saving ``step=N`` checkpoints under ``root/checkpoints`` every
    ``every_n_steps`` steps (``None``: none); the losses of the steps this fit ran and the final weights."""
    data = make_data()
    model = make_model(data, "rowwise_adagrad")
    record = RecordLosses()
    savers = [] if every_n_steps is None else [
        ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=every_n_steps, save_top_k=-1)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=epochs,
                         max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(root),
                         callbacks=[*savers, record], enable_checkpointing=bool(savers), deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return record.losses, trainer.strategy.unsharded_state_dict()


def assert_resumes_mid_epoch(make_data: Callable[..., RecDataModule], tmp_path: Path, steps_per_epoch: int,
                             stop_at: int = 3, from_epoch_end: bool = False, **resumed_data: object) -> None:
    """A fit stopped after step ``stop_at`` (mid-epoch) and resumed from its checkpoint trains the steps after it
    (the next batch, not the epoch's first again; the next epoch from its start) and ends with the uninterrupted
    fit's weights, bit for bit. ``resumed_data`` are DataModule arguments of the resumed fits (workers).

    ``from_epoch_end``: instead of a stopped fit, the uninterrupted one checkpoints every ``stop_at`` steps, and the
    fit resumed from the step checkpoint on epoch 0's last batch must also go on with epoch 1, whole.
    """
    assert 0 < stop_at < steps_per_epoch and (not from_epoch_end or steps_per_epoch % stop_at == 0)
    straight, straight_weights = fit(make_data, tmp_path / "straight",
                                     every_n_steps=stop_at if from_epoch_end else None)
    assert len(straight) == 2 * steps_per_epoch
    saved = tmp_path / "straight"
    if not from_epoch_end:
        saved = tmp_path / "first"
        fit(lambda: make_data(**resumed_data), saved, max_steps=stop_at, every_n_steps=stop_at)
    for step in (stop_at, steps_per_epoch) if from_epoch_end else (stop_at,):
        (checkpoint,) = (saved / "checkpoints").glob(f"*step={step}.ckpt")
        resumed, resumed_weights = fit(lambda: make_data(**resumed_data), tmp_path / f"resumed{step}",
                                       ckpt_path=str(checkpoint))
        assert resumed == straight[step:], step  # bit for bit: the same batches in the same order, the same state
        assert sorted(resumed_weights) == sorted(straight_weights)
        for key, value in straight_weights.items():
            assert torch.equal(resumed_weights[key], value), (step, key)
