"""One rank of a 2-rank fit whose loss becomes NaN on rank 1 only, from a chosen step: every rank must stop at the
same check with the same error (they agree on the earliest bad step), none waiting on the other. Writes each
rank's error to --out."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl

from lightning_skew import NonFiniteLossStop, TorchRecStrategy
from lightning_skew.core.divergence import NonFiniteLossError

from _support.small import make_data, make_model


class NanOnRankOne(pl.Callback):
    """Replaces rank 1's loss by NaN from ``step`` on (as a rank whose data held a NaN would see it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step >= self.step:
            outputs["loss"] = outputs["loss"] * float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--nan-from", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    data = make_data(world_size)
    # NanOnRankOne runs before the check, in callback order.
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=TorchRecStrategy(), max_epochs=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[NanOnRankOne(args.nan_from), NonFiniteLossStop(check_every_n_steps=4)])
    try:
        trainer.fit(make_model(data, "rowwise_adagrad"), data)
        message = "finished"
    except NonFiniteLossError as error:
        message = str(error)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.txt").write_text(f"{message}\nglobal_step {trainer.global_step}")


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
