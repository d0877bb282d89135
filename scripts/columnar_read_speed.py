"""How fast ColumnarDataModule reads and batches Avazu-shaped data: CSV, gzip CSV and Parquet, inputs per second.

Writes an Avazu-shaped click log (24 columns: id, click, hour, 21 categorical columns with skewed values and
``-1`` codes) of ``--rows`` rows as CSV, gzip CSV and Parquet into a temporary folder, then times one pass of
the training loader of ``recipes/dlrm_avazu.yaml``'s DataModule (its mapping: 21 hashed columns, the time split
by ``hour``) over each: files to torchrec Batches of ``--batch-size``, as training receives them. The
preparation pass (row counts, time boundaries) is timed on its own. One process, ``--threads`` Arrow threads.

    python scripts/columnar_read_speed.py --rows 1000000 --train-steps 200

With ``--train-steps`` the default recipe's training speed is measured first, in the same process, and each
reader's speed is also given as a multiple of it.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from lightning_skew import ColumnarDataModule

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
           "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
           "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
HEX = {"site_id": 4737, "site_domain": 7745, "site_category": 26, "app_id": 8552, "app_domain": 559,
       "app_category": 36, "device_id": 2_686_408, "device_ip": 6_729_486, "device_model": 8251}
INTEGER = {"C1": 7, "banner_pos": 7, "device_type": 5, "device_conn_type": 4, "C14": 2626, "C15": 8, "C16": 9,
           "C17": 435, "C18": 4, "C19": 68, "C20": 172, "C21": 60}


def avazu_table(rows: int, seed: int = 0) -> pa.Table:
    """Avazu's columns with its cardinalities and Zipf-like popularity; 10 days of hours in time order."""
    rng = np.random.default_rng(seed)

    def skewed(cardinality: int) -> np.ndarray:
        return np.minimum(rng.zipf(1.2, rows) - 1, cardinality - 1)

    columns: dict[str, pa.Array] = {
        "id": pa.array(rng.integers(0, 2**63, rows).astype(str)),
        "click": pa.array(rng.integers(0, 2, rows).astype(str)),
        "hour": pa.array([f"1410{21 + day:02d}{hour:02d}" for day, hour in
                          zip(np.arange(rows) * 10 // rows, np.arange(rows) * 240 // rows % 24, strict=True)]),
    }
    for name in COLUMNS[3:]:
        if name in HEX:
            salt = int(rng.integers(0, 2**32))
            values = np.char.mod("%08x", (skewed(HEX[name]) * 2654435761 + salt) % 2**32)
        else:
            values = (skewed(INTEGER[name]) + 1000).astype(str)
            values[rng.random(rows) < 0.05] = "-1"
        columns[name] = pa.array(values)
    return pa.table(columns)


def datamodule(path: Path, batch_size: int, recipe: dict) -> ColumnarDataModule:
    init = copy.deepcopy(recipe["data"]["init_args"])
    init.update(train_paths=str(path), batch_size=batch_size)
    return ColumnarDataModule(**init)


def training_speed(steps: int) -> float:
    """Inputs/s of the default recipe (recipes/dlrm_synthetic.yaml: its model and data, TorchRecStrategy, one
    process), over ``steps`` training steps after 20 of warm-up."""
    import warnings

    import lightning.pytorch as pl

    from lightning_skew import DLRMModule, SyntheticDataModule, TorchRecStrategy

    recipe = yaml.safe_load((ROOT / "recipes" / "dlrm_synthetic.yaml").read_text())
    data_args = dict(recipe["data"]["init_args"])
    data_args.update(num_train_samples=data_args["batch_size"] * (steps + 20), num_val_samples=0, num_test_samples=0)
    data = SyntheticDataModule(**data_args)
    model_args = {k: v for k, v in recipe["model"]["init_args"].items() if k != "optimizer"}
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       **model_args)

    class Clock(pl.Callback):
        began, inputs = 0.0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 20:
                self.began, self.inputs = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.inputs += len(batch.labels) if batch_idx >= 20 else 0

    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    return clock.inputs / (time.perf_counter() - clock.began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2, help="Arrow's CPU threads")
    parser.add_argument("--keep", default=None, help="write the files here and keep them")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="also time this many steps of the default recipe's training, for the ratios")
    args = parser.parse_args()
    pa.set_cpu_count(args.threads)
    pa.set_io_thread_count(args.threads)
    recipe = yaml.safe_load((ROOT / "recipes" / "dlrm_avazu.yaml").read_text())
    folder = Path(args.keep or tempfile.mkdtemp(prefix="columnar-speed-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        began = time.perf_counter()
        csv_path, gz_path, parquet_path = folder / "train.csv", folder / "train.csv.gz", folder / "train.parquet"
        stamp = folder / f"rows-{args.rows}"
        if not stamp.exists():  # --keep: files written once are read again
            table = avazu_table(args.rows)
            pacsv.write_csv(table, csv_path, pacsv.WriteOptions(quoting_style="none"))
            with open(csv_path, "rb") as source, gzip.open(gz_path, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target)
            pq.write_table(table, parquet_path, row_group_size=1 << 17)
            stamp.touch()
        print(f"wrote {args.rows:,} Avazu-shaped rows as CSV ({csv_path.stat().st_size / 1e6:.0f} MB), gzip CSV "
              f"({gz_path.stat().st_size / 1e6:.0f} MB) and Parquet ({parquet_path.stat().st_size / 1e6:.0f} MB) "
              f"in {time.perf_counter() - began:.0f} s", flush=True)
        trained = None
        if args.train_steps:
            trained = training_speed(args.train_steps)
            print(f" training: {trained:>9,.0f} inputs/s (recipes/dlrm_synthetic.yaml, {args.train_steps} steps)",
                  flush=True)
        for label, path in (("CSV", csv_path), ("gzip CSV", gz_path), ("Parquet", parquet_path)):
            data = datamodule(path, args.batch_size, recipe)
            began = time.perf_counter()
            data.setup("fit")
            prepared = time.perf_counter() - began
            began = time.perf_counter()
            inputs = sum(len(batch.labels) for batch in data.train_dataloader())
            seconds = time.perf_counter() - began
            ratio = f", {inputs / seconds / trained:.1f}x training" if trained else ""
            print(f"{label:>9}: {inputs / seconds:>9,.0f} inputs/s read and batched ({inputs:,} training inputs in "
                  f"{seconds:.1f} s{ratio}); preparation pass {prepared:.1f} s", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
