"""How a model honours the decisions a batch carries: per-input loss weights and lookups served without gradient.

A model declares the decisions it honours in ``honoured_batch_decisions`` (a set of
:class:`~lightning_skew.core.batch.SkewBatch` field names); a part that puts a decision on the batch calls
:func:`require_decisions` at setup, so a model that would ignore it (a silently biased run) is an error instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["require_decisions", "serve_frozen", "serving_frozen", "weighted_bce"]

_FROZEN: ContextVar[KeyedJaggedTensor | None] = ContextVar("lightning_skew_frozen_lookups", default=None)


def weighted_bce(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits, the mean over inputs; with ``weights`` the weighted mean
    ``sum(w * loss) / sum(w)``, which equals the plain mean over a batch where input ``i`` appears ``w[i]`` times."""
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits, labels)
    weights = weights.to(logits.dtype)
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(logits.dtype).tiny)


def serve_frozen(sparse_arch: nn.Module) -> None:
    """Make ``sparse_arch`` (a module mapping a KeyedJaggedTensor to pooled embeddings, e.g. TorchRec's
    ``SparseArch``, sharded or not) add the pooled embeddings of the frozen lookups in force
    (:func:`serving_frozen`) to its output, looked up under ``torch.no_grad()``.

    Sum pooling is additive, so the result equals pooling all lookups together; the frozen ones reach neither the
    embedding backward nor the fused optimizer, so their rows and optimizer state do not change.
    """
    sparse_arch.register_forward_hook(_add_frozen)


def _add_frozen(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
    frozen = _FROZEN.get()
    if frozen is None:
        return None
    token = _FROZEN.set(None)  # the nested call below must not add them again
    try:
        with torch.no_grad():
            extra = module(frozen)
    finally:
        _FROZEN.reset(token)
    return output + extra


@contextmanager
def serving_frozen(frozen: KeyedJaggedTensor | None) -> Iterator[None]:
    """Within, a model's :func:`serve_frozen` sparse arch adds the pooled embeddings of ``frozen`` (``None``:
    nothing) to each forward. Anything but a KeyedJaggedTensor counts as nothing (a symbolic tracer, such as
    TorchRec's train pipeline tracing the model, hands attribute proxies)."""
    token = _FROZEN.set(frozen if isinstance(frozen, KeyedJaggedTensor) else None)
    try:
        yield
    finally:
        _FROZEN.reset(token)


def require_decisions(module: nn.Module, decisions: Iterable[str], by: str) -> None:
    """Refuse a module that does not honour ``decisions`` (names of batch fields) that part ``by`` will put on
    its batches; the message names both."""
    honoured = set(getattr(module, "honoured_batch_decisions", ()))
    missing = sorted(set(decisions) - honoured)
    if missing:
        raise ValueError(
            f"{by} puts {', '.join(missing)} on the batches, but {type(module).__name__} does not honour "
            f"{'them' if len(missing) > 1 else 'it'} (its honoured_batch_decisions: {sorted(honoured) or 'none'}): "
            "training would be silently biased. Use a model that does (e.g. lightning_skew.models.DLRMModule), "
            "declare and honour them in yours, or turn the option off")
