"""One hot-set protocol: every part that needs a hot set asks a HotSetSource, the same way, for the model's tables at
their real bytes per row, and a source shared by several parts gives each the same set."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_skew import (
    DLRMModule,
    HotColdStrategy,
    PopularityDataModule,
    ProfiledHotRows,
    RowSet,
    StaleEmbeddingSkipper,
    SyntheticDataModule,
)
from lightning_skew.profile import TableBytes, model_table_bytes, resolve_hot_rows

DIM = 8


def data() -> SyntheticDataModule:
    return SyntheticDataModule(num_embeddings_per_feature=[400, 60, 9], num_dense=3, num_train_samples=1024,
                               num_val_samples=256, num_test_samples=256, batch_size=128, seed=5,
                               popularity_exponent=1.3)


def model(inner: SyntheticDataModule, optimizer: str = "rowwise_adagrad") -> DLRMModule:
    torch.manual_seed(0)
    return DLRMModule(inner.num_embeddings_per_feature, inner.sparse_feature_names, inner.dense_in_features,
                      embedding_dim=DIM, dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1],
                      embedding_optimizer=optimizer)


class EveryThirdRow:
    """A source of a user's own: every third row of each feature, and a record of what each part asked."""

    def __init__(self) -> None:
        self.asked: list[list[TableBytes]] = []

    def hot_rows(self, datamodule, tables) -> RowSet:
        self.asked.append(list(tables))
        names, sizes = datamodule.sparse_feature_names, datamodule.num_embeddings_per_feature
        return RowSet(list(names), list(sizes), [torch.arange(0, n, 3) for n in sizes])


def fit(strategy, datamodule, callbacks, epochs: int = 1) -> pl.Trainer:
    inner = datamodule.unwrapped
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, callbacks=callbacks, max_epochs=epochs,
                         limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model(inner), datamodule)
    return trainer


def test_a_custom_source_drives_the_hot_cold_split_popularity_batching_and_the_skipper_alike():
    source = EveryThirdRow()
    inner = data()
    expected = [torch.arange(0, n, 3) for n in inner.num_embeddings_per_feature]
    budget = sum(r.numel() for r in expected) * (DIM * 4 + 4)  # exactly the source's rows, with row-wise Adagrad
    strategy = HotColdStrategy(budget_bytes=budget, hot_rows=source)
    skipper = StaleEmbeddingSkipper(hot_rows=source, evaluate_every_n_steps=2, sample_batches=2, guard_metric=None)
    popularity = PopularityDataModule(inner, schedule="fae", hot_rows=source)
    fit(strategy, popularity, [skipper])

    assert len(source.asked) == 3  # the DataModule, the strategy and the skipper each asked once
    assert source.asked[0] == source.asked[1] == source.asked[2]  # for the same tables at the same sizes
    for rows, want in zip(popularity.hot_rows.rows, expected, strict=True):  # batches regrouped by its set
        assert torch.equal(rows, want)
    placed = {table.spec.name: table.hot_rows for placement in strategy.placements.values()
              for table in placement.tables}
    for name, want in zip(inner.sparse_feature_names, expected, strict=True):  # placed as it is
        assert torch.equal(torch.sort(placed[f"t_{name}"]).values, want)
    for rows, want in zip(skipper._fixed_candidates, expected, strict=True):  # the skipper's candidates
        assert torch.equal(rows, want)


@pytest.mark.parametrize(("optimizer", "state"), [("rowwise_adagrad", 1), ("adagrad", DIM), ("sgd", 0)])
def test_the_bytes_per_row_a_source_receives_are_the_models_real_row_size(optimizer, state):
    inner = data()
    tables = model_table_bytes(model(inner, optimizer))
    assert [t.features for t in tables] == [(f,) for f in inner.sparse_feature_names]
    assert [t.num_rows for t in tables] == inner.num_embeddings_per_feature
    # embedding dim x 4 bytes (fp32) + the optimizer's state per row (fp32 elements)
    assert all(t.bytes_per_row == DIM * 4 + state * 4 for t in tables)


def test_a_profiled_source_cuts_by_the_bytes_it_is_given_so_parts_sharing_it_agree():
    inner = data()
    inner.setup("fit")
    source = ProfiledHotRows(budget_bytes=50 * 36, sample_fraction=1.0)
    narrow = resolve_hot_rows(source, inner, model_table_bytes(model(inner)))  # 36-byte rows
    assert len(narrow) == 50
    wide = [TableBytes(t.name, t.features, t.num_rows, 72) for t in model_table_bytes(model(inner))]
    assert len(resolve_hot_rows(source, inner, wide)) == 25  # rows twice as large: half as many fit
    # Rows of a feature that looks up two tables cost both (DeepFM's first-order and embedding tables).
    first = inner.sparse_feature_names[0]
    shared = [*model_table_bytes(model(inner)), TableBytes("first_order", (first,), 400, 4)]
    cut = resolve_hot_rows(source, inner, shared)
    sizes = {f: 36 + (4 if f == first else 0) for f in inner.sparse_feature_names}
    assert sum(sizes[f] * int(rows.numel()) for f, rows in zip(cut.feature_names, cut.rows, strict=True)) <= 50 * 36


def test_the_old_arguments_and_the_old_protocol_still_work_and_say_what_replaces_them():
    inner = data()
    inner.setup("fit")
    with pytest.warns(Warning, match=r"embedding_dim=\.\.\., optimizer=\.\.\.\) is deprecated.*budget_bytes="):
        source = ProfiledHotRows(budget_bytes=50 * 36, embedding_dim=DIM, sample_fraction=1.0)
    assert len(source.hot_rows(inner, [])) == 50  # without a model, the restated width still cuts

    class OneArgument:
        def hot_rows(self, datamodule):
            return RowSet(list(datamodule.sparse_feature_names), list(datamodule.num_embeddings_per_feature),
                          [torch.arange(2) for _ in datamodule.sparse_feature_names])

    with pytest.warns(Warning, match=r"hot_rows\(self, datamodule, tables\)"):
        rowset = resolve_hot_rows(OneArgument(), inner, model_table_bytes(model(inner)))
    assert len(rowset) == 2 * len(inner.sparse_feature_names)
    with pytest.raises(TypeError, match="HotColdStrategy: hot_rows must be a RowSet or a hot-set source"):
        HotColdStrategy(budget_bytes=1000, hot_rows="profile.pt")


def test_the_skippers_guard_ignores_a_standalone_validate_as_early_stopping_does():
    inner = data()
    skipper = StaleEmbeddingSkipper(guard_metric="val_auc", guard_margin=0.0)
    skipper.guard.best = 0.99  # as after a fit whose best validation reached 0.99
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[skipper], limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(model(inner), inner)
    assert float(trainer.callback_metrics["val_auc"]) < 0.99  # a fall, had it been a fit's validation
    assert skipper.guard.backoffs == 0 and skipper.guard.best == 0.99 and skipper.target == 0.3
