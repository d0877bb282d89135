"""PopularityDataModule: hot/cold regrouping, the three schedules, determinism, resume, ranks and a Lightning fit."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import move_data_to_device
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.batch import slice_inputs
from lightning_skew.core.rowsets import RowSet, lookups_in
from lightning_skew.data.base import Batch
from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.models.dlrm import DLRMModule
from lightning_skew.popularity.datamodule import (
    PopularityBatch,
    PopularityDataModule,
    concat_batches,
    count_lookups,
    fae_order,
    hot_input_mask,
    interleave_order,
    select_inputs,
    top_rows,
)
from lightning_skew.torchrec.strategy import TorchRecStrategy

from _support.launch import launch

WORKER = Path(__file__).parent / "popularity_worker.py"
TABLES = [60, 25, 40]


def make_inner(num_train_samples: int = 1024, batch_size: int = 64, **kwargs) -> SyntheticDataModule:
    return SyntheticDataModule(num_embeddings_per_feature=TABLES, num_dense=2, num_train_samples=num_train_samples,
                               num_val_samples=128, num_test_samples=64, batch_size=batch_size,
                               popularity_exponent=1.4, seed=5, **kwargs)


def make_data(schedule: str = "fae", inner: SyntheticDataModule | None = None, **kwargs) -> PopularityDataModule:
    kwargs.setdefault("hot_rows_budget", 20)
    data = PopularityDataModule(inner or make_inner(), schedule=schedule, **kwargs)
    data.setup("fit")
    return data


def signatures(batch: Batch) -> list[tuple[float, ...]]:
    """One tuple per input (dense features and one ID per feature): equal tuples are the same input."""
    sparse = batch.sparse_features
    ids = sparse.values().view(len(sparse.keys()), -1).t().double()
    return [tuple(row) for row in torch.cat([batch.dense_features.double(), ids], dim=1).tolist()]


def epoch_inputs(loader) -> list[tuple[float, ...]]:
    return [sig for batch in loader for sig in signatures(batch)]


def hand_batch() -> Batch:
    # input 0: a=[10], b=[20, 21]; input 1: a=[], b=[22]; input 2: a=[11, 12], b=[23]
    sparse = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([10, 11, 12, 20, 21, 22, 23]),
                               lengths=torch.tensor([1, 0, 2, 2, 1, 1]),
                               weights=torch.tensor([1.0, 1.1, 1.2, 2.0, 2.1, 2.2, 2.3]))
    return Batch(dense_features=torch.tensor([[0.0], [1.0], [2.0]]), sparse_features=sparse,
                 labels=torch.tensor([0.0, 1.0, 0.0]))


def jagged(batch: Batch) -> dict[str, tuple[list[int], list[int], list[float]]]:
    return {key: (jt.lengths().tolist(), jt.values().tolist(), [round(w, 3) for w in jt.weights().tolist()])
            for key, jt in batch.sparse_features.to_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------------------


def test_select_inputs_reorders_dense_labels_and_every_feature_together():
    picked = select_inputs(hand_batch(), torch.tensor([2, 0]))
    assert picked.dense_features.flatten().tolist() == [2.0, 0.0]
    assert picked.labels.tolist() == [0.0, 0.0]
    assert jagged(picked) == {"a": ([2, 1], [11, 12, 10], [1.1, 1.2, 1.0]),
                              "b": ([1, 2], [23, 20, 21], [2.3, 2.0, 2.1])}
    masked = select_inputs(hand_batch(), torch.tensor([False, True, True]))
    assert jagged(masked)["a"] == ([0, 2], [11, 12], [1.1, 1.2])
    assert jagged(masked)["b"] == ([1, 1], [22, 23], [2.2, 2.3])
    empty = select_inputs(hand_batch(), torch.tensor([], dtype=torch.long))
    assert empty.labels.numel() == 0 and empty.sparse_features.values().numel() == 0


def test_select_inputs_of_one_hot_features_keeps_ids_weights_and_lengths_per_input():
    sparse = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([10, 11, 12, 20, 21, 22]),
                               lengths=torch.ones(6, dtype=torch.int32), weights=torch.arange(6.0))
    batch = Batch(torch.arange(3.0)[:, None], sparse, torch.tensor([0.0, 1.0, 0.0]))
    picked = select_inputs(batch, torch.tensor([2, 0, 2]))
    assert jagged(picked) == {"a": ([1, 1, 1], [12, 10, 12], [2.0, 0.0, 2.0]),
                              "b": ([1, 1, 1], [22, 20, 22], [5.0, 3.0, 5.0])}
    assert picked.sparse_features.lengths().dtype == torch.int32


def test_slice_inputs_equals_selecting_the_range_and_keeps_the_leading_hot_split():
    batch = hand_batch()
    assert slice_inputs(batch, 2, 2).sparse_features.values().numel() == 0
    for start, stop in ((0, 3), (1, 3), (0, 1), (1, 2)):
        sliced, picked = slice_inputs(batch, start, stop), select_inputs(batch, torch.arange(start, stop))
        assert jagged(sliced) == jagged(picked)
        assert sliced.dense_features.tolist() == picked.dense_features.tolist()
        assert sliced.labels.tolist() == picked.labels.tolist()
    stitched = PopularityBatch.of(batch, is_hot=False, num_hot=2)
    assert [slice_inputs(stitched, a, b).num_hot for a, b in ((0, 3), (1, 3), (2, 3), (0, 1))] == [2, 1, 0, 1]
    with pytest.raises(ValueError, match=r"\[2, 4\)"):
        slice_inputs(batch, 2, 4)
    # One ID per feature and input, as in Criteo, joined from several batches: the same inputs come back.
    one_hot = Batch(torch.arange(4.0)[:, None], KeyedJaggedTensor(
        keys=["a", "b"], values=torch.tensor([10, 11, 12, 13, 20, 21, 22, 23]), lengths=torch.ones(8, dtype=torch.int32)),
        torch.zeros(4))
    joined = concat_batches([slice_inputs(one_hot, 2, 4), slice_inputs(one_hot, 0, 2)])
    expected = select_inputs(one_hot, torch.tensor([2, 3, 0, 1]))
    assert joined.sparse_features.values().tolist() == expected.sparse_features.values().tolist() \
        == [12, 13, 10, 11, 22, 23, 20, 21]
    assert joined.sparse_features.lengths().tolist() == [1] * 8


def test_concat_batches_inverts_a_split():
    batch = hand_batch()
    joined = concat_batches([select_inputs(batch, [0]), select_inputs(batch, [1, 2]), select_inputs(batch, [0])])
    assert joined.dense_features.flatten().tolist() == [0.0, 1.0, 2.0, 0.0]
    assert jagged(joined) == {"a": ([1, 0, 2, 1], [10, 11, 12, 10], [1.0, 1.1, 1.2, 1.0]),
                              "b": ([2, 1, 1, 2], [20, 21, 22, 23, 20, 21], [2.0, 2.1, 2.2, 2.3, 2.0, 2.1])}
    other = Batch(batch.dense_features, KeyedJaggedTensor(keys=["b", "a"], values=batch.sparse_features.values(),
                                                          lengths=batch.sparse_features.lengths()), batch.labels)
    with pytest.raises(ValueError, match="feature keys differ"):
        concat_batches([batch, other])


def test_hot_inputs_are_those_whose_every_lookup_hits_a_hot_row():
    hot = RowSet(["a", "b"], [20, 30], [torch.tensor([10, 12]), torch.tensor([20, 21, 23])])
    batch = hand_batch()
    # input 0: all hot; input 1: b=22 cold; input 2: a=11 cold
    assert hot_input_mask(batch.sparse_features, hot).tolist() == [True, False, False]
    hits, lookups = lookups_in(batch.sparse_features, hot)
    assert hits.tolist() == [3, 0, 2] and lookups.tolist() == [3, 1, 3]


def test_top_rows_keeps_the_most_looked_up_rows_under_the_budget():
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1]),
                            lengths=torch.tensor([3, 1, 0, 5]))
    counts = count_lookups(kjt, ["a", "b"], [3, 2])
    assert [c.tolist() for c in counts] == [[3, 1, 0], [0, 5]]
    assert [r.tolist() for r in top_rows(counts, ["a", "b"], 2).rows] == [[0], [1]]
    assert [r.tolist() for r in top_rows(counts, ["a", "b"], 10).rows] == [[0, 1], [1]]  # never-seen rows stay cold
    with pytest.raises(ValueError, match="'b' has IDs outside its table"):
        count_lookups(kjt, ["a", "b"], [3, 1])


def test_interleave_spreads_hot_batches_evenly_and_fae_puts_them_last():
    assert fae_order(2, 3).tolist() == [False, False, False, True, True]
    for num_hot, num_cold in [(3, 10), (7, 5), (1, 0), (0, 4)]:
        order = interleave_order(num_hot, num_cold, torch.Generator().manual_seed(3))
        assert int(order.sum()) == num_hot and order.numel() == num_hot + num_cold
        prefix = order.long().cumsum(0)
        expected = torch.arange(1, order.numel() + 1) * num_hot / order.numel()
        assert (prefix - expected).abs().max() <= 1.0


# ------------------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["fae", "interleave", "stitch"])
def test_every_input_is_delivered_once_and_hot_batches_hold_only_hot_inputs(schedule):
    data = make_data(schedule, window_batches=4)
    batches = list(data.train_dataloader())
    inner_epoch = epoch_inputs(make_inner().train_dataloader())
    assert Counter(epoch_inputs(batches)) == Counter(inner_epoch)
    assert len(batches) == 16 and all(isinstance(b, PopularityBatch) for b in batches)
    stats = data.epoch_stats[0]
    assert 0.2 < stats.hot_input_share < 0.8, stats  # both classes are well populated
    assert stats.inputs == 1024 and stats.inputs_dropped == 0
    for batch in batches:
        mask = hot_input_mask(batch.sparse_features, data.hot_rows)
        assert mask[: batch.num_hot].all()
        if batch.is_hot:
            assert mask.all() and batch.num_hot == batch.labels.numel()
    assert stats.hot_batches == sum(b.is_hot for b in batches)
    assert stats.hot_batches > 0 or schedule == "stitch"  # a whole mini-batch of hot inputs is rare
    assert stats.cold_batches == sum(not b.is_hot for b in batches)


def test_fae_delivers_cold_batches_then_hot_batches_per_window():
    whole = [b.is_hot for b in make_data("fae", window_batches=None).train_dataloader()]
    assert whole == sorted(whole) and 0 < sum(whole) < len(whole)
    windowed = [b.is_hot for b in make_data("fae", window_batches=4).train_dataloader()]
    assert all(windowed[i:i + 4] == sorted(windowed[i:i + 4]) for i in range(0, 16, 4))
    assert windowed != sorted(windowed)  # several cold-then-hot phases per epoch


def test_interleave_mixes_hot_batches_in_proportion():
    flags = torch.tensor([b.is_hot for b in make_data("interleave", window_batches=None).train_dataloader()])
    num_hot = int(flags.sum())
    assert 2 <= num_hot <= 14
    expected = torch.arange(1, 17) * num_hot / 16
    assert (flags.long().cumsum(0) - expected).abs().max() <= 1.0


def test_stitch_reorders_each_mini_batch_hot_first():
    data = make_data("stitch")
    inner = list(make_inner().train_dataloader())
    batches = list(data.train_dataloader())
    assert len(batches) == len(inner)
    split_seen = False
    for original, stitched in zip(inner, batches, strict=True):
        mask = hot_input_mask(original.sparse_features, data.hot_rows)
        assert stitched.num_hot == int(mask.sum())
        assert Counter(signatures(stitched)) == Counter(signatures(original))
        assert signatures(stitched.hot_part()) == [s for s, m in zip(signatures(original), mask, strict=True) if m]
        assert signatures(stitched.cold_part()) == [s for s, m in zip(signatures(original), mask, strict=True) if not m]
        split_seen |= 0 < stitched.num_hot < 64
    assert split_seen


# ------------------------------------------------------------------------------------------------------------
# Determinism, resume, drift
# ------------------------------------------------------------------------------------------------------------


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ():
    first, second = make_data("interleave"), make_data("interleave")
    epochs_a = [[signatures(b) for b in first.train_dataloader()] for _ in range(2)]
    epochs_b = [[signatures(b) for b in second.train_dataloader()] for _ in range(2)]
    assert epochs_a == epochs_b
    assert epochs_a[0] != epochs_a[1]  # shuffled per epoch
    other_seed = make_data("interleave", seed=1)
    assert [signatures(b) for b in other_seed.train_dataloader()] != epochs_a[0]


@pytest.mark.parametrize("schedule", ["fae", "interleave", "stitch"])
def test_resume_mid_epoch_delivers_the_next_batch_of_the_uninterrupted_run(schedule):
    data = make_data(schedule, window_batches=4)
    list(data.train_dataloader())  # epoch 0
    loader = iter(data.train_dataloader())  # epoch 1
    for _ in range(6):
        next(loader)
    state = data.state_dict()
    assert state["epoch"] == 1 and state["position"] == 6
    rest = [signatures(b) for b in loader]

    resumed = make_data(schedule, window_batches=4)
    resumed.load_state_dict(state)
    after = [signatures(b) for b in resumed.train_dataloader()]
    assert after == rest
    assert resumed.epoch_stats[1] == data.epoch_stats[1]  # the skipped batches still count in the epoch

    finished = make_data(schedule, window_batches=4)
    finished.load_state_dict(data.state_dict())  # a completed epoch: the next iteration is epoch 2
    fresh = make_data(schedule, window_batches=4)
    for _ in range(3):
        expected = [signatures(b) for b in fresh.train_dataloader()]
    assert [signatures(b) for b in finished.train_dataloader()] == expected


def test_load_state_rejects_another_schedule():
    with pytest.raises(ValueError, match="schedule='fae'"):
        make_data("interleave").load_state_dict(make_data("fae").state_dict())


def test_reprofiling_follows_drifting_popularity():
    def hot_sets(drift_every_samples: int | None) -> tuple[set, set]:
        inner = make_inner(drift_every_samples=drift_every_samples, drift_fraction=0.3)
        data = make_data("fae", inner=inner, profile_batches=4, reprofile_every_n_epochs=1)
        before = {(f, r) for f, rows in enumerate(data.hot_rows.rows) for r in rows.tolist()}
        list(data.train_dataloader())
        list(data.train_dataloader())  # the re-profiled set is in force from epoch 1 on
        after = {(f, r) for f, rows in enumerate(data.hot_rows.rows) for r in rows.tolist()}
        return before, after

    before, after = hot_sets(drift_every_samples=256)
    assert len(before & after) <= len(before) // 2, (before, after)
    before, after = hot_sets(drift_every_samples=None)
    assert len(before & after) >= 0.7 * len(before), (before, after)


def test_clear_errors_for_missing_or_foreign_hot_sets():
    with pytest.raises(ValueError, match="needs a hot set"):
        PopularityDataModule(make_inner())
    with pytest.raises(ValueError, match="schedule must be one of"):
        PopularityDataModule(make_inner(), schedule="round_robin", hot_rows_budget=3)
    foreign = RowSet(["cat_0"], [999], [torch.tensor([1])])
    with pytest.raises(ValueError, match="profiled on another dataset"):
        PopularityDataModule(make_inner(), hot_rows=foreign).setup("fit")


def test_hot_set_sources_a_rowset_or_a_callable():
    given = RowSet(["cat_0"], [TABLES[0]], [torch.tensor([0, 1, 2])])
    assert make_data(hot_rows=given, hot_rows_budget=None).hot_rows is given

    class Source:
        def hot_rows(self, datamodule):
            return given

    assert make_data(hot_rows=Source(), hot_rows_budget=None).hot_rows is given
    assert make_data(hot_rows=lambda datamodule: given, hot_rows_budget=None).hot_rows is given


# ------------------------------------------------------------------------------------------------------------
# Ranks
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_ranks_agree_on_the_number_and_kind_of_batches():
    outputs = launch(WORKER, 2, ["--schedules", "fae,interleave", "--window-batches", "3"], timeout=120)
    ranks = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    stream = epoch_inputs(make_inner().train_dataloader())  # the global stream: 64-input batches in one process
    for run in range(len(ranks[0]["runs"])):
        for epoch in range(2):
            zero, one = (rank["runs"][run]["epochs"][epoch] for rank in ranks)
            assert len(zero["flags"]) == len(one["flags"]) > 0
            assert zero["flags"] == one["flags"]  # the same kind of step on both ranks
            assert 0 < sum(zero["flags"]) < len(zero["flags"])
            assert zero["stats"]["popularity/inputs_dropped"] == 0
            assert zero["stats"]["popularity/hot_inputs_in_cold_batches"] > 0  # surplus hot inputs rode in cold batches
            delivered = Counter(tuple(x) for x in zero["inputs"] + one["inputs"])
            assert delivered == Counter(stream)
    assert ranks[0]["hot_rows"] == ranks[1]["hot_rows"]


# ------------------------------------------------------------------------------------------------------------
# Lightning
# ------------------------------------------------------------------------------------------------------------


class RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[list[tuple[float, ...]]] = []
        self.types: list[type] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.types.append(type(batch))
        self.batches.append(signatures(batch))


def test_batches_keep_their_type_when_moved_to_a_device():
    batch = PopularityBatch.of(hand_batch(), is_hot=True, num_hot=3)
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, PopularityBatch) and moved.is_hot and moved.num_hot == 3


def test_short_dlrm_fit_under_torchrec_strategy_logs_its_epoch_statistics(tmp_path):
    data = PopularityDataModule(make_inner(num_train_samples=256), schedule="interleave", hot_rows_budget=20)
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    record = RecordBatches()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_steps=6,
                         logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=1,
                         callbacks=[record])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    assert trainer.global_step == 6 and set(record.types) == {PopularityBatch}
    assert data.epoch_stats[0].hot_batches + data.epoch_stats[0].cold_batches == 4
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "popularity/hot_input_share" in logged and "popularity/inputs_dropped" in logged


class TinyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return nn.functional.binary_cross_entropy_with_logits(self.layer(batch.dense_features).squeeze(-1),
                                                              batch.labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_tiny(tmp_path: Path, max_steps: int, ckpt_path: str | None = None,
              checkpoint: ModelCheckpoint | None = None) -> RecordBatches:
    data = PopularityDataModule(make_inner(num_train_samples=512), schedule="fae", hot_rows_budget=20,
                                window_batches=3)
    record = RecordBatches()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         enable_checkpointing=checkpoint is not None, callbacks=[record, *filter(None, [checkpoint])],
                         limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyModel(), data, ckpt_path=ckpt_path)
    record.warnings = [str(w.message) for w in caught]
    return record


def test_lightning_resumes_mid_epoch_at_the_batch_after_the_checkpoint(tmp_path):
    # 8 batches per epoch; the checkpoint after step 11 lies in epoch 1, behind Lightning's prefetched batch
    uninterrupted = _fit_tiny(tmp_path / "a", max_steps=14)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=11, save_top_k=-1)
    _fit_tiny(tmp_path / "b", max_steps=11, checkpoint=checkpoint)
    resumed = _fit_tiny(tmp_path / "c", max_steps=14, ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=11.ckpt"))
    assert resumed.batches == uninterrupted.batches[11:]
    # The loader is resumable in Lightning's terms too, so Lightning does not warn that it is not.
    assert not [w for w in resumed.warnings if "not resumable" in w]


def test_lightning_cli_builds_the_wrapper_from_config():
    from lightning_skew.cli import SkewCLI

    config = {
        "model": {"class_path": "lightning_skew.models.dlrm.DLRMModule", "init_args": {"embedding_dim": 8}},
        "data": {"class_path": "lightning_skew.popularity.datamodule.PopularityDataModule", "init_args": {
            "datamodule": {"class_path": "lightning_skew.data.synthetic.SyntheticDataModule",
                           "init_args": {"num_embeddings_per_feature": TABLES, "num_dense": 2,
                                         "num_train_samples": 256, "batch_size": 64}},
            "schedule": "stitch", "hot_rows_budget": 7, "window_batches": 2}},
        "trainer": {"accelerator": "cpu", "logger": False},
    }
    cli = SkewCLI(model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule, subclass_mode_model=True,
                  subclass_mode_data=True, run=False, args=config, save_config_callback=None,
                  auto_configure_optimizers=False)
    assert isinstance(cli.datamodule, PopularityDataModule) and cli.datamodule.schedule == "stitch"
    assert isinstance(cli.datamodule.datamodule, SyntheticDataModule)
    assert cli.model.hparams.num_embeddings_per_feature == TABLES
    assert cli.model.hparams.dense_in_features == 2
    assert cli.datamodule.val_dataloader().dataset.split == "val"


def test_profiled_hot_rows_feed_popularity_batching_from_a_fresh_or_saved_profile(tmp_path):
    from lightning_skew.profile import ProfiledHotRows, row_bytes

    def inner():
        return SyntheticDataModule(num_embeddings_per_feature=[5000, 300, 40], num_dense=3,
                                   num_train_samples=8192, num_val_samples=512, num_test_samples=512,
                                   batch_size=256, seed=4)

    budget = 200 * row_bytes(8)
    fresh_source = ProfiledHotRows(budget_bytes=budget, embedding_dim=8, sample_fraction=1.0)
    fresh = PopularityDataModule(inner(), schedule="fae", hot_rows=fresh_source)
    fresh.setup("fit")
    assert 0 < len(fresh.hot_rows) <= 200  # the byte budget holds 200 rows of width 8 with row-wise Adagrad
    fresh_source.profile.save(tmp_path / "profile.pt")

    saved = PopularityDataModule(inner(), schedule="fae",
                                 hot_rows=ProfiledHotRows(budget_bytes=budget, embedding_dim=8,
                                                          profile_path=str(tmp_path / "profile.pt")))
    saved.setup("fit")
    for a, b in zip(fresh.hot_rows.rows, saved.hot_rows.rows, strict=True):
        assert sorted(a.tolist()) == sorted(b.tolist())
