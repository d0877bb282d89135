"""The ``lightning-skew`` command run as a user runs it (a fresh interpreter), and the arguments that make a recipe
small enough for a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--data.init_args.max_rows_per_table", "500", "--data.init_args.num_train_samples", "8192",
         "--data.init_args.num_val_samples", "4096", "--data.init_args.batch_size", "1024",
         "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]


def run_command(*args: str, cwd: Path, show_warnings: bool = False) -> subprocess.CompletedProcess:
    # In-process fits earlier in the session leave Lightning's rendezvous variables (MASTER_PORT, with the port
    # still bound by this process) in os.environ; a command must pick its own, as it would from a shell.
    rendezvous = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"}
    env = {**{k: v for k, v in os.environ.items() if k not in rendezvous | {"PYTHONWARNINGS"}},
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    if not show_warnings:
        env["PYTHONWARNINGS"] = "ignore"
    result = subprocess.run([sys.executable, "-m", "lightning_skew.cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
