"""How a model honours the decisions a batch carries: per-input loss weights, lookups served without gradient, and
lookups sent once per distinct bag.

The decisions and the step contexts they travel in are declared in :mod:`lightning_skew.core.decisions`; here are
the model's side of them: the weighted loss, and the forward hooks that make a sparse arch serve the frozen and
deduplicated lookups in force.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.decisions import deduped_in_step, frozen_in_step, serving_deduped, serving_frozen
from lightning_skew.core.deduped import DedupedLookups

__all__ = ["lookups_to_pool", "serve_deduped", "serve_frozen", "weighted_bce"]

# Per sparse arch, the output slots of each set of deduplicated features (kept here, not on the module).
_DEDUP_SLOTS: WeakKeyDictionary[nn.Module, dict[tuple, Tensor]] = WeakKeyDictionary()


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


def _alone(module: nn.Module, features: KeyedJaggedTensor) -> Tensor:
    """``module(features)`` with no frozen or deduplicated lookups in force (the hooks must not add them again)."""
    with serving_frozen(None), serving_deduped(None):
        return module(features)


def _add_frozen(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
    frozen = frozen_in_step()
    if frozen is None:
        return None
    with torch.no_grad():
        extra = _alone(module, frozen)
    return output + extra


def serve_deduped(sparse_arch: nn.Module) -> None:
    """Make ``sparse_arch`` (TorchRec's ``SparseArch``, sharded or not: a module mapping a KeyedJaggedTensor to
    pooled embeddings ``[B, F, D]`` in the order of its ``sparse_feature_names``) serve the deduplicated lookups in
    force (:func:`serving_deduped`): it pools their distinct bags (``[U, F, D]``) through the same collection,
    and puts the rows of the deduplicated features, expanded with the inverse indices (``index_select``), in
    place of those features' (empty) slots of its output. Each distinct bag is looked up and pooled once; its
    gradient is the sum of those of the inputs it serves, as pooling every copy would give."""
    sparse_arch.register_forward_hook(_add_deduped)


def _feature_slots(module: nn.Module, features: tuple[str, ...], device: torch.device) -> Tensor:
    names = list(getattr(module, "sparse_feature_names", ()))
    missing = [name for name in features if name not in names]
    if missing:
        raise ValueError(f"deduplicated features {missing} are not among the features of {type(module).__name__} "
                         f"({names})")
    cache = _DEDUP_SLOTS.setdefault(module, {})
    key = (features, str(device))
    if key not in cache:
        cache[key] = torch.tensor([names.index(name) for name in features], device=device)
    return cache[key]


def _add_deduped(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
    deduped = deduped_in_step()
    if deduped is None:
        return None
    slots = _feature_slots(module, deduped.features, output.device)
    # Given the one-lookup form, this forward pooled it: the distinct bags' rows lead the features' slots.
    merged = deduped.merged is not None and inputs and inputs[0] is deduped.merged
    distinct = output if merged else _alone(module, deduped.bags)  # [B or U, F, D]
    rows = distinct.index_select(1, slots).index_select(0, deduped.inverse)  # [B, K, D]
    return output.index_copy(1, slots, rows)


def lookups_to_pool(sparse_features: KeyedJaggedTensor, deduped: DedupedLookups | None) -> KeyedJaggedTensor:
    """What a :func:`serve_deduped` sparse arch is given: the one-lookup form of ``deduped`` when it carries one,
    else ``sparse_features`` (the distinct bags are then pooled in a second lookup)."""
    if isinstance(deduped, DedupedLookups) and deduped.merged is not None:
        return deduped.merged
    return sparse_features
