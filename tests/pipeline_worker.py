"""One rank of the pipeline tests, started as a separate process (like torchrun): several small fits in one process
group, with and without ``TorchRecStrategy(pipeline="sparse_dist")``. Rank zero writes every fit's per-step global
losses (and the skipper's drops) to ``--out/result.pt``."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_skew import RepackedDataModule, StaleEmbeddingSkipper, TorchRecStrategy

from _support.small import RecordLosses, make_data, make_model

RESUME_STEP = 5  # a checkpoint in the middle of the first of two 8-step epochs


class SaveAtStep(pl.Callback):
    """Saves one checkpoint at the end of a training step, as ModelCheckpoint(every_n_train_steps=...) does."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit(root: Path, pipeline: str | None, world_size: int, num_nodes: int, repack: bool = False,
        save_at: int | None = None, ckpt_path: str | None = None, epochs: int = 2) -> dict:
    data = make_data(world_size)
    callbacks: list[pl.Callback] = []
    skipper = None
    if repack:
        skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=2, target_drop_fraction=0.3, tolerance=0.05,
                                        sample_batches=2, repack=True)
        callbacks.append(skipper)
        data = RepackedDataModule(data)
    if save_at is not None:
        callbacks.append(SaveAtStep(save_at, root / f"step={save_at}.ckpt"))
    record = RecordLosses()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size // num_nodes, num_nodes=num_nodes,
                         strategy=TorchRecStrategy(pipeline=pipeline), max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(root),
                         callbacks=[*callbacks, record], num_sanity_val_steps=0, deterministic=True,
                         val_check_interval=None if repack else 0.5)
    trainer.fit(make_model(data, "rowwise_adagrad"), data, ckpt_path=ckpt_path)
    return {"losses": record.losses, "val": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "dropped": None if skipper is None else skipper.inputs_dropped,
            "job": (type(trainer.strategy.cluster_environment).__name__, trainer.num_nodes, trainer.world_size)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fits", default="plain,pipeline,resumed,plain_repack,pipeline_repack")
    parser.add_argument("--num-nodes", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    result = {}
    job = (world_size, args.num_nodes)
    for name in args.fits.split(","):
        if name == "plain":
            result[name] = fit(out / name, None, *job)
        elif name == "pipeline":
            result[name] = fit(out / name, "sparse_dist", *job, save_at=RESUME_STEP)
        elif name == "resumed":
            ckpt = out / "pipeline" / f"step={RESUME_STEP}.ckpt"
            result[name] = fit(out / name, "sparse_dist", *job, ckpt_path=str(ckpt))
        elif name == "plain_repack":
            result[name] = fit(out / name, None, *job, repack=True, epochs=1)
        elif name == "pipeline_repack":
            result[name] = fit(out / name, "sparse_dist", *job, repack=True, epochs=1)
        else:
            raise ValueError(f"unknown fit {name!r}")
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / "result.pt")


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
