"""Tests of the synthetic click-log generator: popularity, determinism, teacher, drift, batches."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch

from lightning_skew.data import synthetic
from lightning_skew.data.features import CRITEO_KAGGLE_CARDINALITIES, CRITEO_SPARSE_NAMES
from lightning_skew.data.synthetic import (
    HEAD_ROWS,
    SyntheticDataModule,
    calibrate_bias,
    drift_ranks,
    expected_top_share,
    hashed_gaussian,
    power_law_cdf,
    rank_to_row,
    sample_power_law_ranks,
    scatter_multiplier,
)


def small_module(**overrides: object) -> SyntheticDataModule:
    args: dict = dict(
        num_embeddings_per_feature=[1000, 50, 3, 20_000],
        num_dense=4,
        num_train_samples=4096,
        num_val_samples=2048,
        num_test_samples=2048,
        batch_size=256,
        seed=7,
    )
    args.update(overrides)
    return SyntheticDataModule(**args)


def assert_same_batch(left: Batch, right: Batch) -> None:
    torch.testing.assert_close(left.dense_features, right.dense_features, rtol=0, atol=0)
    torch.testing.assert_close(left.labels, right.labels, rtol=0, atol=0)
    assert left.sparse_features.keys() == right.sparse_features.keys()
    assert torch.equal(left.sparse_features.values(), right.sparse_features.values())
    assert torch.equal(left.sparse_features.lengths(), right.sparse_features.lengths())


def concat_batches(batches: list[Batch]) -> Batch:
    """Stack the per-rank batches of one global batch into one (KJT key by key)."""
    keys = batches[0].sparse_features.keys()
    per_key = [b.sparse_features.to_dict() for b in batches]
    values = torch.cat([torch.cat([d[k].values() for d in per_key]) for k in keys])
    lengths = torch.cat([torch.cat([d[k].lengths() for d in per_key]) for k in keys])
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return Batch(
        dense_features=torch.cat([b.dense_features for b in batches]),
        sparse_features=KeyedJaggedTensor(keys=keys, values=values, lengths=lengths),
        labels=torch.cat([b.labels for b in batches]),
    )


# ---------------------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.0, 0.7, 1.0, 1.3])
def test_head_probabilities_are_exact_power_law(exponent: float) -> None:
    num_rows = 50_000
    cdf = power_law_cdf(torch.arange(HEAD_ROWS + 1), num_rows, exponent)
    pmf = cdf[1:] - cdf[:-1]
    ratio = pmf / pmf[0]
    expected = (torch.arange(HEAD_ROWS, dtype=torch.float64) + 1.0) ** -exponent
    torch.testing.assert_close(ratio, expected, rtol=1e-9, atol=0)
    # The tail continues the same law within the midpoint rule's error.
    tail = power_law_cdf(torch.tensor([999, 1000]), num_rows, exponent)
    assert (tail[1] - tail[0]) / pmf[0] == pytest.approx(1000.0**-exponent, rel=1e-5)
    assert float(power_law_cdf(torch.tensor([num_rows]), num_rows, exponent)[0]) == pytest.approx(1.0, abs=1e-12)


def test_expected_top_share_matches_brute_force_sum() -> None:
    num_rows = 100_000
    for exponent in (0.0, 0.8, 1.0, 1.05, 1.2):
        weights = (torch.arange(num_rows, dtype=torch.float64) + 1.0) ** -exponent
        brute = float(weights[:1000].sum() / weights.sum())
        assert expected_top_share(num_rows, exponent, 0.01) == pytest.approx(brute, rel=2e-4)
    # Small tables live entirely in the exact head.
    weights = (torch.arange(100, dtype=torch.float64) + 1.0) ** -1.05
    assert expected_top_share(100, 1.05, 0.05) == pytest.approx(float(weights[:5].sum() / weights.sum()), rel=1e-12)


@pytest.mark.parametrize("exponent", [0.0, 1.0, 1.5])
def test_sampled_ranks_follow_the_cdf(exponent: float) -> None:
    num_rows = 30_000
    generator = torch.Generator().manual_seed(0)
    ranks = sample_power_law_ranks(torch.rand(400_000, generator=generator, dtype=torch.float64), num_rows, exponent)
    assert 0 <= int(ranks.min()) and int(ranks.max()) < num_rows
    checkpoints = torch.tensor([1, 2, 10, 100, HEAD_ROWS, 1000, 10_000, 25_000])
    measured = (ranks[None, :] < checkpoints[:, None]).double().mean(dim=1)
    torch.testing.assert_close(measured, power_law_cdf(checkpoints, num_rows, exponent), rtol=0, atol=4e-3)


def test_sampler_reaches_every_row_of_a_uniform_table() -> None:
    # float64 uniforms: no row of a large uniform table is starved by rounding.
    ranks = sample_power_law_ranks(torch.rand(200_000, dtype=torch.float64), 1000, 0.0)
    counts = torch.bincount(ranks, minlength=1000)
    assert int(counts.min()) > 100 and int(counts.max()) < 300


def test_rank_to_row_is_a_scattering_bijection() -> None:
    for num_rows in (1, 2, 3, 24, 1000, 1024, 99_991):
        multiplier = scatter_multiplier(num_rows, 0.37)
        assert math.gcd(multiplier, num_rows) == 1
        rows = rank_to_row(torch.arange(num_rows), num_rows, multiplier, offset=num_rows // 3)
        assert torch.equal(rows.sort().values, torch.arange(num_rows))
    hot = rank_to_row(torch.arange(100), 100_000, scatter_multiplier(100_000, 0.37), 12345)
    assert not torch.equal(hot.sort().values, torch.arange(100))
    assert int(hot.max() - hot.min()) > 50_000


def test_drift_rotates_ranks() -> None:
    ranks = torch.arange(10)
    assert drift_ranks(ranks, 10, 0, 3).tolist() == list(range(10))
    assert drift_ranks(ranks, 10, 1, 3).tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert drift_ranks(ranks, 10, 2, 3).tolist() == [6, 7, 8, 9, 0, 1, 2, 3, 4, 5]


def test_hashed_gaussian_is_standard_normal_and_deterministic() -> None:
    rows = torch.arange(200_000)
    effects = hashed_gaussian(rows, 12345)
    assert abs(float(effects.mean())) < 0.01
    assert float(effects.std()) == pytest.approx(1.0, abs=0.01)
    assert torch.equal(effects, hashed_gaussian(rows, 12345))
    other = hashed_gaussian(rows, 999)
    assert abs(float(torch.corrcoef(torch.stack([effects, other]))[0, 1])) < 0.01


def test_calibrate_bias_hits_the_rate() -> None:
    logits = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 2.0 + 1.0
    bias = calibrate_bias(logits, 0.25)
    assert float(torch.sigmoid(logits + bias).mean()) == pytest.approx(0.25, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The generator through the DataModule
# ---------------------------------------------------------------------------------------------------------


def top_share_of_generated_ids(rows: torch.Tensor, num_rows: int, top_fraction: float = 0.01) -> float:
    counts = torch.bincount(rows, minlength=num_rows).sort(descending=True).values
    return float(counts[: max(1, int(top_fraction * num_rows))].sum() / rows.numel())


def test_generated_popularity_matches_the_configured_exponent() -> None:
    num_rows = 100_000
    exponents = [0.8, 1.2]
    dm = SyntheticDataModule(
        num_embeddings_per_feature=[num_rows, num_rows], popularity_exponent=exponents, num_dense=2, seed=3
    )
    rows = dm.log.generate("train", 0, 300_000).rows
    for feature, exponent in enumerate(exponents):
        expected = expected_top_share(num_rows, exponent, 0.01)
        assert top_share_of_generated_ids(rows[feature], num_rows) == pytest.approx(expected, abs=0.01)
    # The two exponents are told apart by far more than the tolerance.
    assert expected_top_share(num_rows, 1.2) - expected_top_share(num_rows, 0.8) > 0.3


def test_uniform_control_has_no_hot_rows() -> None:
    num_rows = 100_000
    dm = SyntheticDataModule(num_embeddings_per_feature=[num_rows], uniform=True, num_dense=2, seed=3)
    rows = dm.log.generate("train", 0, 200_000).rows
    # Share of the rows that a 1.05 power law would make hottest: 1% of lookups, as for any 1% of rows.
    hot_rows = dm.log.rows_of_ranks(torch.arange(num_rows // 100)[None, :])[0]
    assert float(torch.isin(rows[0], hot_rows).double().mean()) == pytest.approx(0.01, abs=0.002)
    assert expected_top_share(num_rows, 0.0) == pytest.approx(0.01)


def test_popular_rows_are_scattered() -> None:
    num_rows = 100_000
    dm = SyntheticDataModule(num_embeddings_per_feature=[num_rows], num_dense=2, seed=5)
    rows = dm.log.generate("train", 0, 100_000).rows[0]
    top = torch.bincount(rows, minlength=num_rows).sort(descending=True).indices[:20]
    assert int(top.max()) - int(top.min()) > num_rows // 2
    assert not torch.equal(top.sort().values, torch.arange(20))


def test_same_seed_same_batches_different_seed_different() -> None:
    first = next(iter(small_module().train_dataloader()))
    again = next(iter(small_module().train_dataloader()))
    other = next(iter(small_module(seed=8).train_dataloader()))
    assert_same_batch(first, again)
    assert not torch.equal(first.dense_features, other.dense_features)
    assert not torch.equal(first.sparse_features.values(), other.sparse_features.values())


def test_splits_are_different_streams() -> None:
    dm = small_module()
    train, val = dm.log.generate("train", 0, 256), dm.log.generate("val", 0, 256)
    assert not torch.equal(train.dense, val.dense)


def test_any_range_equals_the_same_samples_of_a_longer_range() -> None:
    dm = small_module()
    whole = dm.log.generate("train", 0, 3000)
    part = dm.log.generate("train", 1234, 2777)
    torch.testing.assert_close(part.dense, whole.dense[1234:2777], rtol=0, atol=0)
    assert torch.equal(part.rows, whole.rows[:, 1234:2777])
    assert torch.equal(part.labels, whole.labels[1234:2777])


def test_two_ranks_of_batch_b_equal_one_rank_of_batch_2b() -> None:
    batch = 96  # not a multiple of the stream chunk, so batches straddle chunks
    one = list(small_module(batch_size=2 * batch, num_train_samples=2000).stream("train"))
    two = small_module(batch_size=batch, num_train_samples=2000)
    rank0, rank1 = list(two.stream("train", 0, 2)), list(two.stream("train", 1, 2))
    assert len(one) == len(rank0) == len(rank1) == 2000 // (2 * batch)
    for global_batch, part0, part1 in zip(one, rank0, rank1, strict=True):
        assert_same_batch(concat_batches([part0, part1]), global_batch)


def test_workers_keep_the_batch_order() -> None:
    dm = small_module(num_train_samples=256 * 5)
    in_process = list(dm.train_dataloader())
    workers = list(DataLoader(dm.stream("train"), batch_size=None, num_workers=2))
    assert len(in_process) == len(workers) == 5
    for left, right in zip(in_process, workers, strict=True):
        assert_same_batch(left, right)


def test_epochs_replay_the_stream_and_drop_the_partial_global_batch() -> None:
    dm = small_module(num_train_samples=1000, batch_size=256)
    loader = dm.train_dataloader()
    epoch1, epoch2 = list(loader), list(loader)
    assert len(epoch1) == len(loader) == 3
    for left, right in zip(epoch1, epoch2, strict=True):
        assert_same_batch(left, right)


def test_setup_reads_rank_and_world_size_from_the_trainer() -> None:
    import lightning.pytorch as pl

    dm = small_module()
    dm.setup("fit")
    assert (dm.rank, dm.world_size) == (0, 1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    dm.trainer = trainer
    dm.setup("fit")
    assert (dm.rank, dm.world_size) == (trainer.global_rank, trainer.world_size) == (0, 1)


def test_labels_have_a_criteo_like_rate_and_a_learnable_teacher() -> None:
    dm = SyntheticDataModule(num_val_samples=50_000, seed=11)  # Kaggle tables, 10M-row ones included
    _, labels = dm.log.click_probabilities("val", 50_000)
    assert 0.2 < float(labels.mean()) < 0.3
    auc = dm.best_attainable_auc("val")
    assert 0.72 < auc < 0.9
    # A weaker teacher is less predictable: the AUC is the teacher's, not an artefact.
    weak = SyntheticDataModule(num_val_samples=50_000, seed=11, logit_std=0.3)
    assert weak.best_attainable_auc("val") < auc - 0.1


def test_drift_moves_the_hot_rows() -> None:
    num_rows = 10_000
    dm = SyntheticDataModule(
        num_embeddings_per_feature=[num_rows], num_dense=2, drift_every_samples=50_000, drift_fraction=0.05, seed=2
    )
    rows = dm.log.generate("train", 0, 100_000).rows[0]

    def hottest(part: torch.Tensor) -> set[int]:
        return set(torch.bincount(part, minlength=num_rows).sort(descending=True).indices[:50].tolist())

    before, after = rows[:50_000], rows[50_000:]
    assert len(hottest(before[:25_000]) & hottest(before[25_000:])) >= 40
    assert len(hottest(before) & hottest(after)) == 0
    # The shift is 5% of the table: the rows that were 500 ranks down are now the hottest.
    assert hottest(after) <= set(dm.log.rows_of_ranks(torch.arange(500, 1000)[None, :])[0].tolist())


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("num_embeddings_per_feature", [10, 0]),
        ("num_embeddings_per_feature", []),
        ("max_rows_per_table", 0),
        ("num_dense", -1),
        ("popularity_exponent", -0.5),
        ("popularity_exponent", [1.0, 1.0]),
        ("multi_hot", 0),
        ("multi_hot", [1, 2, 3]),
        ("num_train_samples", -5),
        ("num_val_samples", -1),
        ("num_test_samples", -1),
        ("batch_size", 0),
        ("num_workers", -1),
        ("drift_every_samples", 0),
        ("drift_fraction", 0.0),
        ("click_rate", 1.0),
        ("logit_std", -1.0),
    ],
)
def test_bad_arguments_raise_naming_the_argument(argument: str, value: object) -> None:
    with pytest.raises(ValueError, match=argument):
        small_module(**{argument: value})


@pytest.mark.parametrize("multi_hot", [1, [3, 1, 2, 4]])
def test_kjt_keys_lengths_and_ids_are_valid_for_every_table(multi_hot: int | list[int]) -> None:
    dm = small_module(multi_hot=multi_hot, batch_size=128)
    hots = multi_hot if isinstance(multi_hot, list) else [multi_hot] * 4
    batch = next(iter(dm.train_dataloader()))
    assert batch.dense_features.shape == (128, dm.dense_in_features)
    assert bool((batch.dense_features >= 0).all())
    assert batch.labels.shape == (128,) and set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    features = batch.sparse_features.to_dict()
    assert list(features) == dm.sparse_feature_names == CRITEO_SPARSE_NAMES[:4]
    for name, rows, hot in zip(dm.sparse_feature_names, dm.num_embeddings_per_feature, hots, strict=True):
        assert torch.equal(features[name].lengths(), torch.full((128,), hot, dtype=features[name].lengths().dtype))
        values = features[name].values()
        assert values.numel() == 128 * hot and 0 <= int(values.min()) and int(values.max()) < rows


def test_multi_hot_ids_of_one_input_are_consecutive_values() -> None:
    dm = small_module(multi_hot=[3, 1, 2, 4])
    samples = dm.log.generate("train", 0, 8)
    batch = dm.log.to_batch(samples, dm.sparse_feature_names)
    # Feature 0 owns ID columns 0..2: input 1's three IDs are values 3..5 of its jagged tensor.
    assert batch.sparse_features["cat_0"].values()[3:6].tolist() == samples.rows[0:3, 1].tolist()


def test_default_shape_is_criteo_kaggle_with_optional_cap() -> None:
    dm = SyntheticDataModule()
    assert dm.dense_in_features == 13
    assert dm.sparse_feature_names == CRITEO_SPARSE_NAMES
    assert dm.num_embeddings_per_feature == CRITEO_KAGGLE_CARDINALITIES
    capped = SyntheticDataModule(max_rows_per_table=1000)
    assert capped.num_embeddings_per_feature == [min(rows, 1000) for rows in CRITEO_KAGGLE_CARDINALITIES]
    rows = dm.log.generate("train", 0, 2048).rows
    assert bool((rows.max(dim=1).values < torch.tensor(CRITEO_KAGGLE_CARDINALITIES)).all())


def test_constructible_from_a_lightning_cli_style_config() -> None:
    from jsonargparse import ArgumentParser

    from lightning_skew.data.base import RecDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(RecDataModule, "data")
    config = parser.parse_object(
        {
            "data": {
                "class_path": "lightning_skew.data.synthetic.SyntheticDataModule",
                "init_args": {"max_rows_per_table": 500, "popularity_exponent": 0.9, "multi_hot": 2, "seed": 4},
            }
        }
    )
    dm = parser.instantiate(config).data
    assert isinstance(dm, SyntheticDataModule)
    assert max(dm.num_embeddings_per_feature) == 500 and dm.log.multi_hot == [2] * 26


def test_docstring_example_runs() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(synthetic.SyntheticDataModule, "SyntheticDataModule", globs=vars(synthetic)):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 4 and result.failed == 0
