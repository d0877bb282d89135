"""What the checkpoint seal's CRC-32s cost at the default recipe's size (recipes/dlrm_synthetic.yaml's tables).

Saves and loads a sharded checkpoint of that model 5 times (1 rank, CPU) and prints the medians: the save, the
checksums it computes, the load, and the check of the files it makes first.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_checkpoint_checksums.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl

from lightning_skew import DLRMModule, SyntheticDataModule, TorchRecStrategy
from lightning_skew.torchrec.atomic import COMPLETE_FILE, file_checksum, incomplete_reason


def main(repeats: int = 5) -> None:
    warnings.filterwarnings("ignore")
    data = SyntheticDataModule(max_rows_per_table=100000, popularity_exponent=1.05, num_train_samples=4096,
                               num_val_samples=2048, batch_size=2048, seed=0)
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       embedding_dim=16, dense_arch_layer_sizes=[64, 16], over_arch_layer_sizes=[64, 32, 1])
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_steps=2, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(model, data)
    checkpoint = Path(tempfile.mkdtemp()) / "last.ckpt"
    saves, checksums, loads, checks = [], [], [], []
    for _ in range(repeats):
        began = time.perf_counter()
        trainer.save_checkpoint(checkpoint)
        saves.append(time.perf_counter() - began)
        files = [p for p in checkpoint.iterdir() if p.name != COMPLETE_FILE]
        began = time.perf_counter()
        for file in files:
            file_checksum(file)
        checksums.append(time.perf_counter() - began)
        began = time.perf_counter()
        assert incomplete_reason(checkpoint) is None
        checks.append(time.perf_counter() - began)
        began = time.perf_counter()
        trainer.strategy.load_checkpoint(checkpoint)
        loads.append(time.perf_counter() - began)
    size = sum(p.stat().st_size for p in checkpoint.iterdir())
    median = statistics.median
    print(f"checkpoint {size / 1e6:.1f} MB; save {median(saves):.3f} s (checksums {median(checksums):.3f} s = "
          f"{median(checksums) / median(saves):.1%}); load {median(loads):.3f} s (check {median(checks):.3f} s = "
          f"{median(checks) / median(loads):.1%}); medians of {repeats}")


if __name__ == "__main__":
    main()
