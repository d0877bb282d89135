"""The private state of Lightning that lightning-skew reads, each use behind one function here, with the reason it
is not public. (LightningCLI's one private hook, ``_parse_ckpt_path``, is overridden in ``cli.py``'s own section.)"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

__all__ = ["attached_trainer"]


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer ``module`` is attached to, or ``None``.

    ``LightningModule.trainer`` raises when none is attached (a module called on its own, in a test or an export),
    and Lightning 2.6 offers no public way to ask first; its own properties (``global_step``, ``logger``) read the
    private ``_trainer`` for the same reason.
    """
    trainer: Any = module._trainer
    return trainer
