"""Bagpipe on the plain-PyTorch path: lookahead moves of cold rows into the hot shard, exact, and CUDA-only."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.tiers.prefetch import (
    LookaheadBatch,
    LookaheadDataModule,
    LookaheadPrefetch,
    prefetch_for,
    refresh_plan,
)

from _support.hot_cold import hot_cold_batch, hot_cold_pair


def test_refresh_plan_brings_the_steps_cold_rows_in_and_evicts_what_is_needed_furthest_ahead():
    hot = torch.tensor([10, 11, 12, 13])
    now = torch.tensor([11, 20, 21, 20])
    coming = [torch.tensor([12]), torch.tensor([13, 10])]  # 12 next step, 13 and 10 the one after
    slots, incoming = refresh_plan(hot, [now, *coming])
    assert incoming.tolist() == [20, 21]
    # 11 is needed now; 10 and 13 are needed two steps ahead (13 is the higher ID), 12 next step
    assert sorted(hot[slots].tolist()) == [10, 13]
    # more cold rows than free slots: the ones needed again soonest come in
    slots, incoming = refresh_plan(torch.tensor([1, 2]), [torch.tensor([5, 6, 7, 1]), torch.tensor([7])])
    assert incoming.tolist() == [7] and hot.numel() == 4 and slots.tolist() == [1]


def test_lookahead_moves_keep_training_exact():
    ebc, split = hot_cold_pair()
    batches = [hot_cold_batch(batch_size=32) for _ in range(6)]
    moved = 0
    for step, batch in enumerate(batches):
        moved += prefetch_for(split, batches[step:step + 3])
        features = batch.to_dict()
        for table in split.placement.tables:  # the step's rows of a split table are hot, as many as fit
            if table.kind == "split":
                needed = torch.unique(torch.cat([features[f].values() for f in table.spec.feature_names]))
                hits = int(torch.isin(needed, table.hot_rows).sum())
                assert hits == min(needed.numel(), table.num_hot)
        expected, actual = ebc(batch), split(batch)
        torch.testing.assert_close(actual.values(), expected.values(), atol=1e-6, rtol=0)
        grad_out = torch.randn_like(expected.values(), generator=torch.Generator().manual_seed(step))
        (expected.values() * grad_out).sum().backward()
        (actual.values() * grad_out).sum().backward()
    assert moved > 0
    merged = split.state_dict()
    for name in ("a", "b", "c"):
        torch.testing.assert_close(merged[f"embedding_bags.{name}.weight"], ebc.embedding_bags[name].weight,
                                   atol=1e-6, rtol=0)
    # the optimizer state moved with the rows: whole tables agree with the original's
    original = {cfg.name: ebc.embedding_bags[cfg.name].weight for cfg in ebc.embedding_bag_configs()}
    for table, state in split.optimizer_state().items():
        reference = original[table]._in_backward_optimizers[0].state[original[table]]
        torch.testing.assert_close(state["sum"].reshape(reference["sum"].shape), reference["sum"], atol=1e-6,
                                   rtol=1e-6)


def test_lookahead_batches_show_the_coming_batches_and_stay_on_the_host():
    data = LookaheadDataModule(SyntheticDataModule(num_embeddings_per_feature=[50, 80], num_dense=2,
                                                   num_train_samples=2048, batch_size=256), window=3)
    data.setup("fit")
    plain = SyntheticDataModule(num_embeddings_per_feature=[50, 80], num_dense=2, num_train_samples=2048,
                                batch_size=256)
    plain.setup("fit")
    wrapped, originals = list(data.train_dataloader()), list(plain.train_dataloader())
    assert len(wrapped) == len(originals) == 8
    for index, batch in enumerate(wrapped):
        assert isinstance(batch, LookaheadBatch)
        expected = originals[index:index + 4]
        assert len(batch.upcoming) == len(expected)
        for shown, original in zip(batch.upcoming, expected, strict=True):
            features = original.sparse_features.to_dict()
            assert sorted(shown) == sorted(features)
            for key, rows in shown.items():
                assert rows.tolist() == sorted(set(features[key].values().tolist()))
    moved = wrapped[0].to("meta")
    assert isinstance(moved, LookaheadBatch) and moved.upcoming[0]["cat_0"].device.type == "cpu"
    assert moved.labels.device.type == "meta"


def test_lookahead_prefetch_refuses_without_cuda():
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    with pytest.raises(MisconfigurationException, match="moves cold rows into GPU memory.*accelerator='gpu'"):
        LookaheadPrefetch().setup(trainer, pl.LightningModule(), "fit")


def test_a_batch_without_lookahead_is_a_clear_error():
    batch = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(MisconfigurationException, match="wrap the DataModule in .*LookaheadDataModule"):
        LookaheadPrefetch().on_train_batch_start(None, pl.LightningModule(), batch, 0)


def test_the_simulator_replays_what_the_prefetch_does():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from lightning_skew.hotcold.collection import table_specs
    from lightning_skew.hotcold.placement import plan_placement
    from lightning_skew.hotcold.plain import PlainHotColdEmbeddingBagCollection
    from lightning_skew.tiers import StreamBuilder
    from lightning_skew.tiers.lookahead import lookahead_hot_set
    from lightning_skew.torchrec.optim import fuse_embedding_optimizer

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=100,
                                                     feature_names=["fa"]),
                                  EmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=50,
                                                     feature_names=["fc"])])
    fuse_embedding_optimizer(ebc, "rowwise_adagrad", lr=0.1)
    hot = [torch.tensor([1, 5, 7, 9]), torch.tensor([0, 3])]
    split = PlainHotColdEmbeddingBagCollection(ebc, plan_placement(table_specs(ebc), hot, 120, [20, 20]))
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(12):
        values = torch.cat([torch.randint(0, 12, (16,), generator=generator),
                            torch.randint(0, 8, (16,), generator=generator)])
        batches.append(KeyedJaggedTensor.from_lengths_sync(["fa", "fc"], values, torch.ones(32, dtype=torch.int64)))
    builder = StreamBuilder(["fa", "fc"], [100, 50], [20, 20])
    for batch in batches:
        builder.add(batch)
    replay = lookahead_hot_set(builder.build(), hot, window=2, record=True)
    offsets = {"a": 0, "c": 100}
    for step, batch in enumerate(batches):
        features = batch.to_dict()
        hits = sorted(offsets[t.spec.name] + int(r) for t in split.placement.tables
                      for r in torch.unique(features["f" + t.spec.name].values()) if r in t.hot_rows)
        assert hits == replay.records[step][0].tolist(), step
        prefetch_for(split, batches[step:step + 3])
        split(batch).values().sum().backward()
    assert int(replay.read_rows.sum()) < int(replay.needed.sum())  # the hot shard served some rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_lookahead_moves_rows_between_gpu_and_host_memory_exactly():
    ebc, split = hot_cold_pair()
    split.cuda()
    batches = [hot_cold_batch(batch_size=32) for _ in range(5)]
    moved = 0
    for step, batch in enumerate(batches):
        moved += prefetch_for(split, batches[step:step + 3])  # host-side features, as LookaheadBatch keeps them
        assert split.hot.embedding_bags["a__hot"].weight.is_cuda
        assert not split.cold.embedding_bags["a__cold"].weight.is_cuda
        expected, actual = ebc(batch), split(batch.to(torch.device("cuda")))
        torch.testing.assert_close(actual.values().cpu(), expected.values(), atol=1e-5, rtol=0)
        grad_out = torch.randn_like(expected.values())
        (expected.values() * grad_out).sum().backward()
        (actual.values() * grad_out.cuda()).sum().backward()
    assert moved > 0
    merged = split.state_dict()
    for name in ("a", "b", "c"):
        torch.testing.assert_close(merged[f"embedding_bags.{name}.weight"], ebc.embedding_bags[name].weight,
                                   atol=1e-5, rtol=0)
