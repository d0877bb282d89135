"""The private state of torch and TorchRec that lightning-skew relies on, each use behind one function here, with the
upstream reason it is not public.

Nothing else in the package touches these names; when upstream makes one public (or renames it), this module is
the one place to change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# torch's "optimizer in backward" is how an embedding optimizer reaches TorchRec's fused kernels: the sharder reads
# the optimizer classes and arguments it records on each parameter. It moved from TorchRec into torch as a private
# API (pytorch/pytorch#87397) and stayed private; TorchRec's own examples call it by this name.
from torch.distributed.optim import _apply_optimizer_in_backward

__all__ = ["apply_optimizer_in_backward", "in_backward_optimizer_classes", "in_backward_optimizer_kwargs",
           "in_backward_optimizers", "pipeline_model_attached", "pipelined_modules"]


def apply_optimizer_in_backward(optimizer_class: type[torch.optim.Optimizer], params: Iterable[nn.Parameter],
                                kwargs: dict[str, Any]) -> None:
    """Attach ``optimizer_class(**kwargs)`` to each of ``params``, run during backward (TorchRec's sharder fuses
    it into the embedding kernel); torch's ``_apply_optimizer_in_backward``."""
    _apply_optimizer_in_backward(optimizer_class, params, kwargs)


def in_backward_optimizers(param: Any) -> list[torch.optim.Optimizer]:
    """The optimizers :func:`apply_optimizer_in_backward` attached to ``param`` (``[]``: none, or a parameter that
    TorchRec sharded, whose update its fused kernel holds). torch sets them as ``param._in_backward_optimizers``;
    its only getter (``_get_in_backward_optimizers``, pytorch/pytorch#105991) is private too and walks a whole
    module."""
    return list(getattr(param, "_in_backward_optimizers", None) or [])


def in_backward_optimizer_classes(param: Any) -> list[type]:
    """The optimizer classes recorded on ``param`` for TorchRec's sharder (``param._optimizer_classes``, which
    TorchRec reads to choose the fused kernel; ``[]``: none). A sharded table keeps them."""
    return list(getattr(param, "_optimizer_classes", None) or [])


def in_backward_optimizer_kwargs(param: Any) -> list[dict[str, Any]]:
    """The optimizer arguments recorded next to :func:`in_backward_optimizer_classes` (``param._optimizer_kwargs``),
    one dict per class."""
    return [dict(kwargs) for kwargs in getattr(param, "_optimizer_kwargs", None) or []]


# TorchRec's TrainPipelineSparseDist (1.8) says neither which modules it rewrote to take their input from the
# pipeline nor whether its rewritten forwards are installed; its attach()/detach() flip a private flag.
def pipelined_modules(pipeline: Any) -> list[nn.Module]:
    """The sharded modules ``pipeline`` feeds (``[]`` before its first step, or when no module takes its input
    straight from the batch)."""
    return list(pipeline._pipelined_modules)


def pipeline_model_attached(pipeline: Any) -> bool:
    """Whether ``pipeline``'s rewritten forwards are installed on the model (``detach()`` takes them off)."""
    return bool(pipeline._model_attached)
