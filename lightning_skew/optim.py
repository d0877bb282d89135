"""The embedding optimizer, chosen in one place and fused into TorchRec's embedding kernels."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

__all__ = [
    "EMBEDDING_OPTIMIZERS",
    "dense_parameters",
    "embedding_modules",
    "fuse_embedding_optimizer",
    "embedding_optimizer_names",
    "has_fused_optimizer",
]

# Each entry runs in TorchRec's fused kernels (EXACT_SGD, EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD, ADAM) once
# sharded, and as the same torch optimizer, applied in backward, on an unsharded module. FBGEMM's CPU kernels
# lack Adam: it needs CUDA when sharded.
CUDA_ONLY_EMBEDDING_OPTIMIZERS = {"adam"}
EMBEDDING_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}


def _is_embedding_module(module: nn.Module) -> bool:
    if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
        return True
    # Sharded collections replace the plain ones in place; import lazily, distributed is heavy.
    from torchrec.distributed.embedding import ShardedEmbeddingCollection
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    return isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection))


def embedding_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every (sharded or plain) TorchRec embedding collection inside ``module``."""
    for name, child in module.named_modules():
        if _is_embedding_module(child):
            yield name, child


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that the dense optimizer owns: all but those of TorchRec embedding collections."""
    embedding_ids = {id(p) for _, m in embedding_modules(module) for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in embedding_ids and p.requires_grad]


def embedding_optimizer_names(module: nn.Module) -> set[str]:
    """Names (keys of :data:`EMBEDDING_OPTIMIZERS`, else class names) of the optimizers on the embeddings."""
    by_class = {cls: name for name, cls in EMBEDDING_OPTIMIZERS.items()}
    return {by_class.get(cls, cls.__name__) for _, m in embedding_modules(module) for p in m.parameters()
            for cls in getattr(p, "_optimizer_classes", [])}


def has_fused_optimizer(module: nn.Module) -> bool:
    """Whether every embedding parameter of ``module`` already carries an optimizer applied in backward."""
    params = [p for _, m in embedding_modules(module) for p in m.parameters()]
    return bool(params) and all(hasattr(p, "_optimizer_classes") for p in params)


def fuse_embedding_optimizer(module: nn.Module, name: str = "rowwise_adagrad", lr: float = 0.01, **kwargs) -> int:
    """Attach the embedding optimizer ``name`` to every embedding parameter of ``module``.

    TorchRec's sharder reads it and fuses the update into the embedding kernel's backward; an unsharded
    module applies the same torch optimizer during backward. Returns the number of parameters configured.

    Args:
        module: any module holding TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection`` modules.
        name: one of :data:`EMBEDDING_OPTIMIZERS` (``sgd``, ``adagrad``, ``rowwise_adagrad``, ``adam``;
            ``adam`` only on CUDA once sharded: FBGEMM's CPU kernels lack it).
        lr: the embedding learning rate. LR schedulers of the dense optimizer reach it through
            :class:`~lightning_skew.strategies.TorchRecStrategy`, which scales it by the same factor.
        **kwargs: further optimizer arguments (``eps``, ``weight_decay``, ...).
    """
    if name not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"Unknown embedding optimizer {name!r}; choose one of {sorted(EMBEDDING_OPTIMIZERS)}")
    if lr <= 0:
        raise ValueError(f"The embedding learning rate must be positive, got {lr}")
    params = [p for _, m in embedding_modules(module) for p in m.parameters()]
    if not params:
        raise ValueError(f"{type(module).__name__} holds no TorchRec embedding collection to optimize")
    _apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[name], params, {"lr": lr, **kwargs})
    return len(params)
