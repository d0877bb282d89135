"""TorchRec's train pipelines under Lightning's loop: which pipeline applies, and the batch stream both read."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchrec.distributed.train_pipeline.train_pipelines import (
    PrefetchTrainPipelineSparseDist,
    TrainPipelineSemiSync,
    TrainPipelineSparseDist,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.loaders import LoaderView

__all__ = ["PIPELINES", "PipelinedLoader", "StepStream", "build_pipeline", "check_pipeline", "check_pipeline_name",
           "check_same_batch"]

#: ``TorchRecStrategy(pipeline=...)`` names, and TorchRec's class for each.
PIPELINES: dict[str, type[TrainPipelineSparseDist]] = {
    "sparse_dist": TrainPipelineSparseDist,
    "semi_sync": TrainPipelineSemiSync,
    "prefetch": PrefetchTrainPipelineSparseDist,
}


def check_pipeline_name(name: str | None) -> None:
    """Fail unless ``name`` is ``None`` or names one of :data:`PIPELINES`."""
    if name is not None and name not in PIPELINES:
        raise ValueError(f"TorchRecStrategy: pipeline must be None or one of {sorted(PIPELINES)}, got {name!r}")


def check_pipeline(name: str | None, device: torch.device, kernels: Iterable[str]) -> None:
    """Fail unless pipeline ``name`` runs on ``device`` with tables of these compute ``kernels``.

    ``sparse_dist`` runs everywhere (on CPU it has no CUDA streams, but still distributes the next batch's
    inputs while the current one trains). ``semi_sync`` records CUDA events and streams on every batch;
    ``prefetch`` fills TorchRec's UVM cache ahead of the step, so it needs ``fused_uvm_caching`` tables.
    """
    check_pipeline_name(name)
    if name == "semi_sync" and device.type != "cuda":
        raise MisconfigurationException(
            "TorchRecStrategy(pipeline='semi_sync') needs CUDA: TorchRec's semi-synchronous pipeline overlaps the "
            f"embedding lookup with CUDA events and streams, and this run trains on {device.type}. Use "
            "pipeline='sparse_dist' on CPU.")
    if name == "prefetch":
        if device.type != "cuda" or "fused_uvm_caching" not in set(kernels):
            raise MisconfigurationException(
                "TorchRecStrategy(pipeline='prefetch') prefetches rows into TorchRec's UVM cache, so it needs CUDA "
                f"and tables with compute_kernel='fused_uvm_caching' (this run: {device.type}, kernels "
                f"{sorted(set(kernels))}). Use pipeline='sparse_dist' otherwise.")


def build_pipeline(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                   model_fwd: Callable[[Any], tuple[Tensor, Any]]) -> TrainPipelineSparseDist:
    """TorchRec's pipeline ``name`` over ``model`` (the ``DistributedModelParallel``), stepping ``optimizer`` (the
    dense one; embedding rows are updated by their fused optimizers inside backward), with ``model_fwd(batch) ->
    (loss, output)`` as its forward."""
    options: dict[str, Any] = {"start_batch": 0} if name == "semi_sync" else {}
    return PIPELINES[name](model, optimizer, device, execute_all_batches=True, custom_model_fwd=model_fwd, **options)


class StepStream:
    """One epoch of the training loader, read by two: Lightning's loop (the batch of each step, which its hooks
    see) and the pipeline (which reads up to two batches ahead of the step it trains). Every batch is read once
    from the loader and kept until both have read it.

    :meth:`trained_next` names the batch the pipeline trains at the coming step: the oldest it has read and not
    yet trained (it trains in the order it reads).
    """

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = batches
        self._kept: deque[Any] = deque()
        self._first = 0  # position in the epoch of _kept[0]
        self._read = 0  # batches read from the loader
        self._loop = 0  # batches handed to Lightning's loop
        self._pipeline = 0  # batches handed to the pipeline
        self._trained = 0  # batches the pipeline trained (one per step)
        self.for_pipeline: Iterator[Any] = _Reader(self, "pipeline")

    def _next(self, reader: str) -> Any:
        position = getattr(self, f"_{reader}")
        if position == self._read:
            self._kept.append(next(self._batches))  # StopIteration ends the epoch for both readers
            self._read += 1
        batch = self._kept[position - self._first]
        setattr(self, f"_{reader}", position + 1)
        self._forget()
        return batch

    def _forget(self) -> None:
        while self._kept and self._first < min(self._loop, self._pipeline, self._trained):
            self._kept.popleft()
            self._first += 1

    def for_loop(self) -> Any:
        """The next batch for Lightning's loop."""
        return self._next("loop")

    def trained_next(self) -> Any:
        """The batch the pipeline trains at the coming step: the oldest it has read and not trained (at the first
        step of an epoch, the one it reads first)."""
        if self._trained >= self._read:
            raise RuntimeError("TorchRecStrategy: the pipeline has no batch for this step (the loop and the pipeline "
                               "went apart)")
        return self._kept[self._trained - self._first]

    def step_done(self) -> None:
        """The pipeline trained one more batch."""
        self._trained += 1
        self._forget()


class _Reader(Iterator[Any]):
    def __init__(self, stream: StepStream, reader: str) -> None:
        self._stream = stream
        self._reader = reader

    def __next__(self) -> Any:
        return self._stream._next(self._reader)


class PipelinedLoader(LoaderView):
    """The training loader as Lightning's loop reads it when the strategy trains through a pipeline: each epoch a
    fresh :class:`StepStream` handed to ``on_epoch(stream)``, Lightning reading its side. Length, sampler and
    every other attribute are the inner loader's; outside training (``is_training()`` false) it is the inner
    loader unchanged."""

    def __init__(self, loader: Any, on_epoch: Callable[[StepStream], None], is_training: Callable[[], bool]) -> None:
        super().__init__(loader)
        self.__dict__["_on_epoch"] = on_epoch
        self.__dict__["_is_training"] = is_training

    def __iter__(self) -> Iterator[Any]:
        if not self._is_training():
            yield from self.loader
            return
        stream = StepStream(iter(self.loader))
        self._on_epoch(stream)
        while True:
            try:
                batch = stream.for_loop()
            except StopIteration:
                return
            yield batch


def _parts(batch: Any) -> dict[str, Any]:
    """The tensors and settings of a batch by name, KeyedJaggedTensors by their tensors."""
    if dataclasses.is_dataclass(batch):
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    else:
        fields = {"batch": batch}
    parts = {}
    for name, value in fields.items():
        if isinstance(value, KeyedJaggedTensor):
            parts[f"{name}.keys"] = tuple(value.keys())
            parts[f"{name}.values"] = value.values()
            parts[f"{name}.lengths"] = value.lengths()
            parts[f"{name}.weights"] = value.weights_or_none()
        else:
            parts[name] = value
    return parts


def check_same_batch(shown: Any, trained: Any) -> None:
    """Fail unless ``shown`` (the batch of this step as Lightning's hooks left it) holds the very tensors of
    ``trained`` (the batch as the pipeline took it from the loader, one or two steps ago)."""
    if shown is trained:
        return
    a, b = _parts(shown), _parts(trained)
    changed = sorted(k for k in a.keys() | b.keys()
                     if k not in a or k not in b or not _same(a[k], b[k]))
    if changed:
        raise MisconfigurationException(
            f"TorchRecStrategy(pipeline=...): the batch of this step was changed after the pipeline took it from the "
            f"loader ({', '.join(changed)} differ). The pipeline reads batches up to two steps ahead and has already "
            "distributed their sparse features, so a change made in on_before_batch_transfer, "
            "transfer_batch_to_device, on_after_batch_transfer or a callback's on_train_batch_start cannot reach "
            "the step. Change batches in the DataModule's loader instead (e.g. StaleEmbeddingSkipper(repack=True) "
            "with RepackedDataModule), or train without the pipeline.")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a truth value compare by identity
        return a is b
