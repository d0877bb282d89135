"""The embedding optimizer, chosen in one place and fused into TorchRec's embedding kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from lightning_skew.core.tables import embedding_modules
from lightning_skew.torchrec.upstream import (
    apply_optimizer_in_backward,
    in_backward_optimizer_classes,
    in_backward_optimizers,
)

__all__ = [
    "EMBEDDING_OPTIMIZERS",
    "dense_parameters",
    "embedding_modules",
    "fuse_embedding_optimizer",
    "embedding_optimizer_names",
    "has_fused_optimizer",
    "SparseRowWiseAdagrad",
    "sparse_capable",
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


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that the dense optimizer owns: all but those an embedding optimizer updates in backward (fused
    into TorchRec's kernels, or applied in backward to unsharded tables).

    Tables that TorchRec shards data-parallel with its dense kernel (the default for widths that are not a multiple
    of 4, such as dimension-1 first-order tables) come out of sharding without an embedding optimizer, as TorchRec
    intends: they are replicated weights, so the dense optimizer trains them (and checkpoints its state with them).
    """
    return [p for p in module.parameters() if p.requires_grad and not in_backward_optimizers(p)
            and not in_backward_optimizer_classes(p)]


def embedding_optimizer_names(module: nn.Module) -> set[str]:
    """Names (keys of :data:`EMBEDDING_OPTIMIZERS`, else class names) of the optimizers on the embeddings."""
    by_class = {cls: name for name, cls in EMBEDDING_OPTIMIZERS.items()}
    return {by_class.get(cls, cls.__name__) for _, m in embedding_modules(module) for p in m.parameters()
            for cls in in_backward_optimizer_classes(p)}


def has_fused_optimizer(module: nn.Module) -> bool:
    """Whether every embedding parameter of ``module`` already carries an optimizer applied in backward."""
    params = [p for _, m in embedding_modules(module) for p in m.parameters()]
    return bool(params) and all(in_backward_optimizer_classes(p) for p in params)


def fuse_embedding_optimizer(module: nn.Module, name: str = "rowwise_adagrad", lr: float = 0.01, **kwargs) -> int:
    """Attach the embedding optimizer ``name`` to every embedding parameter of ``module``.

    TorchRec's sharder reads it and fuses the update into the embedding kernel's backward; an unsharded
    module applies the same torch optimizer during backward. Returns the number of parameters configured.

    Args:
        module: any module holding TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection`` modules.
        name: one of :data:`EMBEDDING_OPTIMIZERS` (``sgd``, ``adagrad``, ``rowwise_adagrad``, ``adam``;
            ``adam`` only on CUDA once sharded: FBGEMM's CPU kernels lack it).
        lr: the embedding learning rate. LR schedulers of the dense optimizer reach it through
            :class:`~lightning_skew.TorchRecStrategy`, which scales it by the same factor.
        **kwargs: further optimizer arguments (``eps``, ``weight_decay``, ...).
    """
    if name not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"Unknown embedding optimizer {name!r}; choose one of {sorted(EMBEDDING_OPTIMIZERS)}")
    if lr <= 0:
        raise ValueError(f"The embedding learning rate must be positive, got {lr}")
    params = [p for _, m in embedding_modules(module) for p in m.parameters()]
    if not params:
        raise ValueError(f"{type(module).__name__} holds no TorchRec embedding collection to optimize")
    apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[name], params, {"lr": lr, **kwargs})
    return len(params)


class SparseRowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad that also takes sparse gradients (``nn.EmbeddingBag(sparse=True)``), updating only the
    rows a step looked up: per row, ``sum += mean(g ** 2)``, then ``w -= lr * g / (sqrt(sum) + eps)``.

    On the rows it updates it is TorchRec's :class:`~torchrec.optim.rowwise_adagrad.RowWiseAdagrad` (the same
    update FBGEMM fuses), which rejects sparse gradients; rows without a gradient keep their weights and
    state, as there. The state ``sum`` is ``[rows, 1]``, created on the parameter's device at the first step.
    Learning-rate decay and weight decay are not offered (FBGEMM's sparse update differs there).
    """

    def __init__(self, params: Any, lr: float = 0.01, eps: float = 1e-10, initial_accumulator_value: float = 0.0,
                 **unused: Any) -> None:
        if lr <= 0 or eps < 0 or initial_accumulator_value < 0:
            raise ValueError(f"SparseRowWiseAdagrad needs lr > 0, eps >= 0, initial_accumulator_value >= 0; got "
                             f"{lr}, {eps}, {initial_accumulator_value}")
        for name in ("lr_decay", "weight_decay"):
            if unused.get(name):
                raise ValueError(f"SparseRowWiseAdagrad does not offer {name} (got {unused[name]})")
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "sum" not in state:
                    state["sum"] = torch.full((param.shape[0], 1), group["initial_accumulator_value"],
                                              dtype=param.dtype, device=param.device)
                total = state["sum"]
                grad = param.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows = torch.nonzero(grad.abs().sum(1)).flatten()  # rows looked up (a zero row is left alone)
                    values = grad[rows]
                if rows.numel() == 0:
                    continue
                row_sum = total[rows] + values.pow(2).mean(1, keepdim=True)
                total[rows] = row_sum
                param[rows] = param[rows] - group["lr"] * values / (row_sum.sqrt() + group["eps"])
        return loss


# Embedding optimizers that take sparse gradients, by the class fused into a parameter: the plain-PyTorch
# hot/cold path trains its tables with sparse gradients, so only these can come along.
_SPARSE_CAPABLE: dict[type, type[torch.optim.Optimizer]] = {
    RowWiseAdagrad: SparseRowWiseAdagrad,
    SparseRowWiseAdagrad: SparseRowWiseAdagrad,
    torch.optim.Adagrad: torch.optim.Adagrad,
    torch.optim.SGD: torch.optim.SGD,
}


def sparse_capable(optimizer_class: type) -> type[torch.optim.Optimizer]:
    """The optimizer that does ``optimizer_class``'s update from sparse gradients (row-wise Adagrad, Adagrad,
    SGD); a clear error for the others."""
    if optimizer_class not in _SPARSE_CAPABLE:
        raise ValueError(f"{optimizer_class.__name__} does not take sparse gradients; the plain-PyTorch hot/cold path "
                         "trains embeddings with rowwise_adagrad, adagrad or sgd")
    return _SPARSE_CAPABLE[optimizer_class]
