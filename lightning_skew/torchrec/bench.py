"""``lightning-skew bench`` variants of TorchRecStrategy on one GPU: tables in GPU memory, host memory, a UVM cache."""

from __future__ import annotations

from lightning_skew.bench.helpers import HOT_COLD_BUDGET_BYTES, embedding_dim_of, gpu_peak, reset_gpu_peak
from lightning_skew.bench.runner import fit_with_lightning
from lightning_skew.bench.types import Recipe, TrainedRun, register_variant
from lightning_skew.torchrec.strategy import TorchRecStrategy

# The CPU baselines (handwritten, lightning) are the runner's own: lightning_skew.bench.runner.


def fit_on_gpu(recipe: Recipe, compute_kernel: str, cache_load_factor: float | None = None) -> TrainedRun:
    """Lightning with :class:`TorchRecStrategy` on one GPU, every table with ``compute_kernel``."""
    reset_gpu_peak("gpu")
    run = fit_with_lightning(recipe, strategy=TorchRecStrategy(compute_kernel=compute_kernel,
                                                               cache_load_factor=cache_load_factor),
                             accelerator="gpu")
    run.extras = gpu_peak("gpu")
    return run


def hot_share_of_rows(recipe: Recipe, budget_bytes: int) -> float:
    """The share of all table rows (weights plus rowwise_adagrad state) that ``budget_bytes`` holds: the cache
    load factor that gives TorchRec's UVM cache the hot/cold variants' GPU memory."""
    dim = embedding_dim_of(recipe)
    rows = sum(recipe.datamodule.num_embeddings_per_feature)
    return min(1.0, budget_bytes / (rows * 4 * (dim + 1)))


register_variant("gpu_hbm", "GPU, every table in GPU memory (fused)")(lambda recipe: fit_on_gpu(recipe, "fused"))
register_variant("gpu_host", "GPU, every table in host memory (fused_uvm)")(
    lambda recipe: fit_on_gpu(recipe, "fused_uvm"))
register_variant("gpu_uvm_cache", "GPU, TorchRec's UVM cache sized to the hot/cold budget")(
    lambda recipe: fit_on_gpu(recipe, "fused_uvm_caching", hot_share_of_rows(recipe, HOT_COLD_BUDGET_BYTES)))
