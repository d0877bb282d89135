"""What several techniques' benchmark variants share: the hot-set budget and profile, epoch time, peak GPU memory."""

from __future__ import annotations

import torch

from lightning_skew.bench.types import Recipe
from lightning_skew.profile.sources import ProfiledHotRows

# Popularity batching (FAE, Hotline): the hot set fits this many bytes of rows plus optimizer state; for the
# default recipe 8 MB covers about 96% of lookups and makes about a third of the inputs all-hot.
POPULARITY_HOT_BUDGET_BYTES = 8_000_000
# Hot/cold placement (FAE): hot rows get the popularity variants' budget (TorchRec's UVM cache is sized to it too).
HOT_COLD_BUDGET_BYTES = POPULARITY_HOT_BUDGET_BYTES


def embedding_dim_of(recipe: Recipe) -> int:
    """The recipe model's embedding dimension (16 where its hyperparameters do not say)."""
    return int(recipe.model.hparams.get("embedding_dim", 16))


def profiled_hot_rows(recipe: Recipe) -> ProfiledHotRows:
    """The hot set of the popularity, stale (``p``) and hot/cold variants: a 5% batch profile cut to 8 MB."""
    return ProfiledHotRows(budget_bytes=POPULARITY_HOT_BUDGET_BYTES, embedding_dim=embedding_dim_of(recipe),
                           sample_fraction=0.05)


def epoch_seconds(ends: list[float]) -> float:
    """Wall time of the steps that ended at ``ends``; the first step's start is not recorded, so that step is
    taken as long as the mean of the others."""
    return (ends[-1] - ends[0]) * len(ends) / max(len(ends) - 1, 1)


def reset_gpu_peak(accelerator: str) -> None:
    """Start counting peak GPU memory (on ``accelerator="gpu"``; fails where CUDA is missing)."""
    if accelerator != "cpu":
        if not torch.cuda.is_available():
            raise RuntimeError("the gpu_* benchmark variants need CUDA (and FBGEMM's CUDA build); this machine has none")
        torch.cuda.reset_peak_memory_stats()


def gpu_peak(accelerator: str) -> dict[str, float]:
    """``{"gpu_peak_mb": ...}`` since :func:`reset_gpu_peak`, or nothing on CPU."""
    return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 1e6} if accelerator != "cpu" else {}
