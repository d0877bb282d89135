"""Users' own recommenders (tests/_support/user_models.py) gain the techniques by configuration: dimension-1 tables,
a feature feeding two tables, tables sized from the DataModule in ``configure_model``, under every strategy."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_skew import HotColdStrategy, PlainHotColdPlacement, RowSet, TorchRecStrategy
from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.hotcold.collection import table_specs
from lightning_skew.hotcold.planning import bytes_per_row

from _support.user_models import DeepFM, PlainBags, TwoTower

SIZES = [50, 40, 30]


def synthetic(**kwargs) -> SyntheticDataModule:
    return SyntheticDataModule(num_embeddings_per_feature=SIZES, num_dense=3, num_train_samples=1024,
                               num_val_samples=256, num_test_samples=256, batch_size=128, **kwargs)


def fit(model: pl.LightningModule, data: pl.LightningDataModule, strategy, callbacks=(), **trainer_kwargs):
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, callbacks=list(callbacks), max_epochs=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    return trainer


class RecordAtTrainStart(pl.Callback):
    """The whole tables as training starts (after sharding and any initialization)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {k: v.clone() for k, v in trainer.strategy.unsharded_state_dict().items()}


def plan_of(trainer: pl.Trainer) -> dict[str, tuple[str, str]]:
    from lightning_skew.torchrec.sharding import plan_rows

    return {row[1]: (row[2], row[3]) for row in plan_rows(trainer.strategy.dmp.plan)}


@pytest.mark.parametrize("meta_device", [False, True], ids=["cpu", "meta"])
@pytest.mark.parametrize("strategy", ["torchrec", "hotcold"])
def test_deepfm_first_order_tables_of_dimension_one_train_out_of_the_box(strategy, meta_device):
    # FBGEMM's kernels need widths divisible by 4: dimension-1 tables are replicated with the dense kernel instead,
    # and the plan says so. The model sizes its tables from the DataModule and may build them on the meta device.
    model = DeepFM(meta_device=meta_device)
    # (the fused layout names a split table's parts __hot and __cold; the stacked one is the next test)
    strategy_ = TorchRecStrategy() if strategy == "torchrec" else HotColdStrategy(budget_bytes=2000, layout="fused")
    start = RecordAtTrainStart()
    trainer = fit(model, synthetic(), strategy_, [start])
    assert trainer.global_step == 8 and 0 < float(trainer.callback_metrics["val_auc"]) < 1
    plan = plan_of(trainer)
    parts = ("__hot", "__cold") if strategy == "hotcold" else ("",)
    first_order = {name: plan[name] for name in plan if name.startswith("first_order_")}
    assert first_order and all(v == ("data_parallel", "dense") for v in first_order.values())
    assert any(name.endswith(parts) for name in first_order)
    weights = trainer.strategy.unsharded_state_dict()
    first = weights["ebc.embedding_bags.first_order_cat_0.weight"]
    assert first.shape == (50, 1) and torch.isfinite(first).all() and first.abs().sum() > 0
    # Trained: replicated tables come out of sharding without a fused optimizer; the dense optimizer takes them.
    assert not torch.allclose(first, start.weights["ebc.embedding_bags.first_order_cat_0.weight"])


def test_deepfm_tables_sharing_a_feature_are_placed_and_stacked_alike_and_train_exactly_as_under_torchrec():
    # DeepFM looks each feature up in two tables (first order, embedding): one routing serves both, so they are
    # placed alike (same hot rows, both split or both whole) and, stacked (the default on CPU), one key each. Its
    # replicated first-order tables start from the module's own weights under either strategy.
    trained, strategy = {}, HotColdStrategy(budget_bytes=2000)
    for name, strategy_ in (("torchrec", TorchRecStrategy()), ("hotcold", strategy)):
        torch.manual_seed(0)
        trainer = fit(DeepFM(), synthetic(), strategy_)
        assert trainer.global_step == 8 and 0 < float(trainer.callback_metrics["val_auc"]) < 1
        trained[name] = trainer.strategy.unsharded_state_dict()
    (placement,) = strategy.placements.values()
    for feature in ("cat_0", "cat_1", "cat_2"):
        first, embedding = placement.table(f"first_order_{feature}"), placement.table(f"embedding_{feature}")
        assert torch.equal(first.hot_rows, embedding.hot_rows) and first.kind == embedding.kind
    assert any(table.kind == "split" for table in placement.tables)
    assert any(name.endswith("__hotcold") for name in plan_of(trainer))
    for key, value in trained["torchrec"].items():
        torch.testing.assert_close(trained["hotcold"][key], value, atol=1e-5, rtol=0, msg=key)


def test_a_replicated_table_starts_from_the_modules_own_weights():
    data = synthetic()
    torch.manual_seed(0)
    model = DeepFM(sparse_feature_names=list(data.sparse_feature_names), num_embeddings_per_feature=list(SIZES),
                   dense_in_features=data.dense_in_features)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if "first_order" in k}
    start = RecordAtTrainStart()
    fit(model, data, TorchRecStrategy(), [start], max_steps=1)
    for key, value in initial.items():  # a data_parallel table: DMP re-initializes it, the strategy copies it back
        torch.testing.assert_close(start.weights[key], value, atol=0, rtol=0, msg=key)


def test_hot_cold_budget_counts_every_table_of_a_feature():
    # Each hot row of a feature is hot in its first-order table and its embedding table: 8 + 36 bytes with
    # rowwise_adagrad. Cut at the embedding table's 36 bytes alone, 20 rows took 880 bytes of a 720 budget.
    model = DeepFM()
    strategy = HotColdStrategy(budget_bytes=720, sample_fraction=1.0)
    trainer = fit(model, synthetic(), strategy)
    (placement,) = strategy.placements.values()
    assert 0 < placement.hot_bytes <= 720
    specs = [t.spec for t in placement.tables]
    sizes = dict(zip([s.name for s in specs], placement.bytes_per_row, strict=True))
    assert sizes["first_order_cat_0"] == 8 and sizes["embedding_cat_0"] == 36
    # Every hot row of a feature is hot in both of its tables.
    for feature in ("cat_0", "cat_1", "cat_2"):
        first, embedding = placement.table(f"first_order_{feature}"), placement.table(f"embedding_{feature}")
        assert torch.equal(first.hot, embedding.hot)
    assert trainer.global_step == 8


def test_constraints_given_for_a_table_follow_it_into_its_hot_and_cold_parts():
    hot = RowSet(["cat_0", "cat_1", "cat_2"], SIZES, [torch.tensor([0, 1])] * 3)
    strategy = HotColdStrategy(budget_bytes=300, hot_rows=hot, layout="fused",
                               table_constraints={"embedding_cat_0": {"sharding_types": ["column_wise"]},
                                                  "first_order_cat_1": {"sharding_types": ["data_parallel"]}})
    trainer = fit(DeepFM(), synthetic(), strategy)
    plan = plan_of(trainer)
    assert plan["embedding_cat_0__hot"][0] == plan["embedding_cat_0__cold"][0] == "column_wise"
    assert plan["first_order_cat_1__cold"] == ("data_parallel", "dense")
    with pytest.raises(Exception, match=r"table_constraints name tables the model does not have: \['nope'\]"):
        fit(DeepFM(), synthetic(), HotColdStrategy(budget_bytes=300, hot_rows=hot, table_constraints={"nope": {}}))


def _hot_rows() -> RowSet:
    return RowSet(["cat_0", "cat_1", "cat_2"], SIZES, [torch.tensor([0, 1])] * 3)


STRATEGIES = {"torchrec": lambda: (TorchRecStrategy(), []),
              "hotcold": lambda: (HotColdStrategy(budget_bytes=300, hot_rows=_hot_rows()), []),
              "plain_placement": lambda: ("auto", [PlainHotColdPlacement(budget_bytes=300, hot_rows=_hot_rows())]),
              "plain_lightning": lambda: ("auto", [])}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_model_takes_its_table_sizes_from_the_datamodule_in_configure_model(strategy):
    model = TwoTower()
    strategy_, callbacks = STRATEGIES[strategy]()
    trainer = fit(model, synthetic(), strategy_, callbacks)
    assert model.hparams.num_embeddings_per_feature == SIZES
    assert trainer.global_step == 8 and 0 < float(trainer.callback_metrics["val_auc"]) < 1


def test_table_sizes_from_the_datamodule_are_checked_for_plain_embedding_bags_too():
    # The model's own tables (10 rows for cat_0 given by hand) govern the ID check, not the DataModule's 50.
    model = PlainBags(["cat_0", "cat_1", "cat_2"], [10, 40, 30], 3)
    with pytest.raises(ValueError, match=r"feature 'cat_0' has ID \d+ outside its table of 10 rows"):
        fit(model, synthetic(uniform=True), "auto")


def test_bytes_per_row_helper_sees_both_tables_of_a_feature():
    model = DeepFM(["a"], [10], 0)
    specs = table_specs(model.ebc)
    assert bytes_per_row(model, specs) == [8, 36]
