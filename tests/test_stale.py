"""StaleEmbeddingSkipper: the pure staleness functions, then the callback in short CPU fits (1 and 2 processes)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torchrec.datasets.utils import Batch

from lightning_skew.core.rowsets import RowSet
from lightning_skew.stale.repack import repack_batches
from lightning_skew.stale.skipper import StaleEmbeddingSkipper
from lightning_skew.stale.staleness import (
    bisect_threshold,
    critical_thresholds,
    drop_mask,
    keep_at_least_one,
    row_change,
    stale_rowset,
)

from _support.launch import launch
from _support.stale import FEATURES, ROWS, SizedDLRM, fit, kjt, make_batches, make_model


def test_row_change_is_the_largest_elementwise_move_and_relative_divides_by_row_scale():
    before = torch.tensor([[1.0, 2.0], [0.5, -4.0]])
    after = torch.tensor([[1.1, 1.7], [0.5, -4.0]])
    assert torch.allclose(row_change(before, after), torch.tensor([0.3, 0.0]))
    assert torch.allclose(row_change(before, after, relative=True), torch.tensor([0.15, 0.0]))


def test_drop_rule_all_lookups_or_at_least_k_and_never_an_empty_batch():
    sparse = kjt({"a": [[1], [1], [2], []], "b": [[3, 1], [4], [3], []]})
    stale = RowSet(FEATURES, [10, 10], [torch.tensor([1]), torch.tensor([3])])
    assert drop_mask(sparse, stale).tolist() == [False, False, False, False]  # input 0: b=1 not stale
    stale_b = RowSet(FEATURES, [10, 10], [torch.tensor([1]), torch.tensor([1, 3])])
    assert drop_mask(sparse, stale_b).tolist() == [True, False, False, False]  # no-lookup input 3 kept
    assert drop_mask(sparse, stale, min_stale_lookups=1).tolist() == [True, True, True, False]
    assert keep_at_least_one(torch.tensor([True, True])).tolist() == [False, True]


def test_critical_thresholds_agree_with_the_drop_rule_at_every_threshold():
    torch.manual_seed(0)
    ids = {f: [torch.randint(0, 20, (int(torch.randint(0, 4, ())),)).tolist() for _ in range(64)] for f in FEATURES}
    sparse = kjt(ids)
    changes = {f: torch.rand(20) for f in FEATURES}
    changes["b"][15:] = float("inf")  # not candidates
    for k in (None, 1, 2):
        critical = critical_thresholds(sparse, changes, k)
        for threshold in (0.05, 0.3, 0.6, 0.95):
            stale = stale_rowset(FEATURES, [20, 20], [torch.arange(20)] * 2, [changes["a"], changes["b"]], threshold)
            assert torch.equal(critical < threshold, drop_mask(sparse, stale, k)), (k, threshold)


def test_bisection_hits_the_target_drop_fraction_within_tolerance_on_a_sample():
    torch.manual_seed(1)
    sparse = kjt({f: [torch.randint(0, ROWS, (2,)).tolist() for _ in range(4000)] for f in FEATURES})
    changes = {f: torch.rand(ROWS) ** 3 for f in FEATURES}
    critical = critical_thresholds(sparse, changes)
    for target in (0.1, 0.3, 0.5):
        threshold, share = bisect_threshold(lambda t: float((critical < t).float().mean()), target, 0.01, 1e-9, 2.0)
        stale = stale_rowset(FEATURES, [ROWS, ROWS], [torch.arange(ROWS)] * 2, [changes[f] for f in FEATURES],
                             threshold)
        measured = float(drop_mask(sparse, stale).float().mean())
        assert abs(measured - target) <= 0.01 and measured == pytest.approx(share)


# ----------------------------------------------------------------------------------------------------------
# The callback in short fits (plain Lightning, unsharded embeddings)
# ----------------------------------------------------------------------------------------------------------


class RecordStale(pl.Callback):
    """After the skipper: the stale rows of feature ``a`` and the threshold at every step."""

    def __init__(self, skipper: StaleEmbeddingSkipper) -> None:
        self.skipper = skipper
        self.stale: list[set[int]] = []
        self.thresholds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stale = self.skipper.stale
        self.stale.append(set(stale.rows[0].tolist()) if stale is not None else set())
        self.thresholds.append(self.skipper.threshold)


def all_rows() -> RowSet:
    return RowSet(FEATURES, [ROWS, ROWS], [torch.arange(ROWS)] * 2)


def test_rows_without_gradient_are_found_stale_with_precision_and_recall_at_least_099():
    skipper = StaleEmbeddingSkipper(hot_rows=all_rows(), evaluate_every_n_steps=3, threshold=1e-7)
    record = RecordStale(skipper)
    fit(make_model(), make_batches(7, [range(0, 60)]), [skipper, record])
    found = record.stale[-1]
    frozen = set(range(60, ROWS))  # their IDs never appear: no gradient
    precision = len(found & frozen) / max(len(found), 1)
    recall = len(found & frozen) / len(frozen)
    assert precision >= 0.99 and recall >= 0.99, (precision, recall)


def test_dropping_really_shrinks_the_batch_the_model_sees():
    model = make_model()
    skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=2, target_drop_fraction=0.5, tolerance=0.05,
                                    sample_batches=2)
    trainer = fit(model, make_batches(8, [range(0, 60)]), [skipper])
    assert model.seen_sizes[:2] == [256, 256]  # nothing is stale before the first window ends
    assert min(model.seen_sizes[2:]) < 256 and min(model.seen_sizes) >= 1
    assert skipper.inputs_dropped == sum(256 - s for s in model.seen_sizes)
    logged = trainer.callback_metrics
    assert 0 < float(logged["stale/drop_share"]) < 1 and float(logged["stale/rows"]) > 0
    assert float(logged["stale/threshold"]) > 0 and 0 <= float(logged["stale/overhead"]) < 1


def test_automatic_threshold_hits_the_target_on_its_sample():
    skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=3, target_drop_fraction=0.3, tolerance=0.03,
                                    sample_batches=3)
    fit(make_model(), make_batches(7, [range(0, 60)]), [skipper])
    sample_drop = torch.cat([drop_mask(s, skipper.stale) for s in skipper.sample]).float().mean()
    assert abs(float(sample_drop) - 0.3) <= 0.03 + 1e-9


def test_rows_that_move_again_after_a_popularity_shift_are_reactivated_at_the_next_evaluation():
    # Feature a uses rows 0-49 in steps 0-8 and rows 50-99 in steps 9-17: its rows 50-99 are stale, then move
    # again. Feature b's rows all move all the time, so no input is dropped and the shifted rows get gradient.
    skipper = StaleEmbeddingSkipper(hot_rows=all_rows(), evaluate_every_n_steps=3, threshold=1e-7)
    record = RecordStale(skipper)
    fit(make_model(), make_batches(18, [range(0, 50), range(50, 100)], [range(0, 100)]), [skipper, record])
    second = set(range(50, 100))
    assert second <= record.stale[8]  # before the shift: untouched, stale
    assert not (second & record.stale[12])  # evaluation at step 12 saw them move over steps 9-11
    assert set(range(0, 50)) <= record.stale[15]  # and the first half, now unused, turned stale


def test_rows_the_generators_drift_brings_into_use_are_reactivated_at_the_next_evaluation():
    # The synthetic generator's own drift: at step 9 the popularity ranks of the 400-row table rotate by half,
    # so tail rows never looked up before (no gradient: stale at threshold 1e-7) become popular. The 7-row
    # table's rows all move all the time, so no input is all-stale and nothing is dropped.
    from lightning_skew.data.synthetic import SyntheticDataModule

    data = SyntheticDataModule(num_embeddings_per_feature=[7, 400], num_dense=3, popularity_exponent=1.3,
                               num_train_samples=256 * 18, num_val_samples=256, num_test_samples=256,
                               batch_size=256, seed=1, drift_every_samples=256 * 9, drift_fraction=0.5)
    data.setup("fit")
    batches = list(data.train_dataloader())
    names = data.sparse_feature_names
    used = [torch.zeros(400, dtype=torch.long), torch.zeros(400, dtype=torch.long)]
    for step, batch in enumerate(batches):
        values = batch.sparse_features.to_dict()[names[1]].values()
        used[step >= 9] += torch.bincount(values, minlength=400)
    revived = set(torch.nonzero((used[0] == 0) & (used[1] >= 20)).flatten().tolist())
    assert len(revived) >= 5  # the drift really brings unused rows into use
    torch.manual_seed(0)
    model = SizedDLRM(data.num_embeddings_per_feature, names, 3, embedding_dim=4, dense_arch_layer_sizes=[8, 4],
                      over_arch_layer_sizes=[8, 1], embedding_optimizer="sgd", embedding_lr=0.1)
    hot = RowSet(names, [7, 400], [torch.arange(7), torch.arange(400)])
    skipper = StaleEmbeddingSkipper(hot_rows=hot, evaluate_every_n_steps=3, threshold=1e-7)
    stale: list[set[int]] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            rows = skipper.stale.rows[1].tolist() if skipper.stale is not None else []
            stale.append(set(rows))

    fit(model, batches, [skipper, Record()])
    assert revived <= stale[9]  # before the drift: never looked up, stale
    assert not (revived & stale[12])  # the evaluation at step 12 saw them move over steps 9-11
    assert model.seen_sizes == [256] * 18  # nothing was dropped


def test_resume_from_a_checkpoint_continues_as_the_uninterrupted_run(tmp_path):
    batches = make_batches(7, [range(0, 60)])
    args = dict(evaluate_every_n_steps=3, target_drop_fraction=0.3, tolerance=0.05, sample_batches=3)
    straight, straight_model = StaleEmbeddingSkipper(**args), make_model()
    fit(straight_model, batches, [straight], epochs=2)

    first = StaleEmbeddingSkipper(**args)
    trainer = fit(make_model(), batches, [first], epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, resumed_model = StaleEmbeddingSkipper(**args), make_model()
    fit(resumed_model, batches, [resumed], epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))

    assert resumed.threshold == straight.threshold and resumed.evaluations == straight.evaluations
    assert [r.tolist() for r in resumed.stale.rows] == [r.tolist() for r in straight.stale.rows]
    assert (resumed.inputs_seen, resumed.inputs_dropped) == (straight.inputs_seen, straight.inputs_dropped)
    assert resumed_model.seen_sizes == straight_model.seen_sizes[7:]
    for key, value in straight_model.state_dict().items():
        assert torch.allclose(resumed_model.state_dict()[key], value, atol=1e-6), key


class RecordEvaluations(pl.Callback):
    """After the skipper: the steps at which it evaluated."""

    def __init__(self, skipper: StaleEmbeddingSkipper) -> None:
        self.skipper, self.steps = skipper, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.skipper.last_evaluation_step == trainer.global_step:
            self.steps.append(trainer.global_step)


def test_evaluations_space_out_while_nothing_can_be_skipped_and_resume_on_the_same_schedule(tmp_path):
    # Candidates only among feature a's rows: no input has all its lookups on candidates, so no threshold could
    # drop anything (the uniform-ID case) and each evaluation doubles the wait, up to max_idle_windows windows.
    idle = RowSet(FEATURES, [ROWS, ROWS], [torch.arange(10), torch.zeros(0, dtype=torch.long)])
    batches = make_batches(24, [range(0, ROWS)], batch=64)
    args = dict(hot_rows=idle, evaluate_every_n_steps=2, max_idle_windows=4)
    straight = StaleEmbeddingSkipper(**args)
    record = RecordEvaluations(straight)
    fit(make_model(), batches, [straight, record], epochs=2)
    assert record.steps == [0, 2, 6, 14, 22, 30, 38, 46]  # windows 2, 4, 8, then 8 (= 4 windows) at most
    assert straight.inputs_dropped == 0

    first = StaleEmbeddingSkipper(**args)
    trainer = fit(make_model(), batches, [first], epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = StaleEmbeddingSkipper(**args)
    record_resumed = RecordEvaluations(resumed)
    fit(make_model(), batches, [resumed, record_resumed], epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert record_resumed.steps == [s for s in record.steps if s >= 24]

    # Candidates that cover the inputs: the window stays as configured.
    busy = StaleEmbeddingSkipper(hot_rows=all_rows(), evaluate_every_n_steps=2, max_idle_windows=4)
    record_busy = RecordEvaluations(busy)
    fit(make_model(), batches[:12], [busy, record_busy])
    assert record_busy.steps == list(range(0, 12, 2))


def test_accuracy_guard_is_on_by_default_and_backs_off_when_the_metric_falls_more_than_the_margin():
    skipper = StaleEmbeddingSkipper()  # the default: guard on val_auc, margin 0.002, target 0.3
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match="guard_metric 'val_auc' is not among the logged metrics") as caught:
        skipper.on_validation_end(trainer, None)
        skipper.on_validation_end(trainer, None)
    assert len([w for w in caught if "guard_metric" in str(w.message)]) == 1  # warned once, not per validation
    for auc, target in ((0.80, 0.3), (0.799, 0.3), (0.81, 0.3), (0.805, 0.15), (0.80, 0.075), (0.70, 0.0375),
                        (0.70, 0.01875), (0.70, 0.0)):
        trainer.callback_metrics["val_auc"] = torch.tensor(auc)
        skipper.on_validation_end(trainer, None)
        assert skipper.target == pytest.approx(target), auc
    assert skipper.guard.backoffs == 5 and skipper.guard.best == pytest.approx(0.81)


def test_state_key_tells_instances_with_other_arguments_apart():
    assert StaleEmbeddingSkipper(target_drop_fraction=0.1).state_key != StaleEmbeddingSkipper().state_key


def test_bad_arguments_fail_early_with_the_value_found():
    with pytest.raises(ValueError, match="target_drop_fraction"):
        StaleEmbeddingSkipper(target_drop_fraction=1.5)
    with pytest.raises(ValueError, match="min_stale_lookups"):
        StaleEmbeddingSkipper(min_stale_lookups=0)
    with pytest.raises(ValueError, match="repack_min_fill.*1.5"):
        StaleEmbeddingSkipper(repack=True, repack_min_fill=1.5)
    with pytest.raises(ValueError, match="max_idle_windows.*0"):
        StaleEmbeddingSkipper(max_idle_windows=0)


# ----------------------------------------------------------------------------------------------------------
# Dropping in the data pipeline (repack=True)
# ----------------------------------------------------------------------------------------------------------


def numbered_batches(count: int, size: int) -> list[Batch]:
    """Batches whose input ``n`` (counted over all batches) has label ``n``, dense ``[n]`` and ID ``n % 7``."""
    batches = []
    for first in range(0, count * size, size):
        n = list(range(first, first + size))
        batches.append(Batch(torch.tensor(n, dtype=torch.float32)[:, None],
                             kjt({"a": [[i % 7] for i in n], "b": [[i % 7, 1] if i % 2 else [] for i in n]}),
                             torch.tensor(n, dtype=torch.float32)))
    return batches


def test_repack_packs_the_kept_inputs_in_order_into_full_batches():
    batches = numbered_batches(6, 8)

    def keep_not_multiple_of_3(batch: Batch) -> torch.Tensor:
        kept = torch.nonzero(batch.labels.long() % 3 != 0).flatten()
        return kept if kept.numel() else torch.tensor([0])

    out = list(repack_batches(batches, keep_not_multiple_of_3))
    sizes = [int(b.labels.numel()) for b, _ in out]
    assert sizes == [8, 8, 8, 8] and sum(read for _, read in out) == 48  # 32 kept of 48, all read counted
    labels = torch.cat([b.labels for b, _ in out]).long().tolist()
    assert labels == [n for n in range(48) if n % 3]
    for batch, _ in out:  # every input's features travelled with it
        n = batch.labels.long()
        assert torch.equal(batch.dense_features[:, 0].long(), n)
        features = batch.sparse_features.to_dict()
        assert features["a"].values().tolist() == (n % 7).tolist()
        assert features["b"].lengths().tolist() == [2 if i % 2 else 0 for i in n.tolist()]
    untouched = list(repack_batches(batches, lambda batch: None))
    assert [int(b.labels.numel()) for b, _ in untouched] == [8] * 6
    assert all(torch.equal(b.labels, a.labels) for (b, _), a in zip(untouched, batches, strict=True))
    ragged = list(repack_batches(batches, lambda batch: torch.arange(3)))  # 18 kept: 8, 8 and the last 2
    assert [int(b.labels.numel()) for b, _ in ragged] == [8, 8, 2]
    with pytest.raises(ValueError, match="at least one"):
        list(repack_batches(batches, lambda batch: torch.zeros(0, dtype=torch.long)))


def test_repack_min_fill_lets_a_nearly_full_batch_go_on_without_joining_the_next():
    batches = numbered_batches(6, 8)

    def drop_input_3(batch: Batch) -> torch.Tensor | None:
        labels = batch.labels.long()
        return torch.nonzero(labels != 3).flatten() if bool((labels == 3).any()) else None

    full = list(repack_batches(batches, drop_input_3))  # min_fill 1.0: one drop shifts every later batch
    assert [int(b.labels.numel()) for b, _ in full] == [8, 8, 8, 8, 8, 7]
    relaxed = list(repack_batches(batches, drop_input_3, min_fill=0.875))  # 7 of 8 is enough
    assert [int(b.labels.numel()) for b, _ in relaxed] == [7, 8, 8, 8, 8, 8]
    assert [read for _, read in relaxed] == [8] * 6
    assert all(b.labels is a.labels for (b, _), a in zip(relaxed[1:], batches[1:], strict=True))  # not copied
    assert torch.cat([b.labels for b, _ in relaxed]).long().tolist() == [n for n in range(48) if n != 3]
    half = list(repack_batches(batches, lambda batch: torch.arange(4), min_fill=0.75))  # 4 kept per batch
    assert [int(b.labels.numel()) for b, _ in half] == [8, 8, 8]
    with pytest.raises(ValueError, match="min_fill"):
        list(repack_batches(batches, drop_input_3, min_fill=0.0))


def test_repack_trains_fewer_full_batches_and_restores_the_loader_afterwards():
    model = make_model()
    skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=2, target_drop_fraction=0.5, tolerance=0.05,
                                    sample_batches=2, repack=True)
    trainer = fit(model, make_batches(12, [range(0, 60)]), [skipper])
    assert 0 < skipper.inputs_dropped and len(model.seen_sizes) < 12  # fewer steps than batches read
    # Every batch but the last holds at least repack_min_fill (default 0.9) of the batch size.
    assert all(231 <= size <= 256 for size in model.seen_sizes[:-1]) and 1 <= model.seen_sizes[-1] <= 256
    assert sum(model.seen_sizes) == skipper.inputs_seen - skipper.inputs_dropped == 12 * 256 - skipper.inputs_dropped
    assert skipper.pulled_per_batch and sum(skipper.pulled_per_batch) == 12 * 256
    assert "dataloader" not in vars(trainer.fit_loop._data_source)  # the wrapper is gone after fit


def test_repack_resumes_from_an_epoch_end_checkpoint_as_the_uninterrupted_run(tmp_path):
    batches = make_batches(7, [range(0, 60)])
    args = dict(evaluate_every_n_steps=2, target_drop_fraction=0.4, tolerance=0.05, sample_batches=3, repack=True)
    straight, straight_model = StaleEmbeddingSkipper(**args), make_model()
    fit(straight_model, batches, [straight], epochs=2)
    first, first_model = StaleEmbeddingSkipper(**args), make_model()
    trainer = fit(first_model, batches, [first], epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, resumed_model = StaleEmbeddingSkipper(**args), make_model()
    fit(resumed_model, batches, [resumed], epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))

    assert straight.inputs_dropped > first.inputs_dropped > 0
    assert (resumed.inputs_seen, resumed.inputs_dropped) == (straight.inputs_seen, straight.inputs_dropped)
    assert first_model.seen_sizes + resumed_model.seen_sizes == straight_model.seen_sizes
    for key, value in straight_model.state_dict().items():
        assert torch.allclose(resumed_model.state_dict()[key], value, atol=1e-6), key


# ----------------------------------------------------------------------------------------------------------
# Two gloo processes under TorchRecStrategy
# ----------------------------------------------------------------------------------------------------------


def test_two_ranks_mark_the_same_rows_stale_with_the_same_threshold_weighting_and_freezing(tmp_path):
    # With the quality-keeping options on: one droppable input in 2 kept at weight 2, the stale lookups of the
    # others served without gradient (a second, frozen lookup through the sharded model on both ranks).
    launch(Path(__file__).with_name("stale_worker.py"), 2, ["--out", str(tmp_path), "--keep-one-in", "2",
                                                            "--freeze"], timeout=120)
    ranks = [json.loads((tmp_path / f"stale_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["evaluations"] == ranks[1]["evaluations"] and ranks[0]["evaluations"]
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert any(d["stale_rows"] > 0 for d in ranks[0]["decisions"])
    assert all(min(r["seen_sizes"]) < max(r["seen_sizes"]) for r in ranks)  # sharded model trained on fewer
    assert all(r["weighted"] > 0 and r["frozen"] > 0 for r in ranks)  # each rank weighted and froze its own


def test_two_ranks_repacking_step_in_lockstep_with_the_same_stale_rows(tmp_path):
    launch(Path(__file__).with_name("stale_worker.py"), 2, ["--out", str(tmp_path), "--repack"], timeout=120)
    ranks = [json.loads((tmp_path / f"stale_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["decisions"] == ranks[1]["decisions"] and ranks[0]["evaluations"]
    steps = len(ranks[0]["seen_sizes"])
    assert steps == len(ranks[1]["seen_sizes"]) < 12  # the same, fewer steps than the 12 batches read
    for r in ranks:
        assert all(1 <= size <= 128 for size in r["seen_sizes"]) and r["dropped"] > 0
        assert sum(r["seen_sizes"]) == 12 * 128 - r["dropped"]  # every kept input trained once, none twice


def test_two_ranks_resume_from_a_checkpoint_as_the_uninterrupted_run(tmp_path):
    worker = Path(__file__).with_name("stale_worker.py")
    launch(worker, 2, ["--out", str(tmp_path / "straight"), "--epochs", "2"], timeout=180)
    launch(worker, 2, ["--out", str(tmp_path / "first"), "--epochs", "1", "--checkpoint"], timeout=180)
    checkpoint = tmp_path / "first" / "epoch1"
    launch(worker, 2, ["--out", str(tmp_path / "resumed"), "--epochs", "2", "--resume", str(checkpoint)],
           timeout=180)
    for rank in range(2):
        straight = json.loads((tmp_path / "straight" / f"stale_rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / "resumed" / f"stale_rank{rank}.json").read_text())
        steps = len(resumed["decisions"])
        assert steps == len(straight["decisions"]) // 2
        assert resumed["decisions"] == straight["decisions"][steps:]
        assert resumed["evaluations"] == straight["evaluations"]
        assert resumed["seen_sizes"] == straight["seen_sizes"][steps:]
        assert any(d["stale_rows"] > 0 for d in resumed["decisions"])
        torch.testing.assert_close(resumed["losses"], straight["losses"][steps:], atol=1e-6, rtol=0)


def test_the_guard_keeps_the_best_and_backs_off_only_past_the_margin():
    from lightning_skew.stale.guard import backed_off, guard_verdict

    assert guard_verdict(None, 0.70, "max", 0.002) == (0.70, False)  # first value: the best
    assert guard_verdict(0.70, 0.699, "max", 0.002) == (0.70, False)  # within the margin
    assert guard_verdict(0.70, 0.69, "max", 0.002) == (0.70, True)  # fell by more than the margin
    assert guard_verdict(0.50, 0.52, "min", 0.01) == (0.50, True)  # log-loss rose
    assert guard_verdict(0.50, 0.40, "min", 0.01) == (0.40, False)  # a new best log-loss
    assert backed_off(0.3, 0.5) == 0.15 and backed_off(0.015, 0.5) == 0.0  # below 1%: paused


def test_the_tracker_sees_which_watched_rows_moved_since_the_snapshot():
    from lightning_skew.core.tables import watched_tables
    from lightning_skew.stale.tracker import row_changes, snapshot_rows, stale_rows

    model = make_model()
    tables = watched_tables(model)
    candidates = [torch.arange(t.num_rows) for t in tables]
    snapshots = snapshot_rows(tables, candidates)
    with torch.no_grad():
        weight = dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if tables[0].name in n)]
        weight[3] += 0.5  # one row of the first table moves
    changes = row_changes(tables, candidates, snapshots)
    assert float(changes[0][3]) == pytest.approx(0.5) and float(changes[0].sum()) == pytest.approx(0.5)
    assert all(float(c.abs().sum()) == 0 for c in changes[1:])
    stale = stale_rows(tables, candidates, changes, threshold=0.1)
    assert 3 not in stale.rows[0].tolist() and len(stale) == sum(t.num_rows for t in tables) - 1
