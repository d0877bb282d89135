"""Small collectives every part uses to decide the same thing on every rank (no-ops without a process group)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_ints", "all_reduce_max", "all_reduce_sum", "broadcast_object", "collective_device",
           "distributed", "rank", "world_size"]


def distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def collective_device() -> torch.device:
    """Where collective tensors must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(tensor: Tensor, op: Any) -> Tensor:
    if not distributed():
        return tensor
    moved = tensor.to(collective_device())
    dist.all_reduce(moved, op=op)
    return moved.to(tensor.device)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum over ranks (a new tensor on ``tensor``'s device; ``tensor`` itself on one rank)."""
    return _reduce(tensor, dist.ReduceOp.SUM if dist.is_available() else None)


def all_reduce_max(tensor: Tensor) -> Tensor:
    """The element-wise maximum over ranks."""
    return _reduce(tensor, dist.ReduceOp.MAX if dist.is_available() else None)


def all_gather_ints(values: list[int]) -> Tensor:
    """``[world_size, len(values)]``: every rank's values, one row per rank (one row without a process group)."""
    local = torch.tensor(values, dtype=torch.int64)
    if not distributed():
        return local[None]
    local = local.to(collective_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).cpu()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (picklable objects)."""
    if not distributed():
        return value
    payload = [value]
    dist.broadcast_object_list(payload, src=src)
    return payload[0]
