"""TorchRecStrategy(pipeline="sparse_dist"): TorchRec's train pipeline under Lightning's loop.

One launch of two single-process "nodes" (as torchrun starts them: one process per node, MASTER_ADDR=127.0.0.1,
``Trainer(num_nodes=2, devices=1)``) holds every two-rank fit: the plain step, the pipeline with mid-epoch
validation and a mid-epoch checkpoint, the resume from it, and the repacking skipper with and without the pipeline.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from pipeline_worker import RESUME_STEP

from lightning_skew import HotColdStrategy, StaleEmbeddingSkipper, TorchRecStrategy
from lightning_skew.torchrec.pipeline import StepStream, check_pipeline

from _support.launch import launch
from _support.small import make_data, make_model

WORKER = Path(__file__).with_name("pipeline_worker.py")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pipeline")
    launch(WORKER, 2, ["--out", str(out), "--num-nodes", "2"], nodes=2)
    return torch.load(out / "result.pt")


@pytest.mark.slow
def test_on_two_ranks_the_pipeline_trains_and_validates_as_the_plain_step(two_nodes):
    plain, piped = two_nodes["plain"], two_nodes["pipeline"]
    assert len(plain["losses"]) == 16  # two epochs of 8 steps, validated in the middle and at the end of each
    assert piped["losses"] == pytest.approx(plain["losses"], abs=1e-5)
    assert plain["losses"][-1] < plain["losses"][0] - 0.05  # it does train
    for name in ("val_auc", "val_logloss"):
        assert piped["val"][name] == pytest.approx(plain["val"][name], abs=1e-5)


@pytest.mark.slow
def test_resuming_the_pipeline_from_a_mid_epoch_checkpoint_continues_as_the_uninterrupted_run(two_nodes):
    straight, resumed = two_nodes["pipeline"], two_nodes["resumed"]
    assert resumed["losses"] == pytest.approx(straight["losses"][RESUME_STEP:], abs=1e-5)
    assert resumed["val"]["val_auc"] == pytest.approx(straight["val"]["val_auc"], abs=1e-5)


@pytest.mark.slow
def test_the_repacking_skipper_drops_the_same_inputs_and_trains_alike_under_the_pipeline(two_nodes):
    plain, piped = two_nodes["plain_repack"], two_nodes["pipeline_repack"]
    assert piped["dropped"] == plain["dropped"] > 0
    assert piped["losses"] == pytest.approx(plain["losses"], abs=1e-5)


@pytest.mark.slow
def test_two_single_process_nodes_train_as_one_job_with_the_losses_of_one_process(two_nodes, tmp_path):
    # One process gives the losses of two on one node (test_torchrec_strategy.py), so it stands for both here.
    assert two_nodes["plain"]["job"] == ("TorchElasticEnvironment", 2, 2)
    data = make_data(1)
    losses = _fit(tmp_path, data, TorchRecStrategy(), max_steps=4)
    assert two_nodes["plain"]["losses"][:len(losses)] == pytest.approx(losses, abs=1e-5)


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(root: Path, data, strategy, epochs: int = 1, callbacks=(), max_steps: int = -1) -> list[float]:
    record = _Losses()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=epochs, max_steps=max_steps,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(root), num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[*callbacks, record])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_model(data, "rowwise_adagrad"), data)
    return record.losses


class _ShrinkBatch(pl.Callback):
    """Keeps the first half of every training batch, as an in-step skipper would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        batch.labels = batch.labels[: batch.labels.numel() // 2]


class _GradientNorms(pl.Callback):
    def on_after_backward(self, trainer, pl_module) -> None:
        pass


def test_a_callback_that_changes_the_batch_after_the_pipeline_took_it_is_a_clear_error(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"changed after the pipeline took it.*labels"):
        _fit(tmp_path, make_data(1), TorchRecStrategy(pipeline="sparse_dist"), callbacks=[_ShrinkBatch()],
             max_steps=1)


def test_parts_that_need_lightnings_own_backward_or_a_cuda_pipeline_are_refused_naming_both(tmp_path):
    data = make_data(1)
    with pytest.raises(MisconfigurationException, match=r"StaleEmbeddingSkipper\(repack=False\).*"
                                                        r"TorchRecStrategy\(pipeline='sparse_dist'\)"):
        _fit(tmp_path, data, TorchRecStrategy(pipeline="sparse_dist"), callbacks=[StaleEmbeddingSkipper()])
    with pytest.raises(MisconfigurationException, match=r"_GradientNorms.on_after_backward"):
        _fit(tmp_path, data, TorchRecStrategy(pipeline="sparse_dist"), callbacks=[_GradientNorms()])
    with pytest.raises(MisconfigurationException, match="semi_sync.*needs CUDA"):
        check_pipeline("semi_sync", torch.device("cpu"), ["fused"])
    with pytest.raises(MisconfigurationException, match="prefetch.*fused_uvm_caching"):
        check_pipeline("prefetch", torch.device("cuda"), ["fused"])
    with pytest.raises(ValueError, match="pipeline must be None or one of"):
        TorchRecStrategy(pipeline="sparse")
    with pytest.raises(ValueError, match="HotColdStrategy does not take pipeline"):
        HotColdStrategy(budget_bytes=1000, pipeline="sparse_dist")


def test_the_step_stream_hands_each_batch_to_the_loop_and_to_the_pipeline_once_in_order():
    stream = StepStream(iter(range(5)))
    loop = [stream.for_loop(), stream.for_loop()]  # Lightning's loop fetches one batch ahead
    pipeline = [next(stream.for_pipeline), next(stream.for_pipeline), next(stream.for_pipeline)]
    assert loop == [0, 1] and pipeline == [0, 1, 2]
    assert stream.trained_next() == 0
    stream.step_done()
    assert stream.trained_next() == 1 and stream.for_loop() == 2
    assert len(stream._kept) == 2  # batches 1 and 2: each kept only until the loop, the pipeline and the step pass it
    rest = list(stream.for_pipeline)
    assert rest == [3, 4]
    with pytest.raises(StopIteration):
        while True:
            stream.for_loop()
