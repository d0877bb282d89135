"""One rank of a small TorchRecStrategy run, started by the tests as a separate process (like torchrun).

Writes what the tests compare into ``--out``: per-step global losses, the unsharded export, the gathered
fused-optimizer state and per-rank predictions on the first validation batch.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_skew.torchrec.checkpoint import gather_unsharded
from lightning_skew.torchrec.strategy import TorchRecStrategy

from _support.small import RecordLosses, make_data, make_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--embedding-optimizer", default="rowwise_adagrad")
    parser.add_argument("--sharding-types", default=None, help="comma-separated TorchRec sharding types")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if os.environ.get("WORKER_TRACEBACK_AFTER"):  # debugging a hang: dump every thread's stack, then exit
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["WORKER_TRACEBACK_AFTER"]), exit=True)
    out = Path(args.out)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = make_data(world_size)
    model = make_model(data, args.embedding_optimizer)
    record = RecordLosses()
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=TorchRecStrategy(
                         sharding_types=args.sharding_types.split(",") if args.sharding_types else None),
                         max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out), callbacks=[record],
                         num_sanity_val_steps=0, deterministic=True)
    trainer.fit(model, data, ckpt_path=args.resume)
    strategy: TorchRecStrategy = trainer.strategy
    strategy.export_unsharded_checkpoint(out / "export.ckpt")
    fused = {f"{param}/{name}": value for param, states in strategy.fused_optimizer.state_dict()["state"].items()
             for name, value in states.items()}
    fused_full = gather_unsharded(fused)
    model.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        predictions = torch.sigmoid(model(batch))  # every rank calls: sharded lookups are collective
    torch.save({"batch": batch, "predictions": predictions}, out / f"predictions_rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        torch.save(fused_full, out / "fused_state.pt")
        (out / "losses.json").write_text(json.dumps(record.losses))


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
