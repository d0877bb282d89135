"""Hot/cold placement: the plan math, the split collection, and HotColdStrategy end to end on CPU (and CUDA)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from lightning_skew.core.decisions import hot_only_step
from lightning_skew.core.rowsets import RowSet
from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.hotcold.collection import HotColdEmbeddingBagCollection, table_specs
from lightning_skew.hotcold.placement import (
    Placement,
    TableSpec,
    hot_slots,
    merge_rows,
    plan_placement,
    rebalanced_mask,
    rebalanced_rows,
    split_rows,
)
from lightning_skew.hotcold.state import from_original_ids, to_original_ids
from lightning_skew.hotcold.strategy import HotColdStrategy
from lightning_skew.profile import AccessProfile

from _support.hot_cold import hot_cold_batch as _batch
from _support.launch import launch
from _support.small import RecordLosses, make_data, make_model

WORKER = Path(__file__).parent / "hot_cold_worker.py"
SPECS = [TableSpec("a", ("fa",), 100, 4), TableSpec("b", ("fb",), 3, 4), TableSpec("c", ("fc",), 50, 8)]
SIZES = [20, 20, 36]  # bytes per row: dim * 4 plus one rowwise_adagrad element


# -- the plan -------------------------------------------------------------------------------------------------


def test_plan_splits_large_tables_keeps_small_ones_whole_and_respects_the_budget():
    hot = [torch.tensor([5, 1, 7]), torch.tensor([0]), torch.tensor([], dtype=torch.int64)]
    plan = plan_placement(SPECS, hot, budget_bytes=130, bytes_per_row=SIZES)
    assert [t.kind for t in plan.tables] == ["split", "hot", "cold"]  # b (3 rows) fits whole: promoted
    assert torch.nonzero(plan.table("a").hot).flatten().tolist() == [1, 5, 7]
    assert plan.hot_bytes == 3 * 20 + 3 * 20 <= 130
    for budget in (40, 100, 500, 10_000):
        rows = [torch.arange(0, budget // 60), torch.tensor([0]), torch.arange(0, budget // 100)]
        try:
            placed = plan_placement(SPECS, rows, budget, SIZES)
        except ValueError:
            continue
        assert placed.hot_bytes <= budget
    assert [t.kind for t in plan_placement(SPECS, hot, 10_000, SIZES).tables] == ["hot", "hot", "hot"]


def test_plan_is_deterministic_and_survives_its_state_dict():
    hot = [torch.tensor([9, 3]), torch.tensor([2]), torch.tensor([4, 0])]
    first, second = (plan_placement(SPECS, hot, 300, SIZES) for _ in range(2))
    assert first.rows() == second.rows()
    assert all(torch.equal(a.hot, b.hot) for a, b in zip(first.tables, second.tables, strict=True))
    restored = Placement.from_state_dict(first.state_dict())
    assert restored.rows() == first.rows() and restored.same_shapes(first)


def test_a_budget_too_small_for_any_row_or_hot_rows_beyond_it_are_clear_errors():
    none = [torch.zeros(0, dtype=torch.int64)] * 3
    with pytest.raises(ValueError, match="holds no embedding row"):
        plan_placement(SPECS, none, budget_bytes=19, bytes_per_row=SIZES)
    with pytest.raises(ValueError, match="more than the budget"):
        plan_placement(SPECS, [torch.arange(10), torch.tensor([0]), torch.tensor([0])], 100, SIZES)
    with pytest.raises(ValueError, match="outside"):
        plan_placement(SPECS, [torch.tensor([100]), torch.tensor([0]), torch.tensor([0])], 1000, SIZES)


def test_rebalance_takes_the_most_counted_rows_keeps_the_count_and_prefers_current_rows_on_ties():
    current = torch.tensor([True, True, False, False, False])
    counts = torch.tensor([5, 1, 1, 9, 0])
    mask = rebalanced_mask(counts, current)
    assert mask.tolist() == [True, False, False, True, False]
    tie = rebalanced_mask(torch.tensor([1, 1, 1, 1, 1]), current)
    assert torch.equal(tie, current)


def test_rebalanced_rows_keep_staying_rows_in_their_slots_and_fill_evicted_slots():
    current = torch.tensor([4, 0, 2])  # slot order
    counts = torch.tensor([9, 0, 1, 7, 8, 0])  # rows 0, 4, 3 are the most counted
    rows = rebalanced_rows(counts, current, num_rows=6)
    assert rows.tolist() == [4, 0, 3]  # 4 and 0 stay in slots 0 and 1; 3 replaces 2 in slot 2
    assert torch.equal(rebalanced_rows(torch.zeros(6), current, 6), current)  # nothing counted: nothing moves


def test_split_and_merge_are_inverse_and_slots_index_the_hot_shard():
    full = torch.randn(10, 3)
    hot_rows = torch.tensor([9, 1, 4])  # slot order
    hot_part, cold_part = split_rows(full, hot_rows)
    slots = hot_slots(hot_rows, 10)
    for row in range(10):
        if slots[row] >= 0:
            assert torch.equal(hot_part[slots[row]], full[row])
        assert torch.equal(cold_part[row], full[row])  # the cold shard is the whole table, by row ID
    stale_cold = cold_part.clone()
    stale_cold[hot_rows] = 0.0  # the cold copies of hot rows are never read
    assert torch.equal(merge_rows(hot_part, stale_cold, hot_rows), full)
    assert torch.equal(merge_rows(full[torch.tensor([2, 0, 1])], None, torch.tensor([2, 0, 1])), full[:3])


# -- the split collection ---------------------------------------------------------------------------------


def _collection(weighted: bool = False, layout: str = "separate"):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=100, feature_names=["fa", "fa2"]),
              EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=3, feature_names=["fb"]),
              EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=50, feature_names=["fc"])]
    ebc = EmbeddingBagCollection(tables, is_weighted=weighted)
    specs = table_specs(ebc)
    plan = plan_placement(specs, [torch.tensor([1, 5, 7]), torch.tensor([0]), torch.zeros(0, dtype=torch.int64)],
                          budget_bytes=130, bytes_per_row=[20, 20, 36])
    return ebc, HotColdEmbeddingBagCollection(ebc, plan, layout)


@pytest.mark.parametrize("one_hot", [False, True], ids=["bags", "one_hot"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_the_split_collection_pools_exactly_as_the_original(weighted, one_hot):
    ebc, split = _collection(weighted)
    batch = _batch(weighted, batch_size=64, one_hot=one_hot)
    expected, actual = ebc(batch), split(batch)
    assert actual.keys() == expected.keys()
    torch.testing.assert_close(actual.values(), expected.values(), atol=1e-6, rtol=1e-6)
    expected.values().sum().backward()
    actual.values().sum().backward()
    grad = split.hot.embedding_bags["a__hot"].weight.grad
    torch.testing.assert_close(grad, ebc.embedding_bags["a"].weight.grad[[1, 5, 7]])


@pytest.mark.parametrize("one_hot", [False, True], ids=["bags", "one_hot"])
def test_fused_parts_live_in_one_collection_and_pool_exactly_as_the_original(one_hot):
    ebc, fused = _collection(layout="fused")
    assert fused.hot is None and fused.cold is None
    assert set(fused.parts.embedding_bags) == set(fused.inner_tables()) == {"a__hot", "a__cold", "b__hot", "c__cold"}
    assert fused.part_attribute("hot") == fused.part_attribute("cold") == "parts"
    batch = _batch(False, batch_size=64, one_hot=one_hot)
    expected, actual = ebc(batch), fused(batch)
    assert actual.keys() == expected.keys()
    torch.testing.assert_close(actual.values(), expected.values(), atol=1e-6, rtol=1e-6)
    expected.values().sum().backward()
    actual.values().sum().backward()
    torch.testing.assert_close(fused.parts.embedding_bags["a__hot"].weight.grad,
                               ebc.embedding_bags["a"].weight.grad[[1, 5, 7]])
    cold_grad = fused.parts.embedding_bags["a__cold"].weight.grad
    assert not cold_grad[[1, 5, 7]].any()  # a hot row's lookups all went to its slot
    torch.testing.assert_close(cold_grad[[0, 2, 3]], ebc.embedding_bags["a"].weight.grad[[0, 2, 3]])


@pytest.mark.parametrize("one_hot", [False, True], ids=["bags", "one_hot"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_a_stacked_split_table_holds_its_hot_slots_above_its_cold_shard_and_pools_exactly(weighted, one_hot):
    ebc, stacked = _collection(weighted, layout="stacked")
    assert set(stacked.parts.embedding_bags) == {"a__hotcold", "b__hot", "c__cold"}  # one inner table per table
    assert stacked.parts.embedding_bags["a__hotcold"].weight.shape[0] == 3 + 100  # 3 hot slots, then all rows
    batch = _batch(weighted, batch_size=64, one_hot=one_hot)
    expected, actual = ebc(batch), stacked(batch)
    assert actual.keys() == expected.keys()
    torch.testing.assert_close(actual.values(), expected.values(), atol=1e-6, rtol=1e-6)
    expected.values().sum().backward()
    actual.values().sum().backward()
    grad, original = stacked.parts.embedding_bags["a__hotcold"].weight.grad, ebc.embedding_bags["a"].weight.grad
    torch.testing.assert_close(grad[:3], original[[1, 5, 7]])  # hot rows 1, 5, 7 in slots 0, 1, 2
    assert not grad[3 + torch.tensor([1, 5, 7])].any()  # their cold copies are not read while they are hot
    torch.testing.assert_close(grad[3 + torch.tensor([0, 2, 3])], original[[0, 2, 3]])
    # Its state, in the dataset's ID space, is the original table's; and back.
    whole = stacked.merge_table("a", None, None, stacked.parts.embedding_bags["a__hotcold"].weight.detach())
    torch.testing.assert_close(whole, ebc.embedding_bags["a"].weight.detach())
    torch.testing.assert_close(stacked.split_table("a", whole)["a__hotcold"],
                               stacked.parts.embedding_bags["a__hotcold"].weight.detach())


@pytest.mark.parametrize("one_hot", [False, True], ids=["bags", "one_hot"])
def test_counting_sees_every_training_lookup_and_ignores_other_features(one_hot):
    _, split = _collection()
    batch = _batch(one_hot=one_hot)
    split.train()
    split.start_counting()
    split(batch)
    per_key = dict(zip(batch.keys(), batch.lengths().view(len(batch.keys()), -1).sum(1).tolist(), strict=True))
    assert int(split.counts.sum()) == sum(per_key[k] for k in ("fa", "fa2", "fb", "fc"))
    by_key = batch.to_dict()  # table a's rows come first in the counts, and fa and fa2 share it
    expected = torch.bincount(torch.cat([by_key["fa"].values(), by_key["fa2"].values()]), minlength=100)
    assert torch.equal(split.counts[:100], expected)


def test_a_hot_batch_that_looks_up_cold_rows_is_an_error_and_mean_pooling_is_refused():
    _, split = _collection()
    with hot_only_step(), pytest.raises(RuntimeError, match="looks up"):  # the step's batch says it is hot
        split(_batch())
    mean = EmbeddingBagCollection([EmbeddingBagConfig(name="m", embedding_dim=4, num_embeddings=10,
                                                      feature_names=["f"], pooling=PoolingType.MEAN)])
    plan = plan_placement(table_specs(mean), [torch.tensor([1])], 20, [20])
    with pytest.raises(ValueError, match="sum pooling"):
        HotColdEmbeddingBagCollection(mean, plan)


def test_state_moves_to_the_datasets_id_space_and_back():
    ebc, split = _collection()
    inner = {f"ebc.{k}": v for k, v in split.state_dict().items()}
    original = to_original_ids(inner, {"ebc": split})
    for name in ("a", "b", "c"):
        torch.testing.assert_close(original[f"ebc.embedding_bags.{name}.weight"], ebc.embedding_bags[name].weight)
    back = from_original_ids(original, {"ebc": split})
    assert sorted(back) == sorted(inner) and all(torch.equal(back[k], inner[k]) for k in inner)


# -- the strategy, end to end (separate processes, like torchrun) ------------------------------------------


def _run(out: Path, world_size: int = 1, **options) -> dict:
    args = ["--out", str(out)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    launch(WORKER, world_size, args)
    state = torch.load(out / "state.pt", weights_only=False)
    return {"losses": json.loads((out / "losses.json").read_text()), "optimizer": state["optimizer"],
            "weights": torch.load(out / "export.ckpt", weights_only=False)["state_dict"], "state": state,
            "checkpoint": next((out / "checkpoints").iterdir(), None)}


def _assert_same(actual: dict, expected: dict, atol: float = 1e-6, first_step: int = 0) -> None:
    assert len(actual["losses"]) == len(expected["losses"]) - first_step
    torch.testing.assert_close(actual["losses"], expected["losses"][first_step:], atol=atol, rtol=0)
    for part in ("weights", "optimizer"):
        assert sorted(actual[part]) == sorted(expected[part])
        for key, value in expected[part].items():
            torch.testing.assert_close(actual[part][key].float(), value.float(), atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hotcold")
    out = {"torchrec": _run(root / "torchrec", strategy="torchrec", epochs=2),
           "hotcold": _run(root / "hotcold", strategy="hotcold", epochs=2, rebalance_every=3),
           "first": _run(root / "first", strategy="hotcold", epochs=1, rebalance_every=3),
           "torchrec_first": _run(root / "torchrec_first", strategy="torchrec", epochs=1)}
    return {"root": root, **out}


def test_hot_cold_training_equals_torchrec_training_across_rebalances(runs):
    rebalances = runs["hotcold"]["state"]["rebalances"]
    assert len(rebalances) == 5 and all(r["rows_moved"] > 0 for r in rebalances)
    assert all(r["hot_lookup_share_after"] >= r["hot_lookup_share_before"] for r in rebalances)
    kinds = {row[1] for p in runs["hotcold"]["state"]["placements"].values()
             for row in Placement.from_state_dict(p).rows()}
    assert "split" in kinds
    _assert_same(runs["hotcold"], runs["torchrec"])


def test_resume_continues_as_the_uninterrupted_run_rebalances_included(runs):
    resumed = _run(runs["root"] / "resumed", strategy="hotcold", epochs=2, rebalance_every=3,
                   resume=runs["first"]["checkpoint"])
    assert [r["rows_moved"] for r in resumed["state"]["rebalances"]] == \
        [r["rows_moved"] for r in runs["hotcold"]["state"]["rebalances"][2:]]
    _assert_same(resumed, runs["hotcold"], first_step=8)


def test_a_hot_cold_checkpoint_resumes_under_plain_torchrec(runs):
    resumed = _run(runs["root"] / "into_torchrec", strategy="torchrec", epochs=2, resume=runs["first"]["checkpoint"])
    _assert_same(resumed, runs["torchrec"], first_step=8)


def test_a_torchrec_checkpoint_resumes_under_another_budget(runs):
    resumed = _run(runs["root"] / "into_hotcold", strategy="hotcold", epochs=2, budget_rows=50,
                   resume=runs["torchrec_first"]["checkpoint"])
    _assert_same(resumed, runs["torchrec"], first_step=8)


def test_two_ranks_resume_a_one_rank_checkpoint_under_another_budget(runs):
    resumed = _run(runs["root"] / "two_ranks", world_size=2, strategy="hotcold", epochs=2, budget_rows=120,
                   rebalance_every=3, resume=runs["first"]["checkpoint"])
    _assert_same(resumed, runs["torchrec"], first_step=8)


@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_every_layout_trains_as_torchrec_across_rebalances(runs, layout):
    other = _run(runs["root"] / layout, strategy="hotcold", epochs=1, rebalance_every=3, layout=layout)
    assert len(other["state"]["rebalances"]) == 2
    _assert_same(other, runs["torchrec_first"])
    _assert_same(other, runs["first"])  # the default (stacked on CPU) run


def test_hot_batches_of_a_popularity_datamodule_never_run_the_cold_collection(tmp_path):
    plain = _run(tmp_path / "torchrec", strategy="torchrec", popularity=True)
    hot_cold = _run(tmp_path / "hotcold", strategy="hotcold", popularity=True)
    assert hot_cold["state"]["skipped_cold"] == [2]  # the FAE schedule's two hot batches
    _assert_same(hot_cold, plain)
    # The DataModule and the strategy asked the same source: one profiling pass for both.
    assert json.loads((tmp_path / "hotcold" / "profiling_passes.json").read_text()) == 1


# -- set-up errors, in process ------------------------------------------------------------------------------


def _fit(strategy: HotColdStrategy, tmp_path: Path, module: pl.LightningModule | None = None,
         max_steps: int = 1) -> pl.Trainer:
    data = make_data(1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=1, max_steps=max_steps,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module if module is not None else make_model(data, "rowwise_adagrad"), data)
    return trainer


def test_a_budget_too_small_for_any_row_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="budget of 8 bytes .* smallest row"):
        _fit(HotColdStrategy(budget_bytes=8), tmp_path)  # the message names the smallest row


def test_a_profile_of_other_tables_is_a_clear_error(tmp_path):
    profile = AccessProfile(["x", "y"], [10, 20])
    profile.save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other tables"):
        _fit(HotColdStrategy(budget_bytes=10_000, profile_path=str(tmp_path / "other.pt")), tmp_path)


def test_a_saved_profile_places_the_same_rows_every_time(tmp_path):
    data = make_data(1)
    data.setup("fit")
    profile = AccessProfile.for_datamodule(data)
    for batch in data.train_dataloader():
        profile.update(batch.sparse_features)
    profile.save(tmp_path / "profile.pt")
    plans = []
    for _ in range(2):
        strategy = HotColdStrategy(budget_bytes=36 * 100, profile_path=str(tmp_path / "profile.pt"))
        _fit(strategy, tmp_path)
        (placement,) = strategy.placements.values()
        assert placement.hot_bytes <= 36 * 100
        plans.append(placement)
    assert plans[0].rows() == plans[1].rows()
    assert all(torch.equal(a.hot, b.hot) for a, b in zip(plans[0].tables, plans[1].tables, strict=True))


def test_rebalancing_by_epochs_happens_at_the_first_step_of_every_nth_epoch(tmp_path):
    data = make_data(1)
    strategy = HotColdStrategy(budget_bytes=36 * 100, rebalance_every_n_epochs=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=3, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_model(data, "rowwise_adagrad"), data)
    assert len(strategy.rebalances) == 2  # at the start of epochs 1 and 2, not of epoch 0
    assert all(r["hot_lookup_share_after"] >= r["hot_lookup_share_before"] for r in strategy.rebalances)


def test_uvm_kernels_on_cpu_are_a_clear_error(tmp_path):
    with pytest.raises(MisconfigurationException, match="need CUDA"):
        _fit(HotColdStrategy(budget_bytes=10_000, cold_compute_kernel="fused_uvm"), tmp_path)


# -- CUDA --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_hot_shards_use_gpu_memory_and_cold_shards_host_memory(tmp_path):
    data = make_data(1)
    strategy = HotColdStrategy(budget_bytes=36 * 100)
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=strategy, max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(make_model(data, "rowwise_adagrad"), data)
    kernels = {table: sharding.compute_kernel for plan in strategy.dmp.plan.plan.values()
               for table, sharding in plan.items()}
    assert all(k == "fused" for t, k in kernels.items() if t.endswith("__hot"))
    assert all(k == "fused_uvm" for t, k in kernels.items() if t.endswith("__cold"))


class TwoCollections(pl.LightningModule):
    """Not a DLRM: two EmbeddingBagCollections (one with a table shared by two features) and a linear head."""

    def __init__(self, rows: list[int], dense: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        first = [EmbeddingBagConfig(name="shared", embedding_dim=4, num_embeddings=max(rows[0], rows[1]),
                                    feature_names=["cat_0", "cat_1"])]
        second = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=n, feature_names=[f"cat_{i}"])
                  for i, n in enumerate(rows) if i >= 2]
        self.first, self.second = EmbeddingBagCollection(tables=first), EmbeddingBagCollection(tables=second)
        self.head = torch.nn.Linear(4 * len(rows) + dense, 1)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        pooled = [self.first(batch.sparse_features).values(), self.second(batch.sparse_features).values()]
        logits = self.head(torch.cat([*pooled, batch.dense_features], dim=1)).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels.float())
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_a_module_with_two_collections_and_a_shared_table_trains_as_under_torchrec(tmp_path):
    from lightning_skew.torchrec.strategy import TorchRecStrategy

    data = make_data(1)
    losses = {}
    for name, strategy in (("torchrec", TorchRecStrategy(embedding_optimizer="rowwise_adagrad", embedding_lr=0.1)),
                           ("hotcold", HotColdStrategy(budget_bytes=36 * 150, embedding_optimizer="rowwise_adagrad",
                                                       embedding_lr=0.1, rebalance_every_n_steps=3))):
        module = TwoCollections(data.num_embeddings_per_feature, data.dense_in_features)
        _fit(strategy, tmp_path, module=module, max_steps=8)
        losses[name] = module.losses
        if name == "hotcold":
            assert set(strategy.placements) == {"first", "second"}
            assert {t.kind for p in strategy.placements.values() for t in p.tables} >= {"split"}
            assert strategy.rebalances
    assert len(losses["hotcold"]) == 8
    torch.testing.assert_close(losses["hotcold"], losses["torchrec"], atol=1e-6, rtol=0)


def test_stale_embedding_skipper_watches_split_collections_like_the_original_tables(tmp_path):
    from lightning_skew.stale.skipper import StaleEmbeddingSkipper
    from lightning_skew.torchrec.strategy import TorchRecStrategy

    decisions = {}
    for name, strategy in (("torchrec", TorchRecStrategy(embedding_optimizer="rowwise_adagrad", embedding_lr=0.1)),
                           ("hotcold", HotColdStrategy(budget_bytes=36 * 100, embedding_optimizer="rowwise_adagrad",
                                                       embedding_lr=0.1))):
        skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=2, target_drop_fraction=0.3, tolerance=0.05,
                                        sample_batches=2)
        data = make_data(1)
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=8, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path / name),
                             callbacks=[skipper])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            trainer.fit(make_model(data, "rowwise_adagrad"), data)
        decisions[name] = (skipper.evaluations, skipper.inputs_dropped, len(skipper.stale or []), skipper.threshold)
    assert decisions["hotcold"][0] > 0 and decisions["hotcold"][1] > 0  # it decided and dropped inputs
    assert decisions["hotcold"][:3] == decisions["torchrec"][:3]  # the same rows and inputs as unsplit


def test_a_profile_of_other_data_with_the_same_tables_is_refused(tmp_path):
    other = make_data(1)
    other.seed = 99  # the same tables, other data
    other.hparams["seed"] = 99
    profile = AccessProfile.for_datamodule(other)
    profile.save(tmp_path / "other_seed.pt")
    with pytest.raises(ValueError, match="seed"):
        _fit(HotColdStrategy(budget_bytes=36 * 100, profile_path=str(tmp_path / "other_seed.pt")), tmp_path)


def test_on_cpu_the_strategy_says_once_that_the_split_cannot_pay(tmp_path):
    data = make_data(1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=HotColdStrategy(budget_bytes=36 * 100), max_steps=2,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_model(data, "rowwise_adagrad"), data)
    said = [str(w.message) for w in caught if "live in the same memory" in str(w.message)]
    assert len(said) == 1 and "TorchRecStrategy" in said[0] and "of TorchRecStrategy's speed" in said[0]


def test_with_dataloader_workers_the_workers_route_the_batches_and_training_stays_exact(tmp_path):
    from lightning_skew.torchrec.strategy import TorchRecStrategy

    losses, strategies = {}, {}
    for name, strategy in (("torchrec", TorchRecStrategy()), ("hotcold", HotColdStrategy(budget_bytes=36 * 100))):
        data = make_data(1)
        data.num_workers = 1  # one worker process generates (and, under HotColdStrategy, routes) the batches
        record = RecordLosses()
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=6, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path / name),
                             callbacks=[record])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(make_model(data, "rowwise_adagrad"), data)
        losses[name], strategies[name] = record.losses, strategy
    hot_cold = strategies["hotcold"]
    assert hot_cold.batches_routed_in_workers == 6  # every training batch arrived routed: none split here
    assert [c.routed_forwards for c in hot_cold.collections().values()] == [6]
    torch.testing.assert_close(losses["hotcold"], losses["torchrec"], atol=1e-6, rtol=0)


def test_a_worker_leaves_a_batch_with_ids_outside_the_tables_to_the_training_process_which_refuses_it(tmp_path):
    data = make_data(1)
    data.num_workers = 1
    small = SyntheticDataModule(num_embeddings_per_feature=[rows // 2 for rows in data.num_embeddings_per_feature],
                                num_dense=data.dense_in_features)
    model = make_model(small, "rowwise_adagrad")  # tables of half the rows the data's IDs reach
    hot_rows = RowSet(small.sparse_feature_names, small.num_embeddings_per_feature,
                      [torch.arange(3) for _ in small.sparse_feature_names])  # a hot set of the model's tables
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=HotColdStrategy(budget_bytes=36 * 100,
                                                                                 hot_rows=hot_rows),
                         max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="outside its table") as caught:
            trainer.fit(model, data)
    assert "DataLoader worker" not in str(caught.value)  # refused here, by name, not as a worker's crash


def test_tables_that_share_a_feature_are_placed_alike_as_one_routing_serves_them():
    specs = [TableSpec("first_order", ("f",), 10, 1), TableSpec("embedding", ("f",), 10, 8), TableSpec("other", ("g",), 10, 8)]
    rows = [torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([0])]
    # 124 bytes hot; 330 left: enough to make `other` (324) or `first_order` alone (64) whole, not both tables of f.
    plan = plan_placement(specs, rows, budget_bytes=454, bytes_per_row=[8, 36, 36])
    assert plan.table("first_order").kind == plan.table("embedding").kind == "split"
    assert torch.equal(plan.table("first_order").hot_rows, plan.table("embedding").hot_rows)
    assert plan.table("other").kind == "hot"
