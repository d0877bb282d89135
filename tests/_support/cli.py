"""The ``lightning-skew`` command run as a user runs it (a fresh interpreter), and the arguments that make a recipe
small enough for a test.

Each command is mostly interpreter start and imports (several seconds of one core): independent commands of a test
start together (``start_command``) and are waited for in turn, so that both cores work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--data.init_args.max_rows_per_table", "500", "--data.init_args.num_train_samples", "8192",
         "--data.init_args.num_val_samples", "4096", "--data.init_args.batch_size", "1024",
         "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
# Lightning's rendezvous variables: in-process fits earlier in the session leave them (MASTER_PORT with the port
# still bound by this process) in os.environ; a command must pick its own, as it would from a shell.
RENDEZVOUS = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"}


def command_env(show_warnings: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a command: this one's, less the rendezvous variables, with wandb offline and quiet (and
    warnings off unless ``show_warnings``)."""
    env = {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS | {"PYTHONWARNINGS"}},
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}
    if not show_warnings:
        env["PYTHONWARNINGS"] = "ignore"
    return env


class Command:
    """``lightning-skew ARGS`` started in ``cwd``; ``result()`` waits for it."""

    def __init__(self, *args: str, cwd: Path, show_warnings: bool = False, timeout: float = 300) -> None:
        self.timeout = timeout
        self._done: subprocess.CompletedProcess | None = None
        self._proc = subprocess.Popen([sys.executable, "-m", "lightning_skew.cli", *args], cwd=cwd,
                                      env=command_env(show_warnings), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)

    def result(self, check: bool = True) -> subprocess.CompletedProcess:
        """The finished command; with ``check``, fail with the end of its output unless it succeeded."""
        if self._done is None:
            try:
                out, err = self._proc.communicate(timeout=self.timeout)
            finally:
                if self._proc.poll() is None:
                    self._proc.kill()
                    self._proc.communicate()
            self._done = subprocess.CompletedProcess(self._proc.args, self._proc.returncode, out, err)
        if check:
            assert self._done.returncode == 0, self._done.stdout[-3000:] + self._done.stderr[-3000:]
        return self._done


def start_command(*args: str, cwd: Path, show_warnings: bool = False) -> Command:
    """Start ``lightning-skew ARGS`` in ``cwd`` without waiting for it."""
    return Command(*args, cwd=cwd, show_warnings=show_warnings)


def run_command(*args: str, cwd: Path, show_warnings: bool = False) -> subprocess.CompletedProcess:
    """Run ``lightning-skew ARGS`` in ``cwd``; fail with the end of its output unless it succeeds."""
    return start_command(*args, cwd=cwd, show_warnings=show_warnings).result()
