"""IDs are checked against the tables the model holds, for any DataModule, under every strategy, on the host."""

from __future__ import annotations

import time
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew import DLRMModule, HotColdStrategy, PlainHotColdPlacement, RowSet, TorchRecStrategy
from lightning_skew.core.id_ranges import TableBounds, check_table_ids, find_out_of_range
from lightning_skew.torchrec.optim import dense_parameters, fuse_embedding_optimizer


def batch_with(ids_a: list[int], ids_b: list[int]) -> Batch:
    sparse = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor(ids_a + ids_b),
                               lengths=torch.ones(len(ids_a) * 2, dtype=torch.int32))
    n = len(ids_a)
    return Batch(dense_features=torch.rand(n, 3), sparse_features=sparse, labels=torch.tensor([0.0, 1.0] * (n // 2)))


class PlainData(pl.LightningDataModule):
    """A user's own DataModule (not a lightning-skew one): a few batches, one of them with the ID 50 for ``b``."""

    def __init__(self, bad_id: int = 50) -> None:
        super().__init__()
        self.bad_id = bad_id

    def train_dataloader(self) -> DataLoader:
        batches = [batch_with([0, 1, 2, 3], [1, 2, 3, 4]), batch_with([0, 1, 2, 3], [1, self.bad_id, 3, 4])]
        return DataLoader(batches, batch_size=None)


class TwoTables(pl.LightningModule):
    """A user's model with its own EmbeddingBagCollection (tables named by the user) and a linear head."""

    def __init__(self, rows_b: int = 10) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="user_table", embedding_dim=4, num_embeddings=5, feature_names=["a"]),
            EmbeddingBagConfig(name="item_table", embedding_dim=4, num_embeddings=rows_b, feature_names=["b"])])
        self.head = torch.nn.Linear(8 + 3, 1)
        fuse_embedding_optimizer(self, "sgd", 0.1)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        pooled = self.ebc(batch.sparse_features).values()
        logits = self.head(torch.cat([pooled, batch.dense_features], dim=1)).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)

    def configure_optimizers(self):
        return torch.optim.SGD(dense_parameters(self), lr=0.1)


def _hot_rows() -> RowSet:
    return RowSet(["a", "b"], [5, 10], [torch.tensor([0, 1])] * 2)


STRATEGIES = {"torchrec": lambda: (TorchRecStrategy(), []),
              "hotcold": lambda: (HotColdStrategy(budget_bytes=4 * 5 * 4, hot_rows=_hot_rows()), []),
              "plain_placement": lambda: ("auto", [PlainHotColdPlacement(budget_bytes=4 * 5 * 4,
                                                                         hot_rows=_hot_rows())]),
              "plain_lightning": lambda: ("auto", [])}


def fit(model: pl.LightningModule, data: pl.LightningDataModule, strategy: str) -> pl.Trainer:
    strategy_, callbacks = STRATEGIES[strategy]()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy_, callbacks=callbacks, max_epochs=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    return trainer


def small_dlrm() -> DLRMModule:
    return DLRMModule([5, 10], ["a", "b"], 3, embedding_dim=4, dense_arch_layer_sizes=[8, 4],
                      over_arch_layer_sizes=[8, 1])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_dlrm_with_a_plain_datamodule_refuses_an_id_past_its_table(strategy):
    # The minimal case: a plain LightningDataModule, ID 50 for a 10-row table.
    with pytest.raises(ValueError, match=r"PlainData \(train batch\): feature 'b' has ID 50 outside its table of "
                                         r"10 rows \[0, 10\) \(1 such IDs in this batch; table 't_b'\)"):
        fit(small_dlrm(), PlainData(), strategy)


@pytest.mark.parametrize("strategy", ["torchrec", "hotcold"])
def test_a_users_own_model_is_checked_against_its_own_tables_under_lightning_skew_strategies(strategy):
    with pytest.raises(ValueError, match=r"feature 'b' has ID 7 outside its table of 6 rows .*table 'item_table'"):
        fit(TwoTables(rows_b=6), PlainData(bad_id=7), strategy if strategy == "torchrec" else "torchrec")
    trainer = fit(TwoTables(rows_b=10), PlainData(bad_id=7), strategy)  # the same data fits 10-row tables
    assert trainer.global_step == 2


def test_the_models_tables_govern_not_the_datamodules_sizes():
    # A lightning-skew DataModule declaring 50 rows for 'b' while the model's table has 10 (a two-tower table of 700
    # rows fed IDs up to 752 in the issue): refused, naming the model's table.
    from lightning_skew.data.synthetic import SyntheticDataModule

    data = SyntheticDataModule(num_embeddings_per_feature=[5, 50], num_dense=3, uniform=True, num_train_samples=64,
                               num_val_samples=16, num_test_samples=16, batch_size=16)
    model = DLRMModule([5, 10], None, 3, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    with pytest.raises(ValueError, match=r"SyntheticDataModule \(train batch\): feature 'cat_1' has ID \d+ outside "
                                         r"its table of 10 rows .*table 't_cat_1'"):
        fit(model, data, "torchrec")


def test_a_feature_feeding_two_tables_must_fit_the_smaller():
    tables = [EmbeddingBagConfig(name="first_order", embedding_dim=1, num_embeddings=8, feature_names=["b"]),
              EmbeddingBagConfig(name="embedding", embedding_dim=4, num_embeddings=20, feature_names=["b"])]
    ebc = EmbeddingBagCollection(tables=tables)
    with pytest.raises(ValueError, match=r"feature 'b' has ID 9 outside its table of 8 rows .*'first_order'"):
        check_table_ids(ebc, batch_with([0, 1], [9, 2]), where="here")


def test_the_check_is_one_vectorized_comparison_on_the_host():
    # Multi-hot and empty features, unknown keys and negative IDs, found in one pass; a batch is checked once.
    sparse = KeyedJaggedTensor(keys=["a", "x", "b"], values=torch.tensor([1, 7, 10**9, -2, 3, 4]),
                               lengths=torch.tensor([2, 0, 1, 0, 1, 2], dtype=torch.int32))
    bounds = TableBounds({"a": ("ta", 5), "b": ("tb", 10)})
    found = bounds.find(sparse)
    assert [(f.feature, f.table, f.offending, f.count) for f in found] == [("a", "ta", [7], 1), ("b", "tb", [-2], 1)]
    assert find_out_of_range(sparse, {"x": 10**9 + 1}) == []
    # One-hot 2048 x 26 batch in range: well under a millisecond per batch on one core (generous bound under load).
    keys = [f"f{i}" for i in range(26)]
    big = KeyedJaggedTensor(keys=keys, values=torch.randint(0, 1000, (26 * 2048,)),
                            lengths=torch.ones(26 * 2048, dtype=torch.int32))
    bounds = TableBounds({k: (k, 1000) for k in keys})
    bounds.find(big)
    start = time.perf_counter()
    for _ in range(20):
        assert bounds.find(big) == []
    assert (time.perf_counter() - start) / 20 < 0.01
