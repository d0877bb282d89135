"""AccessProfile and ``lightning-skew profile``: counts, sketches, hot sets under budgets, files, the command."""

from __future__ import annotations

import json
import math
import random
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.data.base import Batch, RecDataModule
from lightning_skew.data.synthetic import SyntheticDataModule, expected_top_share
from lightning_skew.profile import (
    AccessProfile,
    add_row_counts,
    fit_power_law,
    global_hot_order,
    lookup_coverage,
    merge_heavy_hitters,
    profile_dataloader,
    row_bytes,
    sampled_mask,
    select_hot_rows,
    smallest_budget_for_coverage,
    top_share,
)
from lightning_skew.profile.command import main as profile_main
from lightning_skew.profile.command import parse_bytes

from _support.launch import launch


@pytest.fixture(autouse=True)
def one_thread():
    # Profiling is a stream of small tensor ops; on a shared 2-core machine a second intra-op thread makes
    # them wait on each other (10x slower under load), as the command's --threads help says.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kjt(columns: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    """A KJT from per-feature lists of per-input ID lists."""
    values = [v for ids in columns.values() for one in ids for v in one]
    lengths = [len(one) for ids in columns.values() for one in ids]
    return KeyedJaggedTensor.from_lengths_sync(keys=list(columns), values=torch.tensor(values, dtype=torch.int64),
                                               lengths=torch.tensor(lengths, dtype=torch.int32))


def small_datamodule(**kwargs) -> SyntheticDataModule:
    arguments = {"num_embeddings_per_feature": [300, 5000], "num_dense": 2, "num_train_samples": 8192,
                 "batch_size": 1024, "popularity_exponent": 1.05}
    datamodule = SyntheticDataModule(**{**arguments, **kwargs})
    datamodule.setup("fit")
    return datamodule


# ---------------------------------------------------------------- pure functions


def test_sampled_mask_is_deterministic_and_independent_of_batching():
    whole = sampled_mask(0, 100_000, 0.05, seed=3)
    pieces = torch.cat([sampled_mask(start, 1000, 0.05, seed=3) for start in range(0, 100_000, 1000)])
    assert torch.equal(whole, pieces)
    assert abs(float(whole.float().mean()) - 0.05) < 0.004  # binomial sd 0.0007
    assert not torch.equal(whole, sampled_mask(0, 100_000, 0.05, seed=4))
    assert bool(sampled_mask(7, 10, 1.0, seed=0).all())


def test_add_row_counts_matches_bincount_and_names_the_table_on_bad_ids():
    rows = torch.tensor([3, 1, 3, 3, 0])
    counts = add_row_counts(torch.zeros(5, dtype=torch.int64), rows)
    add_row_counts(counts, torch.tensor([4]))
    assert counts.tolist() == [1, 1, 0, 3, 1] == (torch.bincount(rows, minlength=5) + torch.eye(5)[4].long()).tolist()
    with pytest.raises(ValueError, match=r"table 'cat_7'.*\[0, 5\).*found 5"):
        add_row_counts(counts, torch.tensor([5]), "cat_7")


def test_misra_gries_merge_subtracts_the_counter_past_capacity():
    rows, counts, decrement = merge_heavy_hitters(torch.tensor([1, 2]), torch.tensor([5, 3]),
                                                  torch.tensor([2, 9]), torch.tensor([1, 1]), capacity=2)
    # union {1: 5, 2: 4, 9: 1}: the third largest count (1) comes off every counter; row 9 drops out
    assert rows.tolist() == [1, 2] and counts.tolist() == [4, 3] and decrement == 1
    rows, counts, decrement = merge_heavy_hitters(torch.tensor([1]), torch.tensor([5]), torch.tensor([1, 2]),
                                                  torch.tensor([1, 2]), capacity=4)
    assert rows.tolist() == [1, 2] and counts.tolist() == [6, 2] and decrement == 0


def test_row_bytes_include_the_optimizer_state():
    assert row_bytes(16) == 16 * 4 + 4  # row-wise Adagrad: one float per row
    assert row_bytes(16, optimizer="adagrad") == 2 * 16 * 4
    assert row_bytes(16, optimizer="sgd") == 64
    assert row_bytes(16, optimizer="adam") == 3 * 64
    assert row_bytes(16, bytes_per_element=2, optimizer_bytes_per_row=8) == 40
    with pytest.raises(ValueError, match="unknown embedding optimizer 'lamb'"):
        row_bytes(16, optimizer="lamb")


CANDIDATES = [(torch.arange(5), torch.tensor([0, 9, 4, 4, 1])),  # table a: 10 bytes a row
              (torch.tensor([2, 7, 11]), torch.tensor([8, 5, 3]))]  # table b (sketch-like rows): 30 bytes a row
SIZES = [10, 30]


def test_global_order_is_by_count_with_deterministic_ties_and_skips_unseen_rows():
    table, row, count, cumulative = global_hot_order(CANDIDATES, SIZES)
    assert list(zip(table.tolist(), row.tolist(), strict=True)) == [(0, 1), (1, 2), (1, 7), (0, 2), (0, 3), (1, 11),
                                                                    (0, 4)]
    assert count.tolist() == [9, 8, 5, 4, 4, 3, 1]
    assert cumulative.tolist() == [10, 40, 70, 80, 90, 120, 130]


def test_global_cut_takes_the_most_counted_rows_and_never_exceeds_the_budget():
    for budget in range(10, 140):
        hot = select_hot_rows(CANDIDATES, SIZES, budget)
        used = sum(len(rows) * size for rows, size in zip(hot, SIZES, strict=True))
        assert used <= budget
        chosen = [int(CANDIDATES[t][1][CANDIDATES[t][0] == r]) for t in range(2) for r in hot[t].tolist()]
        left = [int(c) for t in range(2) for r, c in zip(*CANDIDATES[t], strict=True)
                if c > 0 and int(r) not in hot[t].tolist()]
        assert not chosen or not left or min(chosen) >= max(left)
    assert [h.tolist() for h in select_hot_rows(CANDIDATES, SIZES, 79)] == [[1], [2, 7]]  # 70 bytes; next needs 80
    assert [h.tolist() for h in select_hot_rows(CANDIDATES, SIZES, 10_000)] == [[1, 2, 3, 4], [2, 7, 11]]


def test_per_table_budgets_split_by_lookups_or_equally():
    # lookups: a 18, b 16 of 34; budget 120 -> a gets 63 bytes (6 rows, has 4 seen), b 56 bytes (1 row)
    assert [h.tolist() for h in select_hot_rows(CANDIDATES, SIZES, 120, mode="proportional")] == [[1, 2, 3, 4], [2]]
    # equal: 60 bytes each -> a 6 rows (4 seen), b 2 rows
    assert [h.tolist() for h in select_hot_rows(CANDIDATES, SIZES, 120, mode="equal")] == [[1, 2, 3, 4], [2, 7]]
    with pytest.raises(ValueError, match="mode must be"):
        select_hot_rows(CANDIDATES, SIZES, 120, mode="greedy")


def test_a_budget_below_one_row_is_a_clear_error():
    with pytest.raises(ValueError, match=r"budget of 9 bytes is too small.*table 'a'.*10 bytes"):
        select_hot_rows(CANDIDATES, SIZES, 9, names=["a", "b"])


def test_coverage_and_the_smallest_budget_for_it():
    total = 34
    assert lookup_coverage(CANDIDATES, [torch.tensor([1]), torch.tensor([2, 7])], total) == pytest.approx(22 / 34)
    # 90% of 34 = 30.6 -> rows 9, 8, 5, 4, 4 (30) are not enough; + row b:11 (3) = 33 -> 120 bytes
    assert smallest_budget_for_coverage(CANDIDATES, SIZES, total, 0.9) == 120
    assert smallest_budget_for_coverage(CANDIDATES, SIZES, total, 0.5) == 40  # 9 + 8 = 17 = half
    assert smallest_budget_for_coverage(CANDIDATES, SIZES, 100, 0.9) is None  # rows seen cover only 34%


def test_top_share_and_power_law_fit_on_exact_zipf_counts():
    ranks = torch.arange(1, 20_001, dtype=torch.float64)
    counts = (1e7 * ranks ** -1.2).round().long()
    assert fit_power_law(counts) == pytest.approx(1.2, abs=0.01)
    assert top_share(counts, 20_000) == pytest.approx(float(counts[:200].sum() / counts.sum()))
    assert top_share(torch.tensor([5, 1, 1, 1]), 4, total=16) == pytest.approx(5 / 16)  # a sketch missing lookups
    assert math.isnan(fit_power_law(torch.tensor([3, 2, 1])))  # nothing reaches min_count


# ---------------------------------------------------------------- the stateful profile


def test_sampled_counts_hot_set_and_all_hot_share_on_a_small_batch():
    profile = AccessProfile(["a", "b"], [10, 10], reservoir_inputs=100)
    batch = kjt({"a": [[0], [0], [5], [9]], "b": [[1, 2], [1], [], [7]]})
    profile.update(batch)
    assert profile.dense_counts("a").tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert profile.lookups == {"a": 4, "b": 4} and profile.num_inputs_counted == 4
    hot = profile.hot_rows(budget_bytes=3 * 68)  # three rows: a:0 (2), b:1 (2), then a:5 (the tie's first)
    assert [rows.tolist() for rows in hot.rows] == [[0, 5], [1]]
    assert profile.coverage(hot) == pytest.approx(5 / 8)
    assert profile.all_hot_share(hot) == pytest.approx(2 / 4)  # inputs 1 (a:0, b:1) and 2 (a:5)


def test_sampling_by_batches_counts_whole_batches_and_scales_counts():
    profile = AccessProfile(["a"], [4], sample_fraction=0.5, sample_by="batches", seed=1)
    kept = sampled_mask(0, 40, 0.5, seed=1)
    for _ in range(40):
        profile.update(kjt({"a": [[1], [2]]}))
    assert profile.num_inputs_counted == 2 * int(kept.sum()) and profile.num_inputs_seen == 80
    assert profile.dense_counts("a")[1] * profile.scale == pytest.approx(40)


def test_five_percent_sample_recovers_the_true_top_rows_exponent_and_top_share():
    # One 100k-row table, exponent 1.05; 20 IDs per input: 2M inputs give 42M lookups, 2.1M of them counted.
    rows, exponent, top = 100_000, 1.05, 1000  # N = 1% of the rows
    datamodule = SyntheticDataModule(num_embeddings_per_feature=[rows], multi_hot=20, num_dense=1,
                                     popularity_exponent=exponent, num_train_samples=2_097_152, batch_size=16384)
    datamodule.setup("fit")
    profile = profile_dataloader(AccessProfile.for_datamodule(datamodule, sample_fraction=0.05),
                                 datamodule.train_dataloader(), progress=False)
    assert abs(profile.num_inputs_counted / profile.num_inputs_seen - 0.05) < 0.002
    true_top = datamodule.log.rows_of_ranks(torch.arange(top).repeat(20, 1))[0]
    found = torch.topk(profile.dense_counts("cat_0"), top).indices
    assert float(torch.isin(found, true_top).float().mean()) >= 0.95
    (skew,) = profile.skew()
    assert skew.exponent == pytest.approx(exponent, abs=0.05)
    # the generator's top share is of the table's rows; the profile reports the top 1% of the rows seen
    counts = profile.counts("cat_0")[1]
    assert top_share(counts, rows, total=skew.lookups) == pytest.approx(expected_top_share(rows, exponent, 0.01),
                                                                       abs=0.01)
    assert skew.top1_share == pytest.approx(top_share(counts, skew.distinct_rows, total=skew.lookups))


def test_sketch_error_stays_within_its_stated_bound():
    datamodule = small_datamodule(num_embeddings_per_feature=[20_000], num_train_samples=65536, batch_size=4096)
    exact = AccessProfile.for_datamodule(datamodule)
    sketched = AccessProfile.for_datamodule(datamodule, sketch_above_rows=10_000, sketch_counters=200)
    for batch in datamodule.train_dataloader():
        exact.update(batch.sparse_features)
        sketched.update(batch.sparse_features)
    true = exact.dense_counts("cat_0")
    estimate = sketched.dense_counts("cat_0")
    error, lookups = sketched.sketch_error("cat_0"), sketched.lookups["cat_0"]
    assert sketched.counts("cat_0")[0].numel() <= 200
    assert 0 < error <= lookups / 201
    assert int((true - estimate).min()) >= 0 and int((true - estimate).max()) <= error
    assert bool((estimate[true > error] > 0).all())  # every row counted more than the bound is tracked


def test_merge_of_two_workers_equals_the_profile_of_all_their_inputs():
    datamodule = small_datamodule()
    batches = [b.sparse_features for b in datamodule.train_dataloader()]
    options = {"sketch_above_rows": 1000, "sketch_counters": 64}
    whole, first, second = (AccessProfile.for_datamodule(datamodule, **options) for _ in range(3))
    for index, batch in enumerate(batches):
        whole.update(batch)
        (first if index % 2 == 0 else second).update(batch)
    merged = first.merge(second)
    assert torch.equal(merged.dense_counts("cat_0"), whole.dense_counts("cat_0"))
    assert merged.lookups == whole.lookups and merged.num_inputs_seen == whole.num_inputs_seen
    true = whole.dense_counts("cat_0")  # not sketched: 300 rows
    exact_big = AccessProfile.for_datamodule(datamodule)
    for batch in batches:
        exact_big.update(batch)
    difference = exact_big.dense_counts("cat_1") - merged.dense_counts("cat_1")
    assert 0 <= int(difference.min()) and int(difference.max()) <= merged.sketch_error("cat_1")
    assert merged.sketch_error("cat_1") <= merged.lookups["cat_1"] / 65
    assert int(true.sum()) == merged.lookups["cat_0"]
    with pytest.raises(ValueError, match="different sample_fraction"):
        first.merge(AccessProfile.for_datamodule(datamodule, sample_fraction=0.5, **options))


WORKER = """
import sys
import torch.distributed as dist
from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.profile import AccessProfile, profile_dataloader

dist.init_process_group("gloo")
datamodule = SyntheticDataModule(num_embeddings_per_feature=[300, 5000], num_dense=2, num_train_samples=8192,
                                 batch_size=512, popularity_exponent=1.05)
datamodule.setup("fit")
profile = AccessProfile.for_datamodule(datamodule, sketch_above_rows=1000, sketch_counters=64)
profile_dataloader(profile, datamodule.train_dataloader(), progress=False)
profile.all_reduce()
profile.save(f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_all_reduce_gives_every_gloo_rank_the_profile_of_all_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch(script, 2, [str(tmp_path)], timeout=120)
    ranks = [AccessProfile.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = profile_dataloader(AccessProfile.for_datamodule(small_datamodule(), sketch_above_rows=1000,
                                                             sketch_counters=64),
                                small_datamodule().train_dataloader(), progress=False)
    for profile in ranks:
        assert profile.num_inputs_seen == 8192 and profile.lookups == single.lookups
        assert torch.equal(profile.dense_counts("cat_0"), single.dense_counts("cat_0"))
    for left, right in zip(ranks[0].counts("cat_1"), ranks[1].counts("cat_1"), strict=True):
        assert torch.equal(left, right)
    assert ranks[0].sketch_error("cat_1") == ranks[1].sketch_error("cat_1") <= 8192 / 65
    assert [p for p, *_ in ranks[0].reservoir] == [p for p, *_ in ranks[1].reservoir]


def test_save_load_round_trip_and_clear_errors_for_other_tables_or_data(tmp_path):
    datamodule = small_datamodule()
    profile = profile_dataloader(AccessProfile.for_datamodule(datamodule, sample_fraction=0.5, sketch_above_rows=1000,
                                                              sketch_counters=64),
                                 datamodule.train_dataloader(), progress=False)
    path = tmp_path / "profile.pt"
    profile.save(path)
    loaded = AccessProfile.load(path, datamodule=datamodule)
    assert loaded.state_dict().keys() == profile.state_dict().keys()
    for name in ("cat_0", "cat_1"):
        for mine, theirs in zip(profile.counts(name), loaded.counts(name), strict=True):
            assert torch.equal(mine, theirs)
    assert (loaded.num_inputs_seen, loaded.num_inputs_counted, loaded.sample_fraction) == \
        (8192, profile.num_inputs_counted, 0.5)
    hot, hot_loaded = profile.hot_rows(20_000), loaded.hot_rows(20_000)
    assert [r.tolist() for r in hot.rows] == [r.tolist() for r in hot_loaded.rows]
    assert loaded.all_hot_share(hot) == profile.all_hot_share(hot)
    assert loaded.dataset["class"] == "lightning_skew.data.synthetic.SyntheticDataModule"

    # batch size changes only how the data is loaded: still the same dataset
    AccessProfile.load(path, datamodule=small_datamodule(batch_size=512))
    with pytest.raises(ValueError, match=r"table sizes: 'cat_1' has 5000 rows in the profile, 4000 here"):
        AccessProfile.load(path, datamodule=small_datamodule(num_embeddings_per_feature=[300, 4000]))
    with pytest.raises(ValueError, match=r"features missing from the profile: \['cat_2'\]"):
        AccessProfile.load(path, datamodule=small_datamodule(num_embeddings_per_feature=[300, 5000, 10]))
    with pytest.raises(ValueError, match=r"other data: seed=0 \(profile\) vs 7 \(here\)"):
        AccessProfile.load(path, datamodule=small_datamodule(seed=7))


def test_ids_outside_a_table_name_the_table():
    profile = AccessProfile(["a", "b"], [10, 4], sketch_above_rows=5)
    with pytest.raises(ValueError, match=r"table 'b'.*\[0, 4\)"):
        profile.update(kjt({"a": [[1]], "b": [[4]]}))


# ---------------------------------------------------------------- the command


def test_parse_bytes_reads_decimal_and_binary_units():
    assert parse_bytes("64MB") == 64_000_000 and parse_bytes("64MiB") == parse_bytes("64m") == 64 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="cannot read '64 parsecs'"):
        parse_bytes("64 parsecs")


def test_profile_command_end_to_end_on_a_tiny_synthetic_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "dlrm_synthetic.yaml"
    output = tmp_path / "profile"
    profile_main(["--config", str(recipe), "--data.init_args.max_rows_per_table", "2000",
                  "--data.init_args.num_train_samples", "32768", "--data.init_args.batch_size", "4096",
                  "--budget", "200kB", "--sample-fraction", "0.25", "--output-dir", str(output), "--no-progress"])
    printed = capsys.readouterr().out
    assert "rows take 68 bytes each (embedding_dim 16, rowwise_adagrad state" in printed  # from the recipe's model
    assert "cat_25" in printed and "top1%" in printed and "exponent" in printed
    assert "budget 200 kB (200000 bytes, global cut)" in printed
    assert "suggested budget:" in printed and "covers 90% of lookups" in printed
    for name in ("profile.pt", "coverage.png", "popularity.png", "summary.json"):
        assert (output / name).is_file() and (output / name).stat().st_size > 1000, name
    assert list((output / "wandb").glob("offline-run-*")), "wandb did not record the run offline"
    profile = AccessProfile.load(output / "profile.pt")
    assert profile.num_inputs_seen == 32768 and profile.sample_fraction == 0.25
    assert profile.dataset["arguments"]["max_rows_per_table"] == 2000
    hot = profile.hot_rows(200_000)
    assert len(hot) * 68 <= 200_000 and f"{len(hot)} hot rows" in printed


def criteo_line(rng: random.Random) -> str:
    dense = ["" if rng.random() < 0.2 else str(rng.randint(-3, 3000)) for _ in range(13)]
    # a skewed categorical: a few popular values, a long tail, some missing
    cats = ["" if rng.random() < 0.1 else f"{int(rng.paretovariate(1.1) * 1000):x}" for _ in range(26)]
    return "\t".join([str(rng.randint(0, 1)), *dense, *cats]) + "\n"


def test_profile_command_on_a_criteo_file_agrees_with_a_plain_count(tmp_path, capsys):
    rng = random.Random(0)
    lines = [criteo_line(rng) for _ in range(600)]
    (tmp_path / "day_0.tsv").write_text("".join(lines))
    sizes = [97, 1000, 13, 7] + [500] * 22
    config = tmp_path / "criteo.yaml"
    config.write_text(textwrap.dedent(f"""
        data:
          class_path: lightning_skew.data.CriteoDataModule
          init_args:
            train_paths: [{tmp_path / "day_0.tsv"}]
            num_embeddings_per_feature: {sizes}
            batch_size: 200
    """))
    output = tmp_path / "out"
    profile_main(["--config", str(config), "--sample-fraction", "1", "--output-dir", str(output), "--no-wandb",
                  "--no-progress", "--budget", "10kB"])
    assert "suggested budget:" in capsys.readouterr().out
    profile = AccessProfile.load(output / "profile.pt")
    expected = [[0] * size for size in sizes]
    for line in lines:
        for column, (field, size) in enumerate(zip(line.rstrip("\n").split("\t")[14:], sizes, strict=True)):
            # Missing on row 0; present values on 1 + value % (rows - 1), off the missing row.
            expected[column][1 + int(field, 16) % (size - 1) if field else 0] += 1
    for column, name in enumerate(profile.feature_names):
        assert profile.dense_counts(name).tolist() == expected[column], name
    assert profile.num_inputs_seen == 600 and profile.dataset["class"].endswith("CriteoDataModule")


def test_batch_sampled_profile_skips_unsampled_batches_and_counts_the_same():
    from lightning_skew.data.synthetic import SyntheticDataModule

    def data():
        module = SyntheticDataModule(num_embeddings_per_feature=[1000, 50], num_dense=2, num_train_samples=64 * 100,
                                     num_val_samples=64, num_test_samples=64, batch_size=64, seed=2)
        module.setup("fit")
        return module

    fast_data, slow_data = data(), data()
    generated = []
    stream = fast_data.train_dataloader().dataset
    original = stream.batch_at
    stream.batch_at = lambda index: generated.append(index) or original(index)

    fast = AccessProfile.for_datamodule(fast_data, sample_fraction=0.1, sample_by="batches", seed=5)
    profile_dataloader(fast, fast_data.train_dataloader().__class__(stream, batch_size=None), progress=False)
    slow = AccessProfile.for_datamodule(slow_data, sample_fraction=0.1, sample_by="batches", seed=5)
    profile_dataloader(slow, list(slow_data.train_dataloader()), progress=False)  # a plain list: no seeking

    assert 0 < len(generated) < 30  # about 10 of the 100 batches were produced at all
    assert fast.num_inputs_seen == slow.num_inputs_seen == 6400
    assert fast.num_inputs_counted == slow.num_inputs_counted == 64 * len(generated)
    for name in fast.feature_names:
        assert torch.equal(fast.dense_counts(name), slow.dense_counts(name))


# ---------------------------------------------------------------- issue 12: samples, rows seen, missing values, cost


def test_sample_warning_says_what_was_counted_and_the_fraction_that_counts_enough():
    def profile_of(batches: int, batch_size: int, fraction: float, seed: int) -> AccessProfile:
        profile = AccessProfile(["a"], [10], sample_fraction=fraction, sample_by="batches", seed=seed)
        for _ in range(batches):
            profile.update(kjt({"a": [[1]] * batch_size}))
        return profile

    # 4 batches of 8192 at 5%: find a seed that counts exactly one batch (as the command's default did)
    seed = next(s for s in range(1000) if int(sampled_mask(0, 4, 0.05, s).sum()) == 1)
    single = profile_of(4, 8192, 0.05, seed)
    assert (single.num_inputs_counted, single.num_batches_counted, single.num_batches_seen) == (8192, 1, 4)
    # enough inputs, but all from one batch: two of four batches need a fraction of 0.5
    assert single.sample_warning() == ("only 8192 of 32768 inputs (1 of 4 batches) were counted: a sample_fraction "
                                       "of 0.05 is too small for stable statistics; use 0.5 or more (at least "
                                       "4096 inputs in several batches)")
    seed = next(s for s in range(1000) if int(sampled_mask(0, 100, 0.05, s).sum()) == 5)
    few = profile_of(100, 64, 0.05, seed)  # 5 batches of 64: 320 inputs counted of 6400
    assert few.sample_warning(option="--sample-fraction").startswith(
        "only 320 of 6400 inputs (5 of 100 batches) were counted: a --sample-fraction of 0.05 is too small")
    assert "use 0.7 or more" in few.sample_warning()  # 4096 / 6400 = 0.64, rounded up
    assert "fewer than 4096 inputs" in profile_of(10, 64, 1.0, 0).sample_warning()  # all 640 counted: rough
    assert profile_of(80, 64, 1.0, 0).sample_warning() is None  # 5120 inputs in 80 batches


def test_top_share_is_over_the_rows_seen_and_a_hashed_table_costs_its_rows_seen(tmp_path):
    # A hashed 10M-row table filled by 5,000 values: the top 1% of its rows (100,000) would hold every lookup.
    table_rows, values = 10_000_000, 5000
    rows = torch.arange(values) * 1_999_993 % table_rows  # distinct (1999993 is prime to 10^7), spread out
    lookups = torch.cat([rows[:50].repeat(10), rows[50:]])  # the top 50 rows (1% of those seen) 10 times each
    profile = AccessProfile(["c"], [table_rows], reservoir_inputs=lookups.numel())
    profile.update(kjt({"c": [[int(r)] for r in lookups]}))
    (skew,) = profile.skew()
    assert skew.distinct_rows == values and skew.seen_share == pytest.approx(values / table_rows)
    assert skew.top1_share == pytest.approx(500 / 5450)
    assert top_share(profile.counts("c")[1], table_rows, total=5450) == 1.0  # the old definition's answer
    # counts, hot sets, coverage and the file follow the 5,000 rows seen, not the 10M rows of the table
    seen_rows, counts = profile.counts("c")
    assert torch.equal(seen_rows, torch.sort(rows).values) and int(counts.sum()) == 5450
    hot = profile.hot_rows(50 * 68)
    assert sorted(hot.rows[0].tolist()) == sorted(rows[:50].tolist())
    assert profile.coverage(hot) == pytest.approx(500 / 5450)
    assert profile.all_hot_share(hot) == pytest.approx(500 / 5450)  # one lookup per input
    path = tmp_path / "profile.pt"
    profile.save(path)
    assert path.stat().st_size < 400_000  # one int64 per table row would take 80 MB
    loaded = AccessProfile.load(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.counts("c"), profile.counts("c"), strict=True))


class MissingValueData(RecDataModule):
    """5,000 inputs of two features. ``c22``: 6 in 10 inputs missing (row 0), 3 in 10 row 1, 1 in 10 one of rows
    2..101; ``c1``: row ``i % 50``, no missing row."""

    def __init__(self, batch_size: int = 500) -> None:
        super().__init__()
        self.batch_size = batch_size

    @property
    def dense_in_features(self) -> int:
        return 1

    @property
    def sparse_feature_names(self) -> list[str]:
        return ["c1", "c22"]

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return [50, 1000]

    @property
    def missing_rows(self) -> dict[str, int]:
        return {"c22": 0}

    def train_dataloader(self):
        inputs = torch.arange(5000)
        digit = inputs % 10
        c22 = torch.where(digit < 6, 0, torch.where(digit < 9, 1, 2 + (inputs // 10) % 100))
        batches = []
        for start in range(0, 5000, self.batch_size):
            part = slice(start, start + self.batch_size)
            sparse = KeyedJaggedTensor.from_lengths_sync(
                keys=["c1", "c22"], values=torch.cat([inputs[part] % 50, c22[part]]),
                lengths=torch.ones(2 * self.batch_size, dtype=torch.int32))
            batches.append(Batch(dense_features=torch.zeros(self.batch_size, 1), sparse_features=sparse,
                                 labels=torch.zeros(self.batch_size)))
        return batches


def test_missing_values_are_shown_apart_and_skew_is_over_present_values():
    profile = profile_dataloader(AccessProfile.for_datamodule(MissingValueData()), MissingValueData().train_dataloader(),
                                 progress=False)
    assert profile.missing_rows == {"c22": 0}
    c1, c22 = profile.skew()
    assert (c22.missing_row, c22.missing_lookups, c22.missing_share) == (0, 3000, 0.6)
    assert c22.distinct_rows == 101  # present rows: 1 and 2..101
    assert c22.top1_share == pytest.approx(1500 / 2000)  # the top row of the 101 seen over the 2,000 present
    assert (c1.missing_row, c1.missing_share, c1.distinct_rows) == (None, 0.0, 50)
    # Placement keeps the missing row: it is looked up most, so a one-row budget makes it the hot row.
    hot = profile.hot_rows(68)
    assert [rows.tolist() for rows in hot.rows] == [[], [0]]
    assert profile.coverage(hot) == pytest.approx(3000 / 10_000)


def test_profile_command_reports_missing_values_and_rows_seen_through_a_wrapper(tmp_path, capsys):
    config = tmp_path / "missing.yaml"
    config.write_text(textwrap.dedent(f"""
        data:
          class_path: lightning_skew.RepackedDataModule
          init_args:
            datamodule:
              class_path: {__name__}.MissingValueData
    """))
    output = tmp_path / "out"
    profile_main(["--config", str(config), "--sample-fraction", "1", "--output-dir", str(output), "--no-wandb",
                  "--no-progress", "--budget", "1kB"])
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith(("c1 ", "c22 "))}
    # table, rows, seen, seen%, lookups, missing, top1%, ...
    assert rows["c22"][:7] == ["c22", "1000", "101", "10.1%", "5000", "0.600", "0.750"]
    assert rows["c1"][:6] == ["c1", "50", "50", "100.0%", "5000", "-"]
    assert "missing values (their own row, hot like any other; skew is over present values): c22 0.600" in printed
    assert "counted 5000 of 5000 inputs (100.0%; 10 of 10 batches" in printed and "warning:" not in printed
    summary = json.loads((output / "summary.json").read_text())
    c22 = next(table for table in summary["tables"] if table["table"] == "c22")
    assert (c22["missing_row"], c22["missing_lookups"], c22["missing_share"], c22["top1_share"]) == (0, 3000, 0.6, 0.75)
    profile = AccessProfile.load(output / "profile.pt")
    assert profile.missing_rows == {"c22": 0} and profile.dataset["class"].endswith("MissingValueData")


def test_profile_command_says_how_much_it_counted_and_warns_when_it_is_little(tmp_path, capsys):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "dlrm_synthetic.yaml"
    output = tmp_path / "profile"
    # 4 batches of 2048; the default 5% sample of batches counts one of them (seed 0)
    profile_main(["--config", str(recipe), "--data.init_args.max_rows_per_table", "2000",
                  "--data.init_args.num_train_samples", "8192", "--output-dir", str(output), "--no-progress",
                  "--no-wandb"])
    printed = capsys.readouterr().out
    assert "counted 2048 of 8192 inputs (25.0%; 1 of 4 batches, sample fraction 0.05 by batches)" in printed
    assert ("warning: only 2048 of 8192 inputs (1 of 4 batches) were counted: a --sample-fraction of 0.05 is too "
            "small for stable statistics; use 0.5 or more") in printed
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["inputs_counted"], summary["inputs_seen"], summary["batches_counted"],
            summary["batches_seen"], summary["sample_fraction"]) == (2048, 8192, 1, 4, 0.05)
    assert summary["sample_warning"].startswith("only 2048 of 8192 inputs (1 of 4 batches) were counted")


def test_profiles_saved_in_version_1_still_load(tmp_path):
    # Written by lightning-skew before sparse counts (one int64 per table row); 6 of 8 batches of 1024 counted.
    path = Path(__file__).parent / "data" / "access_profile_v1.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == 1 and raw["exact_counts"]["cat_0"].numel() == 300
    profile = AccessProfile.load(path)
    dense = raw["exact_counts"]["cat_0"]
    rows, counts = profile.counts("cat_0")
    assert torch.equal(rows, torch.nonzero(dense).flatten()) and torch.equal(counts, dense[rows])
    assert torch.equal(profile.dense_counts("cat_0"), dense)
    for mine, theirs in zip(profile.counts("cat_1"), raw["sketches"]["cat_1"], strict=True):
        assert torch.equal(mine, theirs)
    assert (profile.num_inputs_counted, profile.num_batches_counted, profile.num_batches_seen) == (6144, 6, 8)
    assert profile.missing_rows == {} and profile.lookups == raw["lookups"]
    assert len(profile.hot_rows(20_000)) > 0 and 0 < profile.coverage(profile.hot_rows(20_000)) <= 1
    profile.save(tmp_path / "v2.pt")  # saved again in the current version, the same profile
    again = AccessProfile.load(tmp_path / "v2.pt")
    assert torch.load(tmp_path / "v2.pt", weights_only=True)["version"] == 2
    assert all(torch.equal(a, b) for a, b in zip(again.counts("cat_0"), profile.counts("cat_0"), strict=True))


def test_an_unreadable_profile_file_is_a_clear_error_naming_it(tmp_path):
    profile = AccessProfile(["a"], [10])
    profile.update(KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1])))
    profile.save(tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04 not a profile at all")
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(ValueError, match=f"access profile .*{name} cannot be read.*profile the data again"):
            AccessProfile.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        AccessProfile.load(tmp_path / "missing.pt")
    assert AccessProfile.load(tmp_path / "good.pt").total_lookups == 2


def test_a_profile_of_the_data_inside_a_popularity_wrapper_is_accepted_by_the_same_recipe(tmp_path):
    # LightningCLI hands the wrapper's configuration (with profile_path) to the DataModule built inside it: the
    # description must come from the inner DataModule's own block, or a profile could never match its own data.
    from lightning_skew.profile.command import build_datamodule
    from lightning_skew.profile.loader import profile_dataloader

    recipe = ["--config", str(Path(__file__).resolve().parents[1] / "recipes" / "dlrm_synthetic_popularity.yaml"),
              "--data.init_args.datamodule.init_args.max_rows_per_table", "500",
              "--data.init_args.datamodule.init_args.num_train_samples", "4096",
              "--data.init_args.datamodule.init_args.batch_size", "512"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped, _ = build_datamodule(recipe)
        data = wrapped.unwrapped
        data.setup("fit")
        profile = profile_dataloader(AccessProfile.for_datamodule(data, sample_fraction=1.0),
                                     data.train_dataloader(), progress=False, max_batches=2)
        profile.save(tmp_path / "profile.pt")
        again, _ = build_datamodule(recipe + ["--data.init_args.hot_rows.init_args.profile_path",
                                              str(tmp_path / "profile.pt")])
        assert again.hot_rows_source.profile_for(again).total_lookups == profile.total_lookups
        # The same data built in Python is the same data; other data is still refused.
        same = SyntheticDataModule(max_rows_per_table=500, popularity_exponent=1.05, num_train_samples=4096,
                                   num_val_samples=131072, num_test_samples=131072, batch_size=2048, seed=0)
        AccessProfile.load(tmp_path / "profile.pt", datamodule=same)
        other, _ = build_datamodule(recipe + ["--data.init_args.hot_rows.init_args.profile_path",
                                              str(tmp_path / "profile.pt"),
                                              "--data.init_args.datamodule.init_args.seed", "1"])
        with pytest.raises(ValueError, match=r"made from other data: seed=0 \(profile\) vs 1 \(here\)"):
            other.hot_rows_source.profile_for(other)
