"""Moving state between sharded (TorchRec ``ShardedTensor``) and plain (unsharded) form, and sharded checkpoints.

A sharded checkpoint is a directory: ``torch.distributed.checkpoint`` files holding every rank's shards of
the model and of the fused embedding optimizer, plus ``meta.pt`` with everything else Lightning saves
(loops, callbacks, dense optimizer, schedulers), written aside and published atomically
(:mod:`~lightning_skew.torchrec.atomic`).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from lightning_skew.core.distributed import all_reduce_sum, broadcast_object, rank
from lightning_skew.core.safe_load import UnsafeFileError, load_data, restricted_load
from lightning_skew.torchrec.atomic import (
    IncompleteCheckpointError,
    incomplete_reason,
    publish,
    reached,
    resolve_for_loading,
    staging_dir,
)

META_FILE = "meta.pt"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete sharded checkpoint: sealed, every file there in its size (its contents are
    checked when it is loaded; see :func:`~lightning_skew.torchrec.atomic.incomplete_reason`)."""
    return Path(path).is_dir() and incomplete_reason(path, contents=False) is None


def copy_into_shards(target: dict[str, Any], source: dict[str, torch.Tensor]) -> list[str]:
    """Copy plain full tensors of ``source`` into the local shards of the ``ShardedTensor`` s of ``target``.

    ``target`` is a module's ``state_dict()`` whose sharded entries are views of the live weights, so the copy
    changes the model. Entries of ``source`` that are themselves sharded are skipped. Returns the keys copied.
    """
    copied = []
    for key, value in source.items():
        sharded = target.get(key)
        if not isinstance(sharded, ShardedTensor) or isinstance(value, ShardedTensor):
            continue
        if tuple(value.shape) != tuple(sharded.size()):
            raise ValueError(f"{key}: the checkpoint holds shape {tuple(value.shape)} but the model's table is "
                             f"{tuple(sharded.size())}; was it trained with other table sizes?")
        for shard in sharded.local_shards():
            region = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                          shard.metadata.shard_sizes, strict=True))
            shard.tensor.copy_(value[region])
        copied.append(key)
    return copied


def gather_unsharded(state: dict[str, Any], dst: int = 0) -> dict[str, torch.Tensor]:
    """Return ``state`` with every ``ShardedTensor`` assembled into one full tensor on rank ``dst``.

    Ranks may hold different keys (TorchRec's fused optimizer lists only local tables' state). A collective:
    every rank must call it. Ranks other than ``dst`` receive only the plain entries.
    """
    local = {key: (tuple(value.size()), value.dtype,
                   [(shard.metadata.shard_offsets, shard.tensor.detach().cpu().clone())
                    for shard in value.local_shards()])
             for key, value in state.items() if isinstance(value, ShardedTensor)}
    if dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        pieces: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
        dist.gather_object(local, pieces, dst=dst)
    else:
        rank, pieces = 0, [local]
    plain: dict[str, torch.Tensor] = {}
    for piece in pieces or []:
        for key, (size, dtype, shards) in piece.items():
            full = plain.setdefault(key, torch.zeros(size, dtype=dtype))
            for offsets, tensor in shards:
                full[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True))] = tensor
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not isinstance(value, ShardedTensor):
            plain[key] = value.detach().cpu().clone()
    return plain


def save_sharded_checkpoint(path: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any],
                            is_global_zero: bool) -> None:
    """Write ``tensors`` (sharded and replicated) from every rank and ``meta`` from rank zero into a fresh
    directory, then put it in place as ``path`` at once (see :mod:`~lightning_skew.torchrec.atomic`). Collective."""
    path = Path(path)
    if path.is_file():
        raise FileExistsError(f"{path} is a file; a sharded checkpoint is a directory")
    directory = broadcast_object(staging_dir(path) if is_global_zero else None)  # made by rank zero
    if dist.is_initialized():
        dist.barrier()
    reached("staged", directory)
    try:
        dcp.save(tensors, checkpoint_id=str(directory))
    except CheckpointException as error:  # every rank gets it: each says why
        failures = [failure[0] for failure in error.failures.values()]
        written = next((f for f in failures if isinstance(f, OSError)), None)
        if written is None:
            raise
        raise _write_error(written, path, directory, is_global_zero) from error
    reached("tensors_written", path)
    if dist.is_initialized():
        dist.barrier()
    failure: OSError | None = None
    if is_global_zero:
        try:
            with open(directory / META_FILE, "wb") as file:  # a file object: a full disk is an OSError, not a
                torch.save(meta, file)                         # C++ "unexpected pos"
        except OSError as error:
            failure = _write_error(error, path, directory, is_global_zero)
        else:
            reached("meta_written", path)
            publish(path, directory)
    # No rank goes on (and may read it) before the checkpoint is visible; none waits on a rank zero that failed.
    failure = broadcast_object(failure)
    if failure is not None:
        raise failure


def _write_error(error: OSError, path: Path, directory: Path, is_global_zero: bool) -> OSError:
    """The error of a failed write, naming the checkpoint (and a full disk as such); the staging directory goes."""
    if is_global_zero:
        shutil.rmtree(directory, ignore_errors=True)  # its partial files would only take more space
    if error.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on {path.parent} (the device is full) while saving the "
                                     f"checkpoint {path.name}; it was not saved, earlier checkpoints are kept. Free "
                                     "space there, or save checkpoints elsewhere (ModelCheckpoint(dirpath=...))")
    return OSError(error.errno, f"saving the checkpoint {path} failed: {error}")


def load_sharded_checkpoint(path: str | os.PathLike, template: dict[str, Any]) -> dict[str, Any]:
    """Load the tensors of a complete sharded checkpoint into ``template`` in place and return its ``meta``
    (``last`` falls back to the newest complete checkpoint beside it). Collective.

    Nothing in the files is run: ``.metadata`` is read admitting only ``torch.distributed.checkpoint``'s metadata
    classes, values and ``meta.pt`` with ``weights_only`` (an :class:`~lightning_skew.core.safe_load.UnsafeFileError`
    naming the file otherwise).
    """
    directory = broadcast_object(_resolve(path) if rank() == 0 else None)  # rank zero reads and checks the files
    if isinstance(directory, Exception):
        raise directory
    meta = load_data(directory / META_FILE, "checkpoint's meta.pt")  # the small files first: refused before the shards
    reader = SafeFileSystemReader(directory)
    reader.read_metadata()  # refused here, with its own error, rather than wrapped by the load below
    try:
        dcp.load(template, storage_reader=reader, planner=SafeLoadPlanner(directory))
    except CheckpointException as error:
        refusals = [failure[0] for failure in error.failures.values() if isinstance(failure[0], UnsafeFileError)]
        if refusals:
            raise refusals[0] from None
        raise
    return meta


def _resolve(path: str | os.PathLike) -> Path | Exception:
    try:
        return resolve_for_loading(path)
    except IncompleteCheckpointError as error:
        return error


# What ``torch.distributed.checkpoint`` pickles into ``.metadata``: its own dataclasses, sizes, dtypes and layouts.
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}
_DCP_GLOBALS |= {("torch.distributed.checkpoint.metadata", name) for name in dir(dcp_metadata)
                 if isinstance(getattr(dcp_metadata, name), type)
                 and getattr(dcp_metadata, name).__module__ == dcp_metadata.__name__}


def _dcp_global(module: str, name: str) -> Any:
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
        return getattr(torch, name)
    if (module, name) not in _DCP_GLOBALS:
        return None
    return getattr(__import__(module, fromlist=[name]), name)


class SafeFileSystemReader(FileSystemReader):
    """``torch.distributed.checkpoint``'s file reader, reading ``.metadata`` (a pickle) through an unpickler that
    admits only the checkpoint-metadata classes, before any of it reaches the reader."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        metadata = restricted_load(path, _dcp_global, "checkpoint metadata")
        if not isinstance(metadata, Metadata):
            raise UnsafeFileError(f"{path} holds a {type(metadata).__name__}, not torch.distributed.checkpoint "
                                  "metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor values are read with ``weights_only=True`` (torch's own planner
    unpickles them without restriction)."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = load_data(value, f"value {read_item.dest_index.fqn!r}", name=self.directory)
        plain = io.BytesIO()
        torch.save(loaded, plain)  # the parent places it; what it unpickles now is what we just wrote
        plain.seek(0)
        super().load_bytes(read_item, plain)


def _shard_regions(tensor: ShardedTensor, rows: torch.Tensor):
    """For each local shard: the positions in ``rows`` it holds, their local row indices, and its columns."""
    for shard in tensor.local_shards():
        offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        held = (rows >= offsets[0]) & (rows < offsets[0] + sizes[0])
        if bool(held.any()):
            columns = tuple(slice(o, o + n) for o, n in zip(offsets[1:], sizes[1:], strict=True))
            yield shard.tensor, held, rows[held] - offsets[0], columns


def read_rows(tensor: ShardedTensor | None, rows: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
              ) -> torch.Tensor:
    """Whole rows (first dimension) ``rows`` of a sharded tensor of ``shape``, on every rank, on the CPU.

    Each rank fills what its shards hold and the ranks sum (every element lives on one rank). A collective
    when distributed: every rank calls it, in the same order; a rank whose optimizer lists no such tensor
    passes ``None``.
    """
    out = torch.zeros((rows.numel(), *shape[1:]), dtype=dtype)
    if tensor is not None:
        for local, held, local_rows, columns in _shard_regions(tensor, rows):
            out[(held, *columns)] = local[local_rows].cpu()
    return all_reduce_sum(out)


def write_rows(tensor: ShardedTensor | None, rows: torch.Tensor, values: torch.Tensor) -> None:
    """Write whole rows ``values`` at ``rows`` into the parts of a sharded tensor this rank holds (in place)."""
    if tensor is None:
        return
    for local, held, local_rows, columns in _shard_regions(tensor, rows):
        local[local_rows] = values[(held, *columns)].to(local.device, local.dtype)


def read_checkpoint_file(path: Path, weights_only: bool | None) -> dict[str, Any]:
    """An ordinary (file) checkpoint, read with ``weights_only=True`` unless the caller passed ``False`` (Lightning's
    ``fit(..., weights_only=False)``: the caller vouches for the file); see :mod:`~lightning_skew.core.safe_load`."""
    if weights_only is False:
        return torch.load(path, map_location="cpu", weights_only=False)
    return load_data(path, "checkpoint")


def weights_or_full(path: Path, checkpoint: dict[str, Any], fitting: bool = True) -> dict[str, Any]:
    """A checkpoint file as Lightning restores it. An export (weights only, no optimizer state, as
    :meth:`TorchRecStrategy.export_unsharded_checkpoint` writes) starts a new run from its weights: the
    embedding and dense optimizers and the loops start fresh, which is said once."""
    if "optimizer_states" in checkpoint:
        return checkpoint
    if fitting:
        rank_zero_warn(f"{path} holds weights only (an export): the run starts from these weights at epoch 0, with "
                       "fresh optimizer state (embedding and dense)")
    return {**checkpoint, "optimizer_states": [], "lr_schedulers": []}
