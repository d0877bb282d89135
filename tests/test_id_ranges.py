"""IDs outside their tables: refused by default with the feature, table size and ID named, clamped on request."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew import DLRMModule, HotColdStrategy, PlainHotColdPlacement, RowSet, TorchRecStrategy
from lightning_skew.core.decisions import SkewBatch
from lightning_skew.core.id_ranges import clamp_out_of_range, find_out_of_range
from lightning_skew.data.base import RecDataModule, WrappedDataModule

NAMES, SIZES = ["a", "b"], [5, 10]
BATCH, NUM_BATCHES = 4, 3


def one_hot_batch(a: list[int], b: list[int]) -> Batch:
    sparse = KeyedJaggedTensor(keys=NAMES, values=torch.tensor(a + b), lengths=torch.ones(2 * len(a), dtype=torch.int32))
    return Batch(dense_features=torch.rand(len(a), 3), sparse_features=sparse, labels=torch.tensor([0.0, 1.0] * 2))


class BadIdsDataModule(RecDataModule):
    """Every training batch holds the ID 10 (= its table's size) and -1 for feature ``b``."""

    def __init__(self, out_of_range_ids: str = "error") -> None:
        super().__init__(out_of_range_ids=out_of_range_ids)

    @property
    def dense_in_features(self) -> int:
        return 3

    @property
    def sparse_feature_names(self) -> list[str]:
        return list(NAMES)

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return list(SIZES)

    def train_dataloader(self) -> DataLoader:
        torch.manual_seed(0)
        return DataLoader([one_hot_batch([0, 1, 2, 4], [3, 10, -1, 9]) for _ in range(NUM_BATCHES)], batch_size=None)


class PassThrough(WrappedDataModule):
    def train_dataloader(self):
        return self.datamodule.train_dataloader()


def fit(datamodule: RecDataModule, strategy: str | pl.strategies.Strategy | tuple) -> pl.Trainer:
    model = DLRMModule(SIZES, NAMES, 3, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    strategy, callbacks = strategy if isinstance(strategy, tuple) else (strategy, [])
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=1, logger=False,
                         callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule)
    return trainer


def _hot_rows() -> RowSet:  # a given hot set (as from a saved profile): rows 0 and 1 of each table
    return RowSet(NAMES, SIZES, [torch.tensor([0, 1])] * 2)


# Every path that trains embeddings: TorchRec's sharding, the hot/cold strategy with a given hot set, the plain
# placement and an unsharded module.
STRATEGIES = {"torchrec": TorchRecStrategy, "default": lambda: "auto",
              "hotcold": lambda: HotColdStrategy(budget_bytes=4 * 5 * 4, hot_rows=_hot_rows()),
              "plain_placement": lambda: ("auto", [PlainHotColdPlacement(budget_bytes=4 * 5 * 4, hot_rows=_hot_rows())])}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_training_refuses_ids_outside_their_tables_naming_feature_size_and_id(strategy):
    with pytest.raises(ValueError, match=r"BadIdsDataModule \(train batch\): feature 'b' has ID -1 and 10 outside "
                                         r"its table of 10 rows \[0, 10\) \(2 such IDs.*out_of_range_ids='clamp'"):
        fit(BadIdsDataModule(), STRATEGIES[strategy]())


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_clamping_trains_on_row_zero_and_counts_every_clamped_id(strategy, caplog):
    data = BadIdsDataModule(out_of_range_ids="clamp")
    trainer = fit(data, STRATEGIES[strategy]())
    assert trainer.global_step == NUM_BATCHES
    assert data.clamped_ids == {"b": 2 * NUM_BATCHES}
    assert "clamping to row 0: feature 'b' has ID -1 and 10" in caplog.text


def test_a_wrapper_checks_each_batch_once_with_the_setting_of_the_data_it_wraps(caplog):
    with pytest.raises(ValueError, match=r"PassThrough around BadIdsDataModule \(train batch\): feature 'b' has "
                                         r"ID -1 and 10"):
        fit(PassThrough(BadIdsDataModule()), "auto")
    inner = BadIdsDataModule(out_of_range_ids="clamp")
    wrapper = PassThrough(inner)
    assert wrapper.out_of_range_ids == "clamp"
    trainer = fit(wrapper, "auto")
    assert trainer.global_step == NUM_BATCHES
    # trainer.datamodule (the wrapper) checks; the inner module never sees Lightning's hooks.
    assert wrapper.clamped_ids == {"b": 2 * NUM_BATCHES} and inner.clamped_ids == {}
    wrapper.out_of_range_ids = "error"  # set through the wrapper: the data's setting
    assert inner.out_of_range_ids == "error"
    with pytest.raises(ValueError, match="out_of_range_ids must be one of"):
        inner.out_of_range_ids = "ignore"


def test_find_and_clamp_handle_one_hot_and_multi_hot_batches_and_keep_the_batch_type():
    # Multi-hot: a has [1, 7] and [] (7 >= 5), b has [-2] and [3, 4] (-2 < 0).
    sparse = KeyedJaggedTensor(keys=NAMES, values=torch.tensor([1, 7, -2, 3, 4]),
                               lengths=torch.tensor([2, 0, 1, 2], dtype=torch.int32))
    found = find_out_of_range(sparse, dict(zip(NAMES, SIZES, strict=True)))
    assert [(f.feature, f.num_rows, f.offending, f.count) for f in found] == [("a", 5, [7], 1), ("b", 10, [-2], 1)]
    clamped = clamp_out_of_range(sparse, found)
    assert clamped.values().tolist() == [1, 0, 0, 3, 4] and sparse.values().tolist() == [1, 7, -2, 3, 4]
    assert clamped.lengths().tolist() == [2, 0, 1, 2]
    assert find_out_of_range(clamped, dict(zip(NAMES, SIZES, strict=True))) == []
    # A one-hot batch in range, and a feature the DataModule does not declare, pass unchanged.
    batch = SkewBatch.of(one_hot_batch([0, 1, 2, 4], [3, 9, 0, 9]), is_hot=True, num_hot=4)
    data = BadIdsDataModule()
    assert data.check_ids(batch) is batch
    assert find_out_of_range(batch.sparse_features, {"a": 5}) == []
    data.out_of_range_ids = "clamp"
    out = data.check_ids(SkewBatch.of(one_hot_batch([0, 5, 2, 4], [3, 9, 0, 9]), is_hot=True, num_hot=4))
    assert isinstance(out, SkewBatch) and out.is_hot and out.num_hot == 4
    assert out.sparse_features["a"].values().tolist() == [0, 0, 2, 4]
