"""One rank of a small run that checkpoints every epoch (``last`` and per-step files) and can be killed at a
chosen moment of a chosen save (a hook inside the save, not timing luck); or a run resumed from a checkpoint.
Writes the losses, the step it started from and whole tables to --out (rank zero)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_skew.torchrec.atomic import SAVE_HOOKS
from lightning_skew.torchrec.strategy import TorchRecStrategy

from _support.small import RecordLosses, make_data, make_model


class StartStep(pl.Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--kill-at", default=None, help="stage of a save at which rank zero kills itself")
    parser.add_argument("--kill-on", type=int, default=1, help="...the n-th time it reaches that stage")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rank = int(os.environ.get("RANK", "0"))
    if args.kill_at and rank == 0:
        reached = {"count": 0}

        def kill(stage: str, path: Path) -> None:
            if stage == args.kill_at:
                reached["count"] += 1
                if reached["count"] == args.kill_on:
                    os.kill(os.getpid(), signal.SIGKILL)

        SAVE_HOOKS.append(kill)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = make_data(world_size)
    model = make_model(data, "rowwise_adagrad")
    record, start = RecordLosses(), StartStep()
    checkpoint = ModelCheckpoint(dirpath=args.checkpoints, save_last=True, save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=TorchRecStrategy(), max_epochs=args.epochs,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=args.out, callbacks=[checkpoint, record, start], num_sanity_val_steps=0,
                         limit_val_batches=0, deterministic=True)
    trainer.fit(model, data, ckpt_path=args.resume)
    weights = trainer.strategy.unsharded_state_dict()
    if trainer.is_global_zero:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(weights, Path(args.out) / "weights.pt")
        start_step = start.step if start.step is not None else trainer.global_step  # nothing left to train
        (Path(args.out) / "run.json").write_text(json.dumps({"losses": record.losses, "start_step": start_step}))


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
