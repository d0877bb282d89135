"""TorchRec under Lightning: the strategy, its sharding plan, sharded checkpoints and embedding optimizers."""

from lightning_skew.torchrec.strategy import TorchRecStrategy

__all__ = ["TorchRecStrategy"]
