"""Fixtures shared by the test modules: a quiet Trainer, the small synthetic DLRM setup, worker scripts on two ranks
and the ``lightning-skew`` command. The helpers behind them are in ``_support`` (also importable directly, by
module-level helpers that are not tests)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest

from _support.cli import ROOT, run_command, start_command
from _support.launch import launch
from _support.small import make_data, make_model, quiet_trainer

TESTS = Path(__file__).resolve().parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite on two workers (pytest-xdist), one per core: each worker, and every process it
    # starts, computes on one thread, so the workers do not fight over the cores.
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def trainer() -> Callable[..., pl.Trainer]:
    """A factory of one-process CPU Trainers under a TorchRecStrategy that log, print, checkpoint and sanity-check
    nothing; keyword arguments override any default (``strategy`` included)::

        def test_x(trainer, small_data, small_model):
            trainer(max_steps=2).fit(small_model, small_data)
    """
    return quiet_trainer


@pytest.fixture
def small_data():
    """The small synthetic DataModule for one process (five tables of 7 to 2,000 rows, 8 batches of 64)."""
    return make_data(1)


@pytest.fixture
def small_model(small_data):
    """A fresh DLRM (seeded: the same weights every time) for ``small_data``, with a fused rowwise Adagrad."""
    return make_model(small_data, "rowwise_adagrad")


@pytest.fixture
def two_ranks() -> Callable[..., list[str]]:
    """Run a worker script of ``tests/`` as two ranks (env:// rendezvous on localhost, as torchrun); the ranks'
    outputs, or a failure showing each failed rank's::

        def test_x(two_ranks, tmp_path):
            two_ranks("strategy_worker.py", "--out", str(tmp_path), timeout=180)
    """
    def run(script: str, *args: str, timeout: float = 300, nodes: int = 1) -> list[str]:
        return launch(TESTS / script, 2, list(args), timeout=timeout, nodes=nodes)

    return run


@pytest.fixture
def command(tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``lightning-skew ARGS`` as a user would (a fresh interpreter, in ``tmp_path``), failing with its output
    unless it succeeds; ``command.recipe(name)`` is the path of ``recipes/<name>.yaml``; ``command.start(ARGS)``
    starts one without waiting (``.result()`` waits), so that independent commands run side by side::

        def test_x(command):
            run = command("fit", "--config", command.recipe("dlrm_synthetic"), *SMALL)
            first, second = command.start("fit", ...), command.start("validate", ...)
            assert "val: auc" in first.result().stdout
    """
    def run(*args: str, show_warnings: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run_command(*args, cwd=cwd or tmp_path, show_warnings=show_warnings)

    run.recipe = lambda name: str(ROOT / "recipes" / f"{name}.yaml")  # type: ignore[attr-defined]
    run.start = lambda *args, show_warnings=False, cwd=None: start_command(  # type: ignore[attr-defined]
        *args, cwd=cwd or tmp_path, show_warnings=show_warnings)
    return run
