"""Stops a fit whose training loss became NaN or infinite, naming the step, without a host sync per step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["NonFiniteLossError", "NonFiniteLossStop"]

_NEVER = -1


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _loss_of(outputs: Any) -> Tensor | None:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), Tensor):
        return outputs["loss"]
    return None


class NonFiniteLossStop(pl.Callback):
    """Raises :class:`NonFiniteLossError` naming the first training step whose loss was NaN or infinite.

    Each step only updates two numbers on the loss's device (the first bad step and its loss); they are read on the
    host every ``check_every_n_steps`` steps, at each training epoch's end and before each validation, so a step
    waits on nothing it did not wait on before. The fit therefore stops at most ``check_every_n_steps`` steps after
    the loss diverged (and before a validation or the end of an epoch reports on a diverged model); the error names
    the step where it happened. With several processes the ranks agree on the earliest bad step (one small
    all-reduce per check), so all of them stop together.

    Args:
        check_every_n_steps: steps between checks; ``None`` (default): ``Trainer(log_every_n_steps=...)``, where
            Lightning reads logged values on the host anyway.

    .. note::
        ``lightning-skew fit`` adds this callback to every run; the command then exits with a non-zero status. In
        Python add it yourself: ``Trainer(callbacks=[NonFiniteLossStop()])``.

    Example::

        trainer = pl.Trainer(callbacks=[NonFiniteLossStop(check_every_n_steps=10)])
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be at least 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: Tensor | None = None  # global step of the first non-finite loss, or _NEVER
        self._bad_loss: Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs)
        if loss is not None:
            loss = loss.detach().float().reshape(-1)[0] if loss.numel() else None
        device = loss.device if loss is not None else pl_module.device
        if self._first_bad is None or self._first_bad.device != device:
            # Made on every rank alike (whether or not its step returned a loss): the checks are collectives.
            self._first_bad = torch.full((), _NEVER, dtype=torch.int64, device=device)
            self._bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        if loss is not None:
            first = (self._first_bad == _NEVER) & ~torch.isfinite(loss)
            # Lightning's global step after this one: steps counted from 1 (a scalar argument, not a host copy).
            self._first_bad = torch.where(first, torch.full_like(self._first_bad, trainer.global_step),
                                          self._first_bad)
            self._bad_loss = torch.where(first, loss, self._bad_loss)
        every = self.check_every_n_steps or max(trainer.log_every_n_steps, 1)
        if trainer.global_step % every == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)  # nothing to check outside a fit

    def _check(self, trainer: pl.Trainer) -> None:
        if self._first_bad is None:
            return
        # Ranks agree on the earliest bad step: the max of (large - step) over ranks marks it.
        large = torch.iinfo(torch.int64).max // 2
        key = torch.where(self._first_bad == _NEVER, torch.zeros_like(self._first_bad), large - self._first_bad)
        # Through the strategy, as Lightning's callbacks agree (a copy: its reduce works in place).
        earliest = int(trainer.strategy.reduce(key.reshape(1).clone(), reduce_op="max").item())
        if earliest == 0:
            return
        step = large - earliest
        loss = float(self._bad_loss) if int(self._first_bad) == step else float("nan")
        raise NonFiniteLossError(
            f"the training loss became {loss} at step {step} (found at step {trainer.global_step}; steps are "
            "Lightning's global_step, counted from 1); the fit stops "
            "here. Look for NaN or infinite inputs (readers refuse them unless told otherwise), a learning rate too "
            "high for the model, or labels outside [0, 1].")

    def state_dict(self) -> dict[str, Any]:
        return {}  # a run that diverged stopped; one resumed from an earlier checkpoint starts clean
