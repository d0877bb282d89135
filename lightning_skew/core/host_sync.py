"""Counting the operations of a training step that would make a CUDA device wait for the host (host syncs).

On a GPU, an operation whose result size or value the host must know before it can go on (``.item()``,
``bool(t)``, ``nonzero``, boolean-mask indexing, ``unique``, ``repeat_interleave`` without ``output_size``,
``masked_select``, a copy to host memory) stalls the host until every kernel queued before it has run, so the
host can no longer run ahead of the device. :class:`HostSyncCounter` sees these operations on any device,
CPU tensors included, through a ``TorchDispatchMode``, so a CPU test can prove a step GPU-clean;
:class:`StepHostSyncs` counts them per training step of a ``Trainer.fit``.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "UPSTREAM_PACKAGES", "HostSyncCounter", "StepHostSyncs", "is_host_sync"]

aten = torch.ops.aten

#: Operations that always need a value or a size from the device (by their overload packet).
SYNC_OPS: frozenset = frozenset({
    aten._local_scalar_dense,  # .item(), int(t), float(t), bool(t)
    aten.nonzero,
    aten.nonzero_static,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
    aten.is_nonzero,
})


def _bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def is_host_sync(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The name under which ``func(*args, **kwargs)`` counts as a host sync, or ``None`` when it is not one."""
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return packet.__name__
    if packet in (aten.index, aten._unsafe_index) and _bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
        return "index with a boolean mask"
    if packet in (aten.index_put, aten.index_put_) and _bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
        return "index_put with a boolean mask"
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor \
            and kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None):
        return "repeat_interleave without output_size"
    if packet in (aten._to_copy, aten.copy_):
        source = args[0] if packet is aten._to_copy else args[1]
        target = kwargs.get("device") if packet is aten._to_copy else args[0].device
        if isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None \
                and torch.device(target).type == "cpu":
            return "copy to host memory"
    return None


#: Packages whose own host syncs a step inherits from the baseline it is measured against (TorchRec's input
#: distribution and FBGEMM's host-side kernels run in every TorchRec step, with or without lightning-skew).
UPSTREAM_PACKAGES: tuple[str, ...] = ("torchrec", "fbgemm_gpu")


# Frames of the dispatch machinery between the code that issued an operation and the mode that sees it.
_DISPATCH_FILES = (f"torch{os.sep}_ops.py", f"torch{os.sep}utils{os.sep}_python_dispatch.py",
                   f"torch{os.sep}_tensor.py", f"torch{os.sep}overrides.py", f"torch{os.sep}_compile.py",
                   f"torch{os.sep}_dynamo{os.sep}eval_frame.py", f"torch{os.sep}nn{os.sep}modules{os.sep}module.py",
                   __file__)


def _issued_from(packages: tuple[str, ...]) -> bool:
    """Whether the innermost frame of the Python stack outside the dispatch machinery lies in ``packages``."""
    markers = tuple(f"{os.sep}{name}{os.sep}" for name in packages)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.endswith(_DISPATCH_FILES):
        frame = frame.f_back
    return frame is not None and any(marker in frame.f_code.co_filename for marker in markers)


class HostSyncCounter(TorchDispatchMode):
    """Counts the host syncs (see :func:`is_host_sync`) of the operations run inside it, by name.

    Args:
        upstream: packages whose syncs are counted apart, in :attr:`upstream_counts` (issued by their code: the
            innermost Python frame is theirs), so that :attr:`counts` holds the syncs of the model's and lightning-skew's own code.

    Example::

        >>> import torch
        >>> with HostSyncCounter() as counter:
        ...     x = torch.arange(4)
        ...     _ = x[x > 1], int(x.sum())
        >>> sorted(counter.counts.items())
        [('_local_scalar_dense', 1), ('index with a boolean mask', 1)]

    .. note::
        A copy between host tensors is not a sync and cannot be told from a device-to-host copy on a machine
        without a device; ``tolist()`` of a host tensor reads its memory without an operation, so it is seen
        only where the tensor lives on a device.
    """

    def __init__(self, upstream: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.upstream = tuple(upstream)
        self.counts: Counter[str] = Counter()
        self.upstream_counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = is_host_sync(func, args, kwargs)
        if name is not None:
            upstream = bool(self.upstream) and _issued_from(self.upstream)
            (self.upstream_counts if upstream else self.counts)[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class StepHostSyncs(pl.Callback):
    """Counts the host syncs of each training step (from ``on_train_batch_start`` to ``on_train_batch_end``).

    Put it first among the callbacks, so that the others' per-step work counts as part of the step. The work
    done before ``on_train_batch_start`` (reading the batch, the data pipeline, the copy to the device) is not
    counted: that is where host decisions belong.

    Args:
        skip_steps: Leading steps not counted (set-up work of the first steps: caches, lazy initialisation).
        upstream: packages whose syncs are counted apart (default TorchRec's and FBGEMM's: the baseline step's).

    Attributes:
        per_step: one ``Counter`` (name -> count) per counted step, of the syncs outside ``upstream``.
        upstream_per_step: the same for the syncs of ``upstream``.
    """

    def __init__(self, skip_steps: int = 2, upstream: tuple[str, ...] = UPSTREAM_PACKAGES) -> None:
        self.skip_steps = skip_steps
        self.upstream = tuple(upstream)
        self.per_step: list[Counter[str]] = []
        self.upstream_per_step: list[Counter[str]] = []
        self._mode: HostSyncCounter | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step >= self.skip_steps:
            self._mode = HostSyncCounter(self.upstream)
            self._mode.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._leave()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave()

    def _leave(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.per_step.append(self._mode.counts)
            self.upstream_per_step.append(self._mode.upstream_counts)
            self._mode = None

    @property
    def max_per_step(self) -> Counter[str]:
        """Per name, the most syncs any counted step made."""
        most: Counter[str] = Counter()
        for counts in self.per_step:
            for name, count in counts.items():
                most[name] = max(most[name], count)
        return most
