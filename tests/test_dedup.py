"""Deduplicated features (RecD): session-shaped synthetic data, the dedup math, exact training with and without."""

from __future__ import annotations

import itertools
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from dedup_worker import GLOBAL_BATCH, make_data
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew import (
    DedupDataModule,
    PopularityDataModule,
    Sessions,
    StaleEmbeddingSkipper,
    SyntheticDataModule,
    TorchRecStrategy,
)
from lightning_skew.core.batch import Batch, concat_batches, select_inputs
from lightning_skew.core.decisions import SkewBatch
from lightning_skew.data.synthetic.sessions import SESSION_BLOCK_SAMPLES
from lightning_skew.dedup import dedup_batch, dedup_factors, distinct_inputs
from lightning_skew.models.dlrm import DLRMModule

from _support.cli import ROOT, SMALL, start_command
from _support.columnar_files import MOVIELENS, MOVIELENS_MISSING
from _support.resume_fit import assert_resumes_mid_epoch, fit
from _support.small import make_model

USER = ["user_id", "history"]


def _lists(jt) -> list[list[int]]:
    """A JaggedTensor's bags as lists of IDs (one host copy of its values, not one per bag)."""
    values, lengths = jt.values().tolist(), jt.lengths().tolist()
    assert len(values) == sum(lengths)
    starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    return [values[start:start + length] for start, length in zip(starts, lengths, strict=True)]


def _expanded(batch: SkewBatch) -> dict[str, list[list[int]]]:
    """Every feature's bags per input, the deduplicated ones read through the inverse indices."""
    plain = batch.sparse_features.to_dict()
    out = {key: _lists(jt) for key, jt in plain.items()}
    if batch.deduped is not None:
        bags = batch.deduped.bags.to_dict()
        for key in batch.deduped.features:
            distinct = _lists(bags[key])
            out[key] = [distinct[u] for u in batch.deduped.inverse.tolist()]
    return out


def _bags(batch: Batch, keys: list[str] | None = None) -> dict[str, list[list[int]]]:
    """The bags of ``keys`` (all features if ``None``) per input."""
    return {key: _lists(jt) for key, jt in batch.sparse_features.to_dict().items() if keys is None or key in keys}


def test_sessions_are_consecutive_runs_with_constant_user_features_of_the_stated_shapes():
    data = SyntheticDataModule(max_rows_per_table=5000, num_train_samples=8192, batch_size=8192,
                               sessions=Sessions())
    data.setup("fit")
    assert data.sparse_feature_names[-2:] == USER and data.num_embeddings_per_feature[-2:] == [5000, 5000]
    samples = data.log.generate("train", 0, 8192)
    session = samples.sessions.session
    starts = torch.ones_like(session, dtype=torch.bool)
    starts[1:] = session[1:] != session[:-1]
    assert bool((session[1:] >= session[:-1]).all())  # a session's samples are consecutive
    num_sessions = int(starts.sum())
    assert 8.5 < 8192 / num_sessions < 11.5  # mean_samples=10
    lengths = samples.sessions.history_lengths
    assert int(lengths.max()) == 50 and 30 < float(lengths.float().mean()) < 40  # cut at 50, mean ~35
    batch = next(iter(data.train_dataloader()))
    bags = _bags(batch, USER)
    first = torch.cumsum(starts.long(), 0) - 1
    owner = torch.nonzero(starts).flatten()[first]
    for key in USER:  # constant within a session
        assert all(bags[key][i] == bags[key][int(owner[i])] for i in range(0, 8192, 7))
    # The teacher uses them: the best attainable AUC is above that of the same log without them.
    plain = SyntheticDataModule(max_rows_per_table=5000, num_val_samples=8192)
    with_users = SyntheticDataModule(max_rows_per_table=5000, num_val_samples=8192,
                                     sessions=Sessions(logit_share=0.5))
    assert with_users.best_attainable_auc("val") > plain.best_attainable_auc("val") + 0.005


def test_a_session_stream_is_seekable_across_blocks_and_the_option_off_adds_nothing():
    data = SyntheticDataModule(max_rows_per_table=1000, sessions=Sessions(mean_samples=4.0, max_history=5))
    lo, hi = SESSION_BLOCK_SAMPLES - 300, SESSION_BLOCK_SAMPLES + 200
    whole = data.log.generate("val", lo - 1000, hi)
    part = data.log.generate("val", lo, hi)
    assert torch.equal(part.labels, whole.labels[1000:])
    assert torch.equal(part.sessions.user, whole.sessions.user[1000:])
    assert torch.equal(part.sessions.history_values, whole.sessions.history_values[
        int(whole.sessions.history_lengths[:1000].sum()):])
    off = SyntheticDataModule(max_rows_per_table=1000)
    assert off.sparse_feature_names == data.sparse_feature_names[:-2] and off.log.sessions is None


def _session_batch(size: int = 512) -> Batch:
    data = SyntheticDataModule(max_rows_per_table=2000, num_train_samples=size, batch_size=size,
                               sessions=Sessions(mean_samples=5.0, max_history=8, mean_history=6.0))
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_dedup_batch_sends_each_session_once_and_expands_to_the_same_bags():
    batch = _session_batch()
    deduped = dedup_batch(batch, USER)
    lookups = deduped.deduped
    assert 512 / 7 < lookups.num_distinct < 512 / 3  # one bag per session
    assert _expanded(deduped) == _bags(batch)
    assert all(not any(bags) for key in USER for bags in _bags(deduped)[key])  # empty in sparse_features
    factors = dedup_factors(batch.sparse_features, [*USER, "cat_0"])
    assert lookups.num_distinct / 512 - 0.02 < factors["history"] <= lookups.num_distinct / 512
    assert factors["user_id"] <= lookups.num_distinct / 512 and factors["cat_0"] > 0.3
    assert dedup_factors(batch.sparse_features, ["history"], consecutive=False)["history"] <= factors["history"]
    # Selected or joined, deduplicated batches keep serving the right bags.
    index = torch.tensor([5, 3, 400, 3, 511])
    assert _expanded(select_inputs(deduped, index)) == _bags(select_inputs(batch, index))
    halves = [select_inputs(batch, torch.arange(0, 200)), select_inputs(batch, torch.arange(200, 512))]
    joined = concat_batches([dedup_batch(half, USER) for half in halves])
    assert _expanded(joined) == _bags(batch)
    moved = deduped.pin_memory() if torch.cuda.is_available() else deduped.to("cpu")
    assert _expanded(moved) == _bags(batch)


def test_distinct_inputs_is_exact_by_id_and_finds_repeats_anywhere_in_the_batch_when_asked():
    # Inputs 0, 1 and 3 share the bag [7, 9]; input 2's [9, 7] holds the same IDs in another order.
    kjt = KeyedJaggedTensor(keys=["h"], values=torch.tensor([7, 9, 7, 9, 9, 7, 7, 9, 4]),
                            lengths=torch.tensor([2, 2, 2, 2, 1]))
    first, inverse = distinct_inputs(kjt, ["h"])
    assert first.tolist() == [0, 2, 3, 4] and inverse.tolist() == [0, 0, 1, 2, 3]
    first, inverse = distinct_inputs(kjt, ["h"], consecutive=False)
    assert first.tolist() == [0, 2, 4] and inverse.tolist() == [0, 0, 1, 0, 2]
    with pytest.raises(ValueError, match="not found: \\['nope'\\]"):
        distinct_inputs(kjt, ["nope"])


def test_dedup_keeps_per_id_weights_with_their_ids_in_every_form():
    # Weighted bags (a user's history weighted by recency, say) between, before and after other keys: the
    # weights travel with their IDs through the deduplicated, the rest and the one-lookup form.
    kjt = KeyedJaggedTensor(
        keys=["a", "h", "b", "u"],
        values=torch.tensor([1, 2, 3, 4, 7, 9, 7, 9, 7, 5, 5, 6, 6, 8, 8, 8, 3]),
        lengths=torch.tensor([1, 1, 1, 1, 2, 2, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1]),
        weights=torch.arange(17, dtype=torch.float) / 16)
    batch = Batch(torch.zeros(4, 1), kjt, torch.zeros(4))
    deduped = dedup_batch(batch, ["h", "u"])
    lookups = deduped.deduped
    assert lookups.inverse.tolist() == [0, 0, 1, 2]
    bags = lookups.bags.to_dict()
    assert [b.tolist() for b in bags["h"].to_dense()] == [[7, 9], [7], []]
    assert [b.tolist() for b in bags["h"].to_dense_weights()] == [[0.25, 0.3125], [0.5], []]
    assert [b.tolist() for b in bags["u"].to_dense_weights()] == [[0.8125], [0.9375], [1.0]]
    rest = deduped.sparse_features.to_dict()
    assert rest["b"].values().tolist() == [5, 5, 6, 6] and rest["h"].values().numel() == 0
    assert rest["b"].weights().tolist() == [0.5625, 0.625, 0.6875, 0.75]
    merged = lookups.merged.to_dict()
    assert [b.tolist() for b in merged["h"].to_dense()] == [[7, 9], [7], [], []]
    assert merged["a"].weights().tolist() == kjt.to_dict()["a"].weights().tolist()
    assert [b.tolist() for b in merged["u"].to_dense_weights()] == [[0.8125], [0.9375], [1.0], []]


def test_dedup_trains_exactly_as_without_under_torchrec_strategy_and_resumes(tmp_path):
    plain_losses, plain_weights = fit(lambda: make_data(GLOBAL_BATCH), tmp_path / "plain", epochs=1)
    dedup_losses, dedup_weights = fit(lambda: DedupDataModule(make_data(GLOBAL_BATCH), USER), tmp_path / "dedup",
                                      epochs=1)
    assert len(dedup_losses) == len(plain_losses) == 6
    assert dedup_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    assert sorted(dedup_weights) == sorted(plain_weights)
    for key, value in plain_weights.items():
        assert torch.allclose(dedup_weights[key], value, rtol=1e-4, atol=1e-5), key
    trained = plain_weights["model.sparse_arch.embedding_bag_collection.embedding_bags.t_history.weight"]
    assert not torch.allclose(trained, fit(lambda: make_data(GLOBAL_BATCH), tmp_path / "none", max_steps=1,
                                           epochs=1)[1][
        "model.sparse_arch.embedding_bag_collection.embedding_bags.t_history.weight"])
    assert_resumes_mid_epoch(lambda: DedupDataModule(make_data(GLOBAL_BATCH, 4), USER), tmp_path / "resume", 4, 2)


@pytest.mark.parametrize("data", ["synthetic", "movielens"])
def test_dedup_trains_exactly_as_without_on_two_ranks(tmp_path, two_ranks, data):
    extra = [] if data == "synthetic" else ["--movielens", str(_movielens_history(tmp_path))]
    two_ranks("dedup_worker.py", "--out", str(tmp_path), *extra, timeout=180)
    two_ranks("dedup_worker.py", "--out", str(tmp_path), "--dedup", *extra, timeout=180)
    plain, dedup = torch.load(tmp_path / "plain_rank0.pt"), torch.load(tmp_path / "dedup_rank0.pt")
    assert all(dedup["deduped"]) and not any(plain["deduped"]) and len(plain["losses"]) == 6
    assert dedup["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=1e-6)
    for key, value in plain["weights"].items():
        assert torch.allclose(dedup["weights"][key], value, rtol=1e-4, atol=1e-5), key


class _NoDedupModel(DLRMModule):
    honoured_batch_decisions = frozenset({"weights"})


def _fit_refused(model, data, callbacks=(), strategy=None):
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy or TorchRecStrategy(), max_steps=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)


def test_compositions_that_cannot_serve_deduplicated_features_are_refused_naming_both():
    data = make_data(GLOBAL_BATCH)
    model = _NoDedupModel(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features)
    with pytest.raises(ValueError, match="DedupDataModule.*_NoDedupModel does not honour"):
        _fit_refused(model, DedupDataModule(data, USER))
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features)
    with pytest.raises(MisconfigurationException, match="DedupDataModule.*StaleEmbeddingSkipper\\(repack=False\\)"):
        _fit_refused(model, DedupDataModule(data, USER), [StaleEmbeddingSkipper()])
    with pytest.raises(MisconfigurationException, match="DedupDataModule.*is wrapped by PopularityDataModule"):
        _fit_refused(model, PopularityDataModule(DedupDataModule(data, USER), hot_rows_budget=20_000))
    with pytest.raises(ValueError, match="features \\['nope'\\] are not sparse features of SyntheticDataModule"):
        DedupDataModule(data, ["nope"])


def test_the_session_recipes_train_end_to_end_with_and_without_dedup(tmp_path):
    inner = [arg.replace("--data.init_args.", "--data.init_args.datamodule.init_args.") for arg in SMALL]
    sessions = start_command("fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic_sessions.yaml"), *SMALL,
                             cwd=tmp_path)  # the two commands run side by side, each in its own run folder
    dedup = start_command("fit", "--config", str(ROOT / "recipes" / "dlrm_synthetic_dedup.yaml"), *inner, cwd=tmp_path)
    run = sessions.result()
    assert "val: auc" in run.stdout and "best attainable auc" in run.stdout
    run = dedup.result()
    assert "val: auc" in run.stdout
    assert (tmp_path / "runs" / "dlrm_synthetic_dedup" / "config.yaml").is_file()


def test_batch_repeats_reports_each_features_distinct_bag_share_before_dedup_is_on():
    from lightning_skew.dedup.lookups import batch_repeats, format_repeats

    batch = _session_batch()
    repeats = batch_repeats([batch, batch, batch], max_batches=2)
    distinct = dedup_batch(batch, USER).deduped.num_distinct / 512
    assert repeats["history"]["consecutive"] == pytest.approx(distinct, abs=0.02)
    assert repeats["user_id"]["batch"] <= repeats["user_id"]["consecutive"] <= distinct
    assert repeats["cat_0"]["consecutive"] > 0.3
    table = format_repeats(repeats, 512, 2)
    assert "| user_id |" in table and "first 2 batches of 512 inputs" in table


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.distinct: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if getattr(batch, "deduped", None) is not None:
            self.distinct.append(batch.deduped.num_distinct / batch.labels.numel())


def _fit_losses(data, strategy) -> _Losses:
    record = _Losses()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_model(data, "rowwise_adagrad"), data)
    return record


def test_dedup_composes_with_hot_cold_placement_and_popularity_batching():
    from lightning_skew import HotColdStrategy

    plain = _fit_losses(make_data(GLOBAL_BATCH), HotColdStrategy(budget_bytes=20_000))
    deduped = _fit_losses(DedupDataModule(make_data(GLOBAL_BATCH), USER), HotColdStrategy(budget_bytes=20_000))
    assert deduped.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6) and len(plain.losses) == 6
    # Popularity batching regroups the inputs of a window by their rows: sessions are split across batches.
    regrouped = _fit_losses(DedupDataModule(PopularityDataModule(make_data(GLOBAL_BATCH), hot_rows_budget=300),
                                            USER), TorchRecStrategy())
    in_order = sum(deduped.distinct) / len(deduped.distinct)
    assert regrouped.losses and in_order < 0.25 < sum(regrouped.distinct) / len(regrouped.distinct)


def test_histories_hold_the_users_earlier_items_only_most_recent_last():
    import numpy as np

    from lightning_skew.dedup.history import histories

    users = np.array([1, 1, 2, 1, 1, 2])
    items = np.array([10, 11, 20, 12, 13, 21])
    times = np.array([5.0, 6.0, 1.0, 6.0, 9.0, 2.0])
    assert histories(users, items, times, length=2) == [[], [10], [], [10], [11, 12], [20]]


def _movielens_history(tmp_path: Path) -> Path:
    import shutil

    from lightning_skew.dedup.history import write_with_history

    if not (MOVIELENS / "ml-100k.inter").is_file():
        pytest.skip(MOVIELENS_MISSING)
    root = tmp_path / "ml-100k"
    root.mkdir()
    shutil.copy(MOVIELENS / "ml-100k.item", root / "ml-100k.item")
    assert write_with_history(MOVIELENS / "ml-100k.inter", root / "ml-100k-history.inter") == 100_000
    return root


def test_movielens_with_history_trains_from_its_recipe_and_exactly_the_same_with_dedup(tmp_path):
    from lightning_skew.profile.command import build_datamodule

    root = _movielens_history(tmp_path)
    recipe = ROOT / "recipes" / "dlrm_movielens_history.yaml"
    command = start_command("fit", "--config", str(recipe), "--data.init_args.root", str(root),
                            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", cwd=tmp_path)

    def data(dedup: bool):
        module = build_datamodule(["--config", str(recipe), "--data.init_args.root", str(root)])[0]
        return DedupDataModule(module, USER) if dedup else module

    plain_losses, plain_weights = fit(lambda: data(False), tmp_path / "plain", max_steps=8, epochs=1)
    dedup_losses, dedup_weights = fit(lambda: data(True), tmp_path / "dedup", max_steps=8, epochs=1)
    assert dedup_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6) and len(plain_losses) == 8
    for key, value in plain_weights.items():
        assert torch.allclose(dedup_weights[key], value, rtol=1e-4, atol=1e-5), key
    run = command.result()  # the recipe's fit ran beside the two in this process
    assert float(re.search(r"val: auc ([0-9.]+)", run.stdout).group(1)) > 0.66


def test_dedup_around_repacking_trains_the_stale_skippers_full_batches():
    from lightning_skew import RepackedDataModule

    skipper = StaleEmbeddingSkipper(repack=True, evaluate_every_n_steps=2, target_drop_fraction=0.3,
                                    sample_batches=2)
    data = DedupDataModule(RepackedDataModule(make_data(GLOBAL_BATCH, 8)), USER)
    record = _Losses()
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[skipper, record])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    assert skipper.inputs_seen == GLOBAL_BATCH * 8 and len(record.distinct) == len(record.losses) >= 6
    assert all(share < 0.4 for share in record.distinct)


def test_the_one_lookup_and_the_two_lookup_forms_give_the_plain_loss_and_gradients():
    import copy
    import dataclasses

    batch = _session_batch()
    one = dedup_batch(batch, USER)
    assert one.deduped.merged is not None and select_inputs(one, torch.arange(10)).deduped.merged is None
    two = dataclasses.replace(one, deduped=dataclasses.replace(one.deduped, merged=None))
    data = SyntheticDataModule(max_rows_per_table=2000, sessions=Sessions(mean_samples=5.0, max_history=8))
    torch.manual_seed(0)
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       embedding_optimizer="sgd")
    models = [copy.deepcopy(model) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [m.training_step(b, 0) for m, b in zip(models, [batch, one, two], strict=True)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6) == losses[2].item()
    for name, parameter in models[0].named_parameters():
        for other in models[1:]:
            assert torch.allclose(dict(other.named_parameters())[name].grad, parameter.grad, atol=1e-6), name


def test_out_of_range_ids_in_deduplicated_features_are_caught_or_clamped_in_both_forms():
    wide = SyntheticDataModule(num_embeddings_per_feature=[50], num_train_samples=256, batch_size=256,
                               sessions=Sessions(mean_samples=5.0, max_history=8, num_users=1000, num_items=1000))
    wide.setup("fit")
    batch = dedup_batch(next(iter(wide.train_dataloader())), USER)
    narrow = DedupDataModule(SyntheticDataModule(num_embeddings_per_feature=[50],
                                                 sessions=Sessions(num_users=5, num_items=5)), USER)
    with pytest.raises(ValueError, match="user_id|history"):
        narrow.check_ids(batch)
    narrow.out_of_range_ids = "clamp"
    clamped = narrow.check_ids(batch)
    for form in (clamped.deduped.bags, clamped.deduped.merged):
        assert all(int(form.to_dict()[key].values().max()) < 5 for key in USER)


def test_dedup_runs_in_the_dataloader_workers_collate_step():
    from lightning_skew.dedup import DedupingCollate

    data = DedupDataModule(SyntheticDataModule(max_rows_per_table=1000, num_train_samples=2048, batch_size=512,
                                               num_workers=1, sessions=Sessions()), USER)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.collate_fn, DedupingCollate)
    batches = list(loader)
    assert len(batches) == 4 and all(b.deduped is not None and b.deduped.merged is not None for b in batches)
