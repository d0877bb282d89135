"""Shows training throughput (samples per second) on the progress bar and in the logger."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl

from lightning_skew.core.batch import batch_size_of


class SamplesPerSecond(pl.Callback):
    """Logs ``samples_per_s``: global training inputs per second, averaged over the last ``window`` steps.

    Logged every ``Trainer(log_every_n_steps=...)`` steps, as Lightning writes logs.

    The time of a step runs from the end of the previous step, so loading the batch counts.

    Args:
        window: number of recent steps averaged (the first step of each epoch is left out: it includes
            DataLoader start-up).
        prog_bar: also show the figure on the progress bar.

    Example::

        Trainer(callbacks=[SamplesPerSecond(window=50)])
    """

    def __init__(self, window: int = 20, prog_bar: bool = True) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.prog_bar = prog_bar
        self._times: list[float] = []
        self._samples: list[int] = []
        self._last_end: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._times.clear()
        self._samples.clear()
        self._last_end = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        last, self._last_end = self._last_end, now
        if last is not None:
            self._times.append(now - last)
            self._samples.append(batch_size_of(batch) * trainer.world_size)
            del self._times[:-self.window], self._samples[:-self.window]
            if trainer.global_step % max(trainer.log_every_n_steps, 1):
                return  # logging every step costs more than the figure is worth
            rate = sum(self._samples) / max(sum(self._times), 1e-9)
            pl_module.log("samples_per_s", rate, prog_bar=self.prog_bar, on_step=True, on_epoch=False,
                          rank_zero_only=True, batch_size=1)
