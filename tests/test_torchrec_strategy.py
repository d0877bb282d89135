"""TorchRecStrategy: multi-process equivalence, exact resume, unsharded export, clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel

from lightning_skew.models.dlrm import DLRMModule
from lightning_skew.torchrec.strategy import TorchRecStrategy

from _support.launch import launch
from _support.small import make_data, make_model, quiet_trainer

WORKER = Path(__file__).parent / "strategy_worker.py"
EPOCHS = 2


def _run(out: Path, world_size: int, epochs: int, resume: Path | None = None) -> Path:
    args = ["--out", str(out), "--epochs", str(epochs), "--embedding-optimizer", "adagrad"]
    if resume is not None:
        args += ["--resume", str(resume)]
    launch(WORKER, world_size, args)
    return out


def _results(out: Path) -> dict:
    return {
        "losses": json.loads((out / "losses.json").read_text()),
        "weights": torch.load(out / "export.ckpt", weights_only=False)["state_dict"],
        "fused": torch.load(out / "fused_state.pt"),
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, Path]:
    """The uninterrupted run of each world size, once for the module: the 1-process run the 2-process one is
    compared with is the one its own tests checked (``runs`` fills this as it goes)."""
    return {}


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def runs(request, tmp_path_factory, uninterrupted) -> dict:
    """For one world size: an uninterrupted run, and a run stopped after one epoch then resumed."""
    world_size = request.param
    root = tmp_path_factory.mktemp(f"world{world_size}")
    full = uninterrupted[world_size] = _run(root / "full", world_size, EPOCHS)
    first = _run(root / "first", world_size, EPOCHS - 1)
    (checkpoint,) = (first / "checkpoints").iterdir()
    resumed = _run(root / "resumed", world_size, EPOCHS, resume=checkpoint)
    return {"world_size": world_size, "full": full, "resumed": resumed, "checkpoint": checkpoint}


def _assert_state_close(actual: dict, expected: dict, atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def test_resume_continues_as_the_uninterrupted_run(runs):
    full, resumed = _results(runs["full"]), _results(runs["resumed"])
    steps_per_epoch = len(full["losses"]) // EPOCHS
    assert len(resumed["losses"]) == steps_per_epoch  # only the last epoch ran after the resume
    assert resumed["losses"] == pytest.approx(full["losses"][-steps_per_epoch:], abs=1e-6)
    _assert_state_close(resumed["weights"], full["weights"], atol=1e-6)
    # Adagrad's per-element sums for every table: the fused embedding optimizer state resumed too.
    assert sum(key.endswith("momentum1") for key in full["fused"]) == 5
    _assert_state_close(resumed["fused"], full["fused"], atol=1e-6)


def test_checkpoint_keeps_every_ranks_shards(runs):
    checkpoint = runs["checkpoint"]
    assert (checkpoint / "meta.pt").is_file()
    shard_files = sorted(p.name for p in checkpoint.glob("*.distcp"))
    assert len(shard_files) == runs["world_size"]


def test_two_processes_give_the_losses_of_one(runs, uninterrupted, tmp_path_factory):
    if runs["world_size"] != 2:
        pytest.skip("compares the 2-process run with a 1-process run")
    one = uninterrupted.get(1) or _run(tmp_path_factory.mktemp("one") / "full", 1, EPOCHS)
    single, double = _results(one), _results(runs["full"])
    assert double["losses"] == pytest.approx(single["losses"], abs=1e-5)
    _assert_state_close(double["weights"], single["weights"], atol=1e-5)
    _assert_state_close(double["fused"], single["fused"], atol=1e-5)


def test_unsharded_export_loads_into_a_plain_model_and_predicts_the_same(runs):
    plain = DLRMModule.load_from_checkpoint(runs["full"] / "export.ckpt", map_location="cpu")
    plain.eval()
    files = sorted(runs["full"].glob("predictions_rank*.pt"))
    assert len(files) == runs["world_size"]
    for path in files:
        recorded = torch.load(path, weights_only=False)
        with torch.no_grad():
            predictions = torch.sigmoid(plain(recorded["batch"]))
        torch.testing.assert_close(predictions, recorded["predictions"], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ in one process

@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_gradient_accumulation_is_a_clear_error():
    data = make_data(1)
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches"):
        quiet_trainer(accumulate_grad_batches=2).fit(make_model(data, "sgd"), data)


def test_gradient_clipping_is_a_clear_error():
    data = make_data(1)
    with pytest.raises(MisconfigurationException, match="gradient clipping"):
        quiet_trainer(gradient_clip_val=1.0).fit(make_model(data, "sgd"), data)


class TinyRecommender(pl.LightningModule):
    """Not a DLRM: any LightningModule holding an EmbeddingBagCollection trains under the strategy."""

    def __init__(self, rows: list[int], dense: int) -> None:
        super().__init__()
        tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=n, feature_names=[f"cat_{i}"])
                  for i, n in enumerate(rows)]
        self.ebc = EmbeddingBagCollection(tables=tables)
        self.head = nn.Linear(4 * len(rows) + dense, 1)

    def training_step(self, batch, batch_idx):
        pooled = self.ebc(batch.sparse_features).values()
        logits = self.head(torch.cat([pooled, batch.dense_features], dim=1)).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_any_module_with_embedding_bags_trains_with_the_strategys_embedding_optimizer():
    data = make_data(1)
    module = TinyRecommender(data.num_embeddings_per_feature, data.dense_in_features)
    before = {k: v.clone() for k, v in module.ebc.state_dict().items()}
    trainer = quiet_trainer(strategy=TorchRecStrategy(embedding_optimizer="sgd", embedding_lr=0.5), limit_val_batches=0)
    trainer.fit(module, data)
    after = trainer.strategy.export_unsharded_checkpoint  # exported weights are plain full tables
    path = Path(trainer.default_root_dir) / "tiny_export.ckpt"
    after(path)
    exported = torch.load(path, weights_only=False)["state_dict"]
    path.unlink()
    moved = [k for k in before if not torch.equal(exported[f"ebc.{k}"], before[k])]
    assert moved, "no embedding table changed: the strategy's embedding optimizer did not run"


def test_the_module_is_wrapped_once_by_dmp_and_once_by_ddp():
    data = make_data(1)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(make_model(data, "sgd"), data)
    wrapper = trainer.strategy.model
    assert isinstance(wrapper, DistributedModelParallel)
    assert sum(isinstance(m, DistributedDataParallel) for m in wrapper.modules()) == 1
    assert wrapper.module is trainer.lightning_module  # DMP -> DDP -> the LightningModule, nothing more


def test_predict_scores_every_test_input_with_a_click_probability():
    data = make_data(1)
    model = make_model(data, "sgd")
    predictions = torch.cat(quiet_trainer().predict(model, data))
    assert predictions.numel() == data.num_samples["test"]
    assert bool(((predictions > 0) & (predictions < 1)).all())


def test_module_without_embedding_optimizer_is_a_clear_error():
    data = make_data(1)
    module = TinyRecommender(data.num_embeddings_per_feature, data.dense_in_features)
    with pytest.raises(MisconfigurationException, match="have no optimizer"):
        quiet_trainer().fit(module, data)


def test_adam_on_cpu_is_a_clear_error():
    data = make_data(1)
    with pytest.raises(MisconfigurationException, match="only on CUDA"):
        quiet_trainer().fit(make_model(data, "adam"), data)


def test_module_without_embeddings_is_a_clear_error():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch.dense_features[:, :2]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(MisconfigurationException, match="no TorchRec EmbeddingBagCollection"):
        quiet_trainer().fit(Plain(), make_data(1))


def test_dense_lr_schedule_reaches_the_fused_embedding_optimizer(tmp_path):
    data = make_data(1)
    frozen = make_model(data, "sgd")
    # The schedule multiplies every learning rate by 0: dense and embedding weights must stay as they are.
    frozen.lr_scheduler_factory = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)
    initial = {k: v.clone() for k, v in frozen.state_dict().items()}
    trainer = quiet_trainer(limit_val_batches=0)
    trainer.fit(frozen, data)
    trainer.strategy.export_unsharded_checkpoint(tmp_path / "frozen.ckpt")
    final = torch.load(tmp_path / "frozen.ckpt", weights_only=False)["state_dict"]
    embedding_keys = [k for k in initial if "embedding_bags" in k]
    assert embedding_keys
    for key in embedding_keys:
        torch.testing.assert_close(final[key], initial[key], atol=0, rtol=0, msg=key)
    assert trainer.strategy.fused_optimizer.param_groups[0]["lr"] == 0.0


def test_a_plain_checkpoint_loads_into_a_sharded_run(runs):
    if runs["world_size"] != 1:
        pytest.skip("one in-process check is enough")
    data = make_data(1)
    export = runs["full"] / "export.ckpt"
    sharded = quiet_trainer().validate(make_model(data, "adagrad"), data, ckpt_path=export)[0]
    plain = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(DLRMModule.load_from_checkpoint(export), data)[0]
    assert sharded["val_auc"] == pytest.approx(plain["val_auc"], abs=1e-6)
    assert sharded["val_logloss"] == pytest.approx(plain["val_logloss"], abs=1e-6)


def test_the_strategies_are_registered_by_name():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_skew

    trainer = pl.Trainer(strategy="torchrec", accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy) is lightning_skew.TorchRecStrategy
    assert StrategyRegistry["hot_cold"]["strategy"] is lightning_skew.HotColdStrategy
