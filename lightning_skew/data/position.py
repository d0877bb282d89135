"""Where a training stream stands within its epoch, so that a run resumed mid-epoch goes on with the next batch."""

from __future__ import annotations

from typing import Any

__all__ = ["StreamPosition"]


class StreamPosition:
    """The training batches a DataModule's loader handed to the training loop in the current epoch.

    The DataModule counts each batch the loop takes (:meth:`taken`, from ``on_before_batch_transfer`` while
    training: a batch fetched ahead is not counted), saves :meth:`state_dict` in checkpoints, and asks
    :meth:`skip`, when it builds its training stream, how many batches of that epoch a resumed run has already
    trained. A checkpoint taken at the end of an epoch skips nothing.
    """

    def __init__(self) -> None:
        self.epoch = -1
        self.position = 0
        self._resume: tuple[int, int] | None = None

    def taken(self, epoch: int) -> None:
        """The training loop took one more batch, in ``epoch``."""
        self._resume = None  # training goes on from here: later loaders start their epochs at 0
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        self.position += 1

    def skip(self, epoch: int, epoch_length: int) -> int:
        """Batches of ``epoch`` to leave out because a resumed run trained them before its checkpoint (until the
        training loop takes its first batch)."""
        resume = self._resume
        if resume is None or resume[0] != epoch or resume[1] >= epoch_length:
            return 0
        self.epoch, self.position = resume
        return resume[1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._resume = (self.epoch, self.position) if self.epoch >= 0 and self.position > 0 else None
