"""Where a training stream stands within its epoch, so that a run resumed mid-epoch goes on with the next batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["FileSplitLoaders", "ResumableTrainStream", "ResumingLoader", "StreamPosition"]


class StreamPosition:
    """The training batches a DataModule's loader handed to the training loop in the current epoch.

    The DataModule counts each batch the loop takes (:meth:`taken`, from ``on_before_batch_transfer`` while
    training: a batch fetched ahead is not counted), saves :meth:`state_dict` in checkpoints, and asks
    :meth:`skip`, as each pass over its training stream begins, how many batches of that epoch a resumed run has
    already trained. A checkpoint taken at the end of an epoch skips nothing.

    The inputs per global batch (``batch_size * world_size``) given to :meth:`skip` are saved as well, so that a
    run resumed with another global batch size skips the same inputs (when its batches end where the saved
    position does; else :meth:`skip` refuses, since no batch boundary of the new run matches). So is the length of
    the pass being trained once its stream has ended (:meth:`pass_ended`; Lightning fetches a batch ahead, so
    that is known when its last batch is taken): a stream whose length is not known before it is read (a text
    file) then knows that a checkpoint taken on its last batch ended the epoch.
    """

    def __init__(self) -> None:
        self.epoch = -1
        self.position = 0
        self.global_batch_size: int | None = None
        self.pass_length: int | None = None  # global batches of the pass being trained, once its stream ended
        self._resume: tuple[int, int, int | None] | None = None

    def taken(self, epoch: int) -> None:
        """The training loop took one more batch, in ``epoch``."""
        self._resume = None  # training goes on from here: later loaders start their epochs at 0
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        self.position += 1

    def pass_started(self) -> None:
        """A pass over the training stream begins (its length is not known yet)."""
        self.pass_length = None

    def pass_ended(self, length: int) -> None:
        """The pass's stream ended after ``length`` global batches (those a resumed pass skipped included)."""
        self.pass_length = length

    def skip(self, epoch: int, epoch_length: int | None = None, global_batch_size: int | None = None) -> int:
        """Batches of ``epoch`` to leave out because a resumed run trained them before its checkpoint (until the
        training loop takes its first batch).

        Args:
            epoch: The epoch the training stream is built for.
            epoch_length: Global batches in that epoch; ``None`` when unknown until read (a text stream): the
                reader then checks that the stream is long enough.
            global_batch_size: Inputs per global batch of this run; ``None`` when not known.

        Raises ``ValueError`` when the checkpoint's global batch size differs and the inputs it trained do not end
        on a batch boundary of this run.
        """
        if global_batch_size is not None:
            self.global_batch_size = global_batch_size
        resume = self._resume
        if resume is None or resume[0] != epoch:
            return 0
        position, saved_size = resume[1], resume[2]
        if saved_size is not None and global_batch_size is not None and saved_size != global_batch_size:
            inputs = position * saved_size
            if inputs % global_batch_size:
                raise ValueError(
                    f"the checkpoint was taken after {position} global batches of {saved_size} inputs in epoch "
                    f"{epoch} ({inputs} inputs), and this run's global batches of {global_batch_size} inputs "
                    f"(batch_size x world_size) do not end there: resume with a global batch size that divides "
                    f"{inputs}, or from a checkpoint taken at the end of an epoch")
            position = inputs // global_batch_size
        if epoch_length is not None and position >= epoch_length:
            return 0
        self.epoch, self.position = epoch, position
        return position

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "global_batch_size": self.global_batch_size,
                "epoch_length": self.pass_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        # Both absent from checkpoints written before they were saved.
        saved_size, length = state.get("global_batch_size"), state.get("epoch_length")
        finished = length is not None and self.position >= length
        resumes = self.epoch >= 0 and self.position > 0 and not finished
        self._resume = (self.epoch, self.position, saved_size) if resumes else None


class ResumingLoader(DataLoader):
    """A training ``DataLoader`` that, as each pass begins, tells its dataset how many global batches a resumed run
    already trained, and tells the :class:`StreamPosition` where the pass's stream ends.

    The count is asked when the pass begins, not when the loader is built, and the dataset reads ``skip_first``
    once per pass (in every worker: workers start with the count of their pass) and resets it. The end is noted in
    this process as the last batch is fetched, which Lightning does before that batch's step.

    The loader is resumable in Lightning's own terms (its stateful-dataloader protocol, ``state_dict`` /
    ``load_state_dict``): its state is the stream's position, which the DataModule's checkpoint state holds as well
    (loading the same position twice is harmless).
    """

    position: StreamPosition | None = None
    current_epoch: Callable[[], int] | None = None  # the trainer's epoch; None: 0
    epoch_length: int | None = None
    global_batch_size: int | None = None

    def __iter__(self) -> Any:
        if self.position is None:
            # Under workers an earlier pass's count stays in this process's copy of the dataset.
            self.dataset.skip_first = 0  # type: ignore[attr-defined]
            return super().__iter__()
        epoch = self.current_epoch() if self.current_epoch is not None else 0
        skip = self.position.skip(epoch, self.epoch_length, self.global_batch_size)
        self.dataset.skip_first = skip  # type: ignore[attr-defined]
        return self._pass(super().__iter__(), skip)

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (Lightning saves it with the fit loop's state)."""
        return {"position": self.position.state_dict()} if self.position is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.position is not None and "position" in state:
            self.position.load_state_dict(state["position"])

    def whole_stream(self) -> ResumingLoader:
        """This loader, made to read every batch of every pass and to leave the position alone: for a pass that is
        not training (a profile counted at the start of a resumed fit must see what the uninterrupted one saw)."""
        self.position = None
        return self

    def _pass(self, batches: Iterator[Any], skip: int) -> Iterator[Any]:
        assert self.position is not None
        self.position.pass_started()
        length = skip
        for batch in batches:
            length += 1
            yield batch
        self.position.pass_ended(length)


class ResumableTrainStream:
    """Mid-epoch resume for a :class:`~lightning_skew.data.base.RecDataModule` whose training batches are one
    stream of global batches: mixed in before the DataModule's base class.

    The DataModule sets ``self.position = StreamPosition()`` in ``__init__`` and builds its training loader with
    :meth:`resuming_loader` around a dataset that leaves ``skip_first`` global batches out of its next pass. This
    mixin counts the batches the training loop takes, and saves and restores the position with the checkpoint.
    """

    position: StreamPosition
    trainer: Any

    def resuming_loader(self, dataset: Any, epoch_length: int | None, global_batch_size: int,
                        **loader_arguments: Any) -> ResumingLoader:
        """``DataLoader(dataset, batch_size=None, **loader_arguments)`` whose passes leave out the global batches a
        resumed run already trained (``epoch_length``: global batches per epoch, ``None`` when not known)."""
        loader = ResumingLoader(dataset, batch_size=None, **loader_arguments)
        loader.position, loader.epoch_length, loader.global_batch_size = self.position, epoch_length, global_batch_size
        loader.current_epoch = lambda: self.trainer.current_epoch if self.trainer is not None else 0
        return loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.position.taken(self.trainer.current_epoch)
        return super().on_before_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position in its epoch: a run resumed mid-epoch goes on with the next batch."""
        return {"position": self.position.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "position" in state_dict:
            self.position.load_state_dict(state_dict["position"])


class FileSplitLoaders(ResumableTrainStream):
    """The loaders of a file-backed DataModule with one dataset per split in ``self.datasets``: validation and test
    read their dataset once per pass, training resumes mid-epoch (:class:`ResumableTrainStream`).

    The DataModule gives :meth:`dataset_of` (the split's dataset, ``None`` for a split it does not have) and
    :meth:`train_length` (global batches per training epoch, ``None`` until known), and sets ``num_workers``,
    ``pin_memory``, ``batch_size`` and ``world_size``.
    """

    num_workers: int
    pin_memory: bool
    batch_size: int
    world_size: int

    def dataset_of(self, split: str) -> Any:
        raise NotImplementedError

    def train_length(self, dataset: Any) -> int | None:
        return len(dataset)

    def _loader(self, split: str) -> Any:
        dataset = self.dataset_of(split)
        if dataset is None:
            return []
        if split != "train":
            return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        return self.resuming_loader(dataset, self.train_length(dataset), self.batch_size * self.world_size,
                                    num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> Any:
        return self._loader("train")

    def val_dataloader(self) -> Any:
        return self._loader("val")

    def test_dataloader(self) -> Any:
        return self._loader("test")
