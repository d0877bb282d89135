"""Warnings of the libraries underneath that a lightning-skew run cannot act on, filtered one by one (narrowly, by
message), each with the reason it is not ours to fix."""

from __future__ import annotations

import logging
import warnings

__all__ = ["UPSTREAM_WARNINGS", "quiet_upstream_warnings"]

#: (message regex, category, why it is filtered)
UPSTREAM_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     "TorchRec 1.8 hands sharded tables out as ShardedTensor; reading them (checkpoints, stale rows) warns each time"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning,
     "Lightning's own pytree helper calls the API torch deprecated"),
    (r"HeuristicalStorageReservation is known to cause issues", FutureWarning,
     "TorchRec's default planner builds it itself; recipes choose another through the planner's init_args"),
    (r"`broadcast_buffers` is deprecated", FutureWarning,
     "DistributedModelParallel wraps the dense part in DDP with the old argument itself"),
    (r"Your `IterableDataset` has `__len__` defined", UserWarning,
     "the streaming datasets give their length on purpose (progress totals, epoch ends); each DataLoader worker "
     "yields its own share of the batches, so the length is exact"),
)

# TorchRec asks torch.fx whether it is tracing on every forward; torch logs that this API will change meaning.
_UPSTREAM_LOGGERS = ("torch.fx._symbolic_trace",)


def quiet_upstream_warnings() -> None:
    """Install the filters of :data:`UPSTREAM_WARNINGS` (idempotent). Other warnings, ours included, still show."""
    for message, category, _why in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _UPSTREAM_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
