"""Where a training stream stands within its epoch, so that a run resumed mid-epoch goes on with the next batch."""

from __future__ import annotations

from typing import Any

__all__ = ["ResumableTrainStream", "StreamPosition"]


class StreamPosition:
    """The training batches a DataModule's loader handed to the training loop in the current epoch.

    The DataModule counts each batch the loop takes (:meth:`taken`, from ``on_before_batch_transfer`` while
    training: a batch fetched ahead is not counted), saves :meth:`state_dict` in checkpoints, and asks
    :meth:`skip`, when it builds its training stream, how many batches of that epoch a resumed run has already
    trained. A checkpoint taken at the end of an epoch skips nothing.

    The inputs per global batch (``batch_size * world_size``) given to :meth:`skip` are saved as well, so that a
    run resumed with another global batch size skips the same inputs (when its batches end where the saved
    position does; else :meth:`skip` refuses, since no batch boundary of the new run matches).
    """

    def __init__(self) -> None:
        self.epoch = -1
        self.position = 0
        self.global_batch_size: int | None = None
        self._resume: tuple[int, int, int | None] | None = None

    def taken(self, epoch: int) -> None:
        """The training loop took one more batch, in ``epoch``."""
        self._resume = None  # training goes on from here: later loaders start their epochs at 0
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        self.position += 1

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
        return {"epoch": self.epoch, "position": self.position, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        saved_size = state.get("global_batch_size")  # absent from checkpoints written before it was saved
        self._resume = (self.epoch, self.position, saved_size) if self.epoch >= 0 and self.position > 0 else None


class ResumableTrainStream:
    """Mid-epoch resume for a :class:`~lightning_skew.data.base.RecDataModule` whose training batches are one
    stream of global batches: mixed in before the DataModule's base class.

    The DataModule sets ``self.position = StreamPosition()`` in ``__init__`` and, when it builds its training
    dataset, gives it :meth:`batches_to_skip` (the dataset leaves that many global batches out of its first
    pass, in every DataLoader worker). This mixin counts the batches the training loop takes, and saves and
    restores the position with the checkpoint.
    """

    position: StreamPosition
    trainer: Any

    def batches_to_skip(self, epoch_length: int | None, global_batch_size: int) -> int:
        """Global batches of the epoch about to start that a resumed run already trained (0 unless resumed)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self.position.skip(epoch, epoch_length, global_batch_size)

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
