"""``lightning-skew bench`` variants of TorchRecStrategy: TorchRec's train pipeline with and without Lightning (CPU),
and on one GPU tables in GPU memory, host memory, a UVM cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline.train_pipelines import TrainPipelineSparseDist

from lightning_skew.bench.helpers import HOT_COLD_BUDGET_BYTES, embedding_dim_of, gpu_peak, reset_gpu_peak
from lightning_skew.bench.runner import _dense_optimizer, ensure_process_group, fit_with_lightning
from lightning_skew.bench.types import Recipe, StepClock, TrainedRun, register_variant
from lightning_skew.torchrec.sharding import shard_module
from lightning_skew.torchrec.strategy import TorchRecStrategy

# The CPU baselines (handwritten, lightning) are the runner's own: lightning_skew.bench.runner.


@register_variant("handwritten_pipeline", "TorchRec DMP driven by TorchRec's TrainPipelineSparseDist, no Lightning")
def train_pipeline_by_hand(recipe: Recipe, accelerator: str = "cpu") -> TrainedRun:
    """TorchRec's own pipelined loop: the module sharded as TorchRecStrategy shards it, then
    ``TrainPipelineSparseDist.progress`` until the loader runs out (it copies and distributes the next batch's
    inputs while the current one trains, and runs forward, BCE loss, backward and the dense optimizer step).
    ``accelerator="gpu"``: on the first CUDA device (the pipeline copies each batch there on its own stream)."""
    reset_gpu_peak(accelerator)
    ensure_process_group()
    module, datamodule = recipe.model, recipe.datamodule
    device = torch.device("cpu") if accelerator == "cpu" else torch.device("cuda", torch.cuda.current_device())
    dmp = shard_module(module, device)
    dmp.train()
    optimizer = _dense_optimizer(module.configure_optimizers())
    datamodule.prepare_data()
    datamodule.setup("fit")

    def forward(batch: Batch) -> tuple[Tensor, Tensor]:
        logits = dmp(batch)
        return F.binary_cross_entropy_with_logits(logits, batch.labels.float()), logits

    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, custom_model_fwd=forward)
    clock = StepClock()
    for _ in range(recipe.epochs):
        batches = iter(datamodule.train_dataloader())
        while True:
            try:
                logits = pipeline.progress(batches)
            except StopIteration:
                break
            clock.tick(logits.shape[0])
    pipeline.detach()  # the sharded modules' own forwards back, for the evaluation
    return TrainedRun(model=dmp, clock=clock, device=str(device), extras=gpu_peak(accelerator))


register_variant("lightning_pipeline", "Lightning Trainer with TorchRecStrategy(pipeline='sparse_dist')")(
    lambda recipe: fit_with_lightning(recipe, strategy=TorchRecStrategy(pipeline="sparse_dist")))


def fit_on_gpu(recipe: Recipe, compute_kernel: str, cache_load_factor: float | None = None,
               pipeline: str | None = None) -> TrainedRun:
    """Lightning with :class:`TorchRecStrategy` on one GPU, every table with ``compute_kernel`` (and the step
    through TorchRec's ``pipeline``, if given)."""
    reset_gpu_peak("gpu")
    run = fit_with_lightning(recipe, strategy=TorchRecStrategy(compute_kernel=compute_kernel,
                                                               cache_load_factor=cache_load_factor,
                                                               pipeline=pipeline),
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

# TorchRec's train pipeline on a GPU, by hand and under Lightning (fused tables in GPU memory), and the prefetch
# pipeline with the UVM cache, where it applies (issue 14; not yet run: no CUDA machine so far).
register_variant("gpu_handwritten_pipeline", "GPU, TorchRec's TrainPipelineSparseDist by hand, no Lightning")(
    lambda recipe: train_pipeline_by_hand(recipe, accelerator="gpu"))
register_variant("gpu_lightning_pipeline", "GPU, Lightning with TorchRecStrategy(pipeline='sparse_dist'), fused")(
    lambda recipe: fit_on_gpu(recipe, "fused", pipeline="sparse_dist"))
register_variant("gpu_lightning_semi_sync", "GPU, Lightning with TorchRecStrategy(pipeline='semi_sync'), fused")(
    lambda recipe: fit_on_gpu(recipe, "fused", pipeline="semi_sync"))
register_variant("gpu_lightning_prefetch", "GPU, Lightning with TorchRecStrategy(pipeline='prefetch') and the "
                 "UVM cache sized to the hot/cold budget")(
    lambda recipe: fit_on_gpu(recipe, "fused_uvm_caching", hot_share_of_rows(recipe, HOT_COLD_BUDGET_BYTES),
                              pipeline="prefetch"))
