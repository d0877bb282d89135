"""Tests of the Criteo TSV / npy readers and CriteoDataModule on small files written in the real formats."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec.datasets.criteo import BinaryCriteoUtils

from lightning_skew.data.base import Batch
from lightning_skew.data.criteo import (
    CriteoDataModule,
    CriteoNpyDataset,
    CriteoTsvDataset,
    CriteoVocabulary,
    GlobalBatchSharding,
    build_vocabulary,
    hash_categorical,
    parse_tsv_lines,
    transform_dense,
)
from lightning_skew.data.features import CRITEO_CATEGORICAL_COLUMNS

from _support.criteo_files import SIZES, criteo_line, random_lines, write_tsv
from _support.resume_fit import assert_resumes_mid_epoch


def batches_as_arrays(batches) -> list[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]]:
    out = []
    for batch in batches:
        assert isinstance(batch, Batch)
        sparse = {k: batch.sparse_features[k].values().numpy() for k in batch.sparse_features.keys()}
        out.append((batch.dense_features.numpy(), sparse, batch.labels.numpy()))
    return out


def assert_same_batches(left, right) -> None:
    assert len(left) == len(right)
    for (dense_a, sparse_a, labels_a), (dense_b, sparse_b, labels_b) in zip(left, right, strict=True):
        np.testing.assert_array_equal(dense_a, dense_b)
        np.testing.assert_array_equal(labels_a, labels_b)
        assert sparse_a.keys() == sparse_b.keys()
        for key in sparse_a:
            np.testing.assert_array_equal(sparse_a[key], sparse_b[key])


# ---------------------------------------------------------------- parsing and transforms


def test_line_with_missing_and_negative_fields_parses_to_documented_values():
    dense = ["", "-3", "7", "0", "12345", "", "", "", "", "", "", "", "1"]
    cats = ["", "0a1b2c3d", "FFFFFFFF", "00000000"] + ["68fd1e64"] * 22
    parsed = parse_tsv_lines([criteo_line("1", dense, cats).encode()])

    assert parsed.malformed == []
    np.testing.assert_array_equal(parsed.labels, [1.0])
    np.testing.assert_array_equal(parsed.dense[0, :5], [0, -3, 7, 0, 12345])
    expected_dense = [0.0, 0.0, math.log(8), 0.0, math.log(12346)] + [0.0] * 7 + [math.log(2)]
    np.testing.assert_allclose(transform_dense(parsed.dense)[0], expected_dense, rtol=1e-6)
    assert transform_dense(parsed.dense).dtype == np.float32

    assert parsed.categorical[0, 1] == 0x0A1B2C3D
    np.testing.assert_array_equal(parsed.categorical_missing[0, :4], [True, False, False, False])
    ids = hash_categorical(parsed.categorical, SIZES, parsed.categorical_missing)
    # Missing lands on row 0, which no present value shares: present values take 1 + value % (rows - 1), the
    # value 0 ("00000000") included.
    np.testing.assert_array_equal(ids[0, :4], [0, 1 + 0x0A1B2C3D % 999, 1 + 0xFFFFFFFF % 12, 1])
    assert ids[0, 4] == 1 + 0x68FD1E64 % 49


def test_parser_reports_each_kind_of_malformed_line():
    good = criteo_line("0", ["1"] * 13, ["abcd0123"] * 26)
    bad = [
        "0\t1\t2\n",
        criteo_line("2", ["1"] * 13, ["abcd0123"] * 26),
        criteo_line("1", ["1.5"] + ["1"] * 12, ["abcd0123"] * 26),
        criteo_line("1", ["1"] * 13, ["xyz"] + ["abcd0123"] * 25),
        criteo_line("1", ["-"] + ["1"] * 12, ["abcd0123"] * 26),
        criteo_line("1", ["1"] * 13, ["1" * 17] + ["abcd0123"] * 25),
    ]
    parsed = parse_tsv_lines([good.encode()] + [line.encode() for line in bad] + [good.encode()])
    assert len(parsed) == 2
    reasons = dict(parsed.malformed)
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6]
    assert "expected 40 tab-separated fields, found 3" in reasons[1]
    assert "label must be 0 or 1" in reasons[2]
    assert "I1" in reasons[3] and "1.5" in reasons[3]
    assert "C1" in reasons[4] and "xyz" in reasons[4]
    assert "I1" in reasons[5]
    assert "longer than 16" in reasons[6]


def test_last_line_without_newline_and_crlf_lines_parse():
    line = criteo_line("1", ["5"] * 13, ["ff"] * 26)
    parsed = parse_tsv_lines([line.replace("\n", "\r\n").encode(), line.rstrip("\n").encode()])
    assert parsed.malformed == []
    np.testing.assert_array_equal(parsed.dense, np.full((2, 13), 5))
    np.testing.assert_array_equal(parsed.categorical, np.full((2, 26), 255))


# ---------------------------------------------------------------- TSV streaming


def test_gzip_file_gives_the_same_batches_as_the_plain_file(tmp_path):
    lines = random_lines(50)
    plain = write_tsv(tmp_path / "day_0", lines)
    packed = write_tsv(tmp_path / "day_0.gz", lines, compress=True)
    no_suffix = write_tsv(tmp_path / "day_0_gzip_without_suffix", lines, compress=True)
    reference = batches_as_arrays(CriteoTsvDataset(plain, batch_size=8, num_embeddings_per_feature=SIZES))
    assert [len(labels) for _, _, labels in reference] == [8] * 6 + [2]  # 50 lines: the last 2 are a batch too
    for path in (packed, no_suffix):
        assert_same_batches(
            reference, batches_as_arrays(CriteoTsvDataset(path, batch_size=8, num_embeddings_per_feature=SIZES))
        )


def test_malformed_line_raises_with_file_and_line_number(tmp_path):
    lines = random_lines(10)
    fields = lines[6].split("\t")
    fields[1] = "not-a-number"
    lines[6] = "\t".join(fields)
    first = write_tsv(tmp_path / "day_0", random_lines(5, seed=1))
    second = write_tsv(tmp_path / "day_1", lines)
    dataset = CriteoTsvDataset([first, second], batch_size=5, num_embeddings_per_feature=SIZES)
    with pytest.raises(ValueError, match=r"day_1, line 7: malformed Criteo line: integer feature I1"):
        list(dataset)


def test_skip_malformed_reads_the_rest_and_counts_exactly(tmp_path):
    lines = random_lines(12)
    lines[2] = "1\t2\t3\n"
    lines[9] = lines[9].rsplit("\t", 1)[0] + "\tzzzzzzzz\n"
    path = write_tsv(tmp_path / "day_0", lines)
    dataset = CriteoTsvDataset(path, batch_size=4, num_embeddings_per_feature=SIZES, skip_malformed=True)
    batches = list(dataset)
    assert [len(b.labels) for b in batches] == [3, 4, 3]
    assert dataset.num_malformed_lines == 2
    clean = CriteoTsvDataset(
        write_tsv(tmp_path / "clean", [x for i, x in enumerate(lines) if i not in (2, 9)]),
        batch_size=10, num_embeddings_per_feature=SIZES,
    )
    (expected,) = batches_as_arrays(clean)
    got = batches_as_arrays(batches)
    np.testing.assert_array_equal(np.concatenate([d for d, _, _ in got]), expected[0])
    list(dataset)  # a second pass counts again from zero
    assert dataset.num_malformed_lines == 2


def test_ranks_of_a_world_concatenate_to_the_single_rank_stream(tmp_path):
    lines = random_lines(47)
    # Two files, so that global batches cross a file boundary.
    paths = [write_tsv(tmp_path / "day_0", lines[:20]), write_tsv(tmp_path / "day_1.gz", lines[20:], compress=True)]
    world_size, batch_size = 2, 5
    single = batches_as_arrays(
        CriteoTsvDataset(paths, batch_size=world_size * batch_size, num_embeddings_per_feature=SIZES)
    )
    per_rank = [
        batches_as_arrays(
            CriteoTsvDataset(paths, batch_size, SIZES, rank=rank, world_size=world_size)
        )
        for rank in range(world_size)
    ]
    # 47 lines: 4 global batches of 10, then the last 7 split over the two ranks (3 + 4): every line once.
    assert [len(labels) for _, _, labels in single] == [10] * 4 + [7]
    assert [[len(labels) for _, _, labels in batches] for batches in per_rank] == [[5] * 4 + [3], [5] * 4 + [4]]
    for step, (dense, sparse, labels) in enumerate(single):
        np.testing.assert_array_equal(dense, np.concatenate([per_rank[r][step][0] for r in range(2)]))
        np.testing.assert_array_equal(labels, np.concatenate([per_rank[r][step][2] for r in range(2)]))
        for key in CRITEO_CATEGORICAL_COLUMNS:
            np.testing.assert_array_equal(sparse[key], np.concatenate([per_rank[r][step][1][key] for r in range(2)]))


def test_dataloader_workers_keep_the_batch_order(tmp_path):
    path = write_tsv(tmp_path / "day_0", random_lines(70))
    dataset = CriteoTsvDataset(path, batch_size=4, num_embeddings_per_feature=SIZES, rank=1, world_size=2)
    in_process = batches_as_arrays(DataLoader(dataset, batch_size=None, num_workers=0))
    with_workers = batches_as_arrays(DataLoader(dataset, batch_size=None, num_workers=2))
    assert [len(labels) for _, _, labels in in_process] == [4] * 8 + [3]  # 70 = 8 x (2 x 4) + 6, 3 per rank
    assert_same_batches(in_process, with_workers)


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_keeps_frequent_values_and_sends_rare_unseen_and_missing_to_row_zero(tmp_path):
    rest = ["00000001"] * 25
    column = ["aaaaaaaa"] * 2 + ["bbbbbbbb"] * 3 + ["cccccccc"] + [""] * 4
    lines = [criteo_line("0", ["1"] * 13, [value, *rest]) for value in column]
    train = write_tsv(tmp_path / "train.txt", lines)
    vocabulary = build_vocabulary([train], min_frequency=2, output_path=str(tmp_path / "vocab.npz"))

    assert vocabulary.num_embeddings_per_feature[:2] == [3, 2]  # C1: bbbb, aaaa + row 0; C2: 00000001 + row 0
    assert vocabulary.min_frequency == 2
    assert vocabulary.source_files == [str(Path(train).resolve())]
    raw = np.array([[0xBBBBBBBB] + [1] * 25, [0xAAAAAAAA] + [1] * 25, [0xCCCCCCCC] + [1] * 25,
                    [0xDDDDDDDD] + [1] * 25, [0] + [1] * 25], dtype=np.uint64)
    missing = np.zeros(raw.shape, dtype=bool)
    missing[4, 0] = True
    ids = vocabulary.lookup(raw, missing)
    # Most frequent first: bbbb (3 times) -> 1, aaaa (2 times) -> 2, rare/unseen/missing -> 0.
    np.testing.assert_array_equal(ids[:, 0], [1, 2, 0, 0, 0])
    np.testing.assert_array_equal(ids[:, 1], [1, 1, 1, 1, 1])

    rebuilt = build_vocabulary([train], min_frequency=2, output_path=str(tmp_path / "again.npz"))
    np.testing.assert_array_equal(rebuilt.lookup(raw, missing), ids)
    reloaded = CriteoVocabulary(str(tmp_path / "vocab.npz"))
    np.testing.assert_array_equal(reloaded.lookup(raw, missing), ids)


def test_datamodule_takes_table_sizes_from_the_vocabulary(tmp_path):
    train = write_tsv(tmp_path / "train.txt", random_lines(40) + random_lines(40))  # every value twice
    vocab = str(tmp_path / "vocab.npz")
    build_vocabulary(train, min_frequency=2, output_path=vocab)
    datamodule = CriteoDataModule(train_paths=[train], vocabulary_path=vocab, batch_size=16)
    sizes = datamodule.num_embeddings_per_feature
    assert sizes == CriteoVocabulary(vocab).num_embeddings_per_feature
    assert all(size > 1 for size in sizes)
    datamodule.setup("fit")
    for batch in datamodule.train_dataloader():
        for key, size in zip(CRITEO_CATEGORICAL_COLUMNS, sizes, strict=True):
            assert int(batch.sparse_features[key].values().max()) < size
    capped = CriteoDataModule(train_paths=[train], vocabulary_path=vocab, max_rows_per_table=3, batch_size=16)
    assert max(capped.num_embeddings_per_feature) == 3
    with pytest.raises(ValueError, match="must be None with vocabulary_path"):
        CriteoDataModule(train_paths=[train], vocabulary_path=vocab, num_embeddings_per_feature=SIZES)


# ---------------------------------------------------------------- TorchRec npy layout


def test_npy_reader_matches_torchrec_layout_written_by_torchrec(tmp_path):
    lines = random_lines(30)
    tsv = write_tsv(tmp_path / "day_0.tsv", lines)
    prefix = str(tmp_path / "day_0")
    BinaryCriteoUtils.tsv_to_npys(tsv, f"{prefix}_dense.npy", f"{prefix}_sparse.npy", f"{prefix}_labels.npy")
    assert np.load(f"{prefix}_labels.npy").shape == (30, 1)

    npy = batches_as_arrays(CriteoNpyDataset(prefix, batch_size=7, num_embeddings_per_feature=SIZES))
    tsv_batches = batches_as_arrays(CriteoTsvDataset(tsv, batch_size=7, num_embeddings_per_feature=SIZES))
    assert [len(labels) for _, _, labels in npy] == [len(labels) for _, _, labels in tsv_batches] == [7] * 4 + [2]
    stored_dense = np.load(f"{prefix}_dense.npy")
    for step, ((dense, sparse, labels), (_, tsv_sparse, tsv_labels)) in enumerate(zip(npy, tsv_batches, strict=True)):
        np.testing.assert_array_equal(labels, tsv_labels)
        # TorchRec already log-transformed the dense features: they are used as stored.
        np.testing.assert_array_equal(dense, stored_dense[step * 7 : (step + 1) * 7])
        for key in CRITEO_CATEGORICAL_COLUMNS:
            np.testing.assert_array_equal(sparse[key], tsv_sparse[key])


def test_npy_reader_shards_days_and_transforms_integer_dense(tmp_path):
    rng = np.random.default_rng(0)
    rows = [9, 6]
    for day, n in enumerate(rows):
        np.save(tmp_path / f"day_{day}_dense.npy", rng.integers(-2, 100, (n, 13)).astype(np.int32))
        np.save(tmp_path / f"day_{day}_sparse.npy", rng.integers(-(2**31), 2**31 - 1, (n, 26)).astype(np.int32))
        np.save(tmp_path / f"day_{day}_labels.npy", rng.integers(0, 2, n).astype(np.int32))
    dense = np.concatenate([np.load(tmp_path / f"day_{d}_dense.npy") for d in range(2)])
    sparse = np.concatenate([np.load(tmp_path / f"day_{d}_sparse.npy") for d in range(2)])

    datasets = [CriteoNpyDataset(str(tmp_path), 3, SIZES, rank=r, world_size=2) for r in range(2)]
    assert [len(d) for d in datasets] == [3, 3]  # 15 rows: 2 global batches of 6, then 3 rows split 1 + 2
    rank1 = batches_as_arrays(DataLoader(datasets[1], batch_size=None, num_workers=0))
    assert [len(labels) for _, _, labels in rank1] == [3, 3, 2]
    np.testing.assert_allclose(rank1[2][0], transform_dense(dense[13:15]))
    # Rank 1's second batch is rows 9..11: the first three rows of day 1.
    np.testing.assert_allclose(rank1[1][0], transform_dense(dense[9:12]))
    expected_ids = hash_categorical(sparse[9:12].view(np.uint32).astype(np.uint64), SIZES)
    for i, key in enumerate(CRITEO_CATEGORICAL_COLUMNS):
        np.testing.assert_array_equal(rank1[1][1][key], expected_ids[:, i])


# ---------------------------------------------------------------- DataModule


def test_datamodule_end_to_end_yields_batches_with_criteo_keys_and_ids_in_range(tmp_path):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    write_tsv(train_dir / "day_0.gz", random_lines(40, seed=1), compress=True)
    write_tsv(train_dir / "day_1", random_lines(40, seed=2))
    val = write_tsv(tmp_path / "val.txt", random_lines(20, seed=3))
    datamodule = CriteoDataModule(
        train_paths=[str(train_dir)], val_paths=[val], max_rows_per_table=100, batch_size=16
    )
    assert datamodule.dense_in_features == 13
    assert datamodule.sparse_feature_names == [f"C{i}" for i in range(1, 27)]
    assert datamodule.dense_feature_names == [f"I{i}" for i in range(1, 14)]
    assert max(datamodule.num_embeddings_per_feature) == 100
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 5
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.dense_features.shape == (16, 13) and batch.dense_features.dtype == torch.float32
        assert batch.labels.shape == (16,)
        assert batch.sparse_features.keys() == CRITEO_CATEGORICAL_COLUMNS
        for key, size in zip(CRITEO_CATEGORICAL_COLUMNS, datamodule.num_embeddings_per_feature, strict=True):
            values = batch.sparse_features[key].values()
            assert len(values) == 16 and int(values.min()) >= 0 and int(values.max()) < size
    assert [len(batch.labels) for batch in datamodule.val_dataloader()] == [16, 4]  # every validation line
    assert datamodule.test_dataloader() == []


def test_datamodule_fails_early_with_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="expected 26 table sizes"):
        CriteoDataModule(train_paths=["x"], num_embeddings_per_feature=[10] * 25)
    with pytest.raises(ValueError, match="format must be one of"):
        CriteoDataModule(train_paths=["x"], format="parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CriteoDataModule(train_paths=["x"], vocabulary_path=str(tmp_path / "missing.npz"))
    missing = CriteoDataModule(train_paths=[str(tmp_path / "day_0")])
    with pytest.raises(FileNotFoundError, match="train_paths: Criteo file .*day_0.* does not exist"):
        missing.setup("fit")
    with pytest.raises(ValueError, match="train_paths: expected at least one"):
        CriteoDataModule(train_paths=[]).setup("fit")
    with pytest.raises(FileNotFoundError, match="day_3_sparse.npy"):
        np.save(tmp_path / "day_3_dense.npy", np.zeros((2, 13), dtype=np.float32))
        CriteoDataModule(train_paths=[str(tmp_path / "day_3")], format="npy").setup("fit")


def test_vocabulary_command_writes_a_file_the_datamodule_reads(tmp_path):
    import subprocess

    from lightning_skew.data.criteo import CriteoDataModule

    path = tmp_path / "day_0"
    lines = ["1\t1\t\t3" + "\t" * 11 + "\t".join(["68fd1e64"] * 26) for _ in range(3)]
    lines.append("0" + "\t" * 14 + "\t".join(["deadbeef"] * 26))
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "vocab.npz"
    result = subprocess.run([sys.executable, "-m", "lightning_skew.cli", "criteo-vocabulary", str(path),
                             "--min-frequency", "2", "--output", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "26 tables, 52 rows" in result.stdout  # per table: row 0 (rare/missing) + the one frequent value
    data = CriteoDataModule(train_paths=[str(path)], vocabulary_path=str(out), batch_size=4)
    assert data.num_embeddings_per_feature == [2] * 26


# ---------------------------------------------------------------- every input read: partial batches, ranks


def numbered_lines(count: int, seed: int = 0) -> list[str]:
    """Random lines whose C1 field is the line's index (so the hashed ID of C1 is 1 + the index, below 96)."""
    numbered = []
    for i, line in enumerate(random_lines(count, seed)):
        fields = line.split("\t")
        fields[14] = f"{i:08x}"
        numbered.append("\t".join(fields))
    return numbered


def c1_ids(batches) -> list[int]:
    """The C1 values of :func:`numbered_lines` (line indices): hashing puts a present value ``v`` below the table's
    size less one on row ``1 + v`` (row 0 is the missing row)."""
    return [int(x) - 1 for batch in batches for x in batch.sparse_features["C1"].values()]


@pytest.mark.parametrize(
    ("num_rows", "world_size", "batch_size", "expected"),
    [
        (24, 2, 4, [8, 8, 8]),  # full global batches only
        (23, 2, 4, [8, 8, 7]),  # a last partial global batch, split 3 + 4
        (25, 2, 4, [8, 8, 9]),  # a remainder (1) smaller than the ranks rides with the batch before it
        (5, 3, 4, [5]),  # shorter than one global batch: one batch of 1 + 2 + 2
        (1999, 1, 2048, [1999]),  # a validation file shorter than the batch size
    ],
)
def test_the_sharding_plan_covers_every_row_once_and_gives_every_rank_as_many_batches(
    num_rows, world_size, batch_size, expected
):
    shardings = [GlobalBatchSharding(batch_size, rank, world_size) for rank in range(world_size)]
    assert shardings[0].plan(num_rows) == expected
    covered = []
    for rows, first in zip(expected, np.cumsum([0] + expected[:-1]), strict=True):
        shares = [sharding.rank_rows(rows) for sharding in shardings]
        assert all(stop > start for start, stop in shares)  # no rank gets an empty batch
        assert max(stop - start for start, stop in shares) - min(stop - start for start, stop in shares) <= 1
        covered += [first + row for start, stop in shares for row in range(start, stop)]
    assert covered == list(range(num_rows))
    dropping = GlobalBatchSharding(batch_size, 0, world_size, drop_last=True)
    assert dropping.plan(num_rows) == [world_size * batch_size] * (num_rows // (world_size * batch_size))


def test_fewer_rows_than_ranks_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="2 inputs cannot be split over 3 ranks"):
        GlobalBatchSharding(4, 0, 3).plan(2)
    path = write_tsv(tmp_path / "val.txt", random_lines(2))
    with pytest.raises(ValueError, match=r"val_paths \(.*val.txt\): 2 inputs cannot be split over 3 ranks"):
        list(CriteoTsvDataset(path, 4, SIZES, rank=1, world_size=3, what="val_paths"))


def test_a_file_shorter_than_the_batch_size_is_one_smaller_batch(tmp_path):
    val = write_tsv(tmp_path / "val.txt", numbered_lines(1999))
    datamodule = CriteoDataModule(train_paths=[val], val_paths=[val], num_embeddings_per_feature=[2000] * 26,
                                  batch_size=2048)
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())
    assert [len(batch.labels) for batch in batches] == [1999]
    assert c1_ids(batches) == list(range(1999))


def test_a_malformed_line_in_the_last_partial_batch_is_read_and_reported(tmp_path):
    lines = random_lines(10)
    lines[9] = lines[9].replace("\t", "\tx", 1)  # label field fine, I1 becomes 'x...'
    path = write_tsv(tmp_path / "day_0", lines)
    with pytest.raises(ValueError, match=r"day_0, line 10: malformed Criteo line: integer feature I1"):
        list(CriteoTsvDataset(path, batch_size=4, num_embeddings_per_feature=SIZES))
    # With two ranks the last global batch (lines 9 and 10) is split: line 10 is rank 1's, found where it lies.
    list(CriteoTsvDataset(path, 2, SIZES, rank=0, world_size=2))
    with pytest.raises(ValueError, match=r"day_0, line 10: "):
        list(CriteoTsvDataset(path, 2, SIZES, rank=1, world_size=2))
    skipping = CriteoTsvDataset(path, batch_size=4, num_embeddings_per_feature=SIZES, skip_malformed=True)
    assert [len(batch.labels) for batch in skipping] == [4, 4, 1] and skipping.num_malformed_lines == 1


def test_an_empty_file_is_a_clear_error_naming_it(tmp_path):
    good = write_tsv(tmp_path / "day_0", random_lines(5))
    empty = write_tsv(tmp_path / "day_1", [])
    empty_gzip = write_tsv(tmp_path / "day_2.gz", [], compress=True)
    for path in (empty, empty_gzip):
        datamodule = CriteoDataModule(train_paths=[good, path], batch_size=4)
        with pytest.raises(ValueError, match=rf"train_paths: Criteo file '{path}' holds no lines"):
            datamodule.setup("fit")
    np.save(tmp_path / "day_5_dense.npy", np.zeros((0, 13), dtype=np.float32))
    np.save(tmp_path / "day_5_sparse.npy", np.zeros((0, 26), dtype=np.int32))
    np.save(tmp_path / "day_5_labels.npy", np.zeros((0, 1), dtype=np.int32))
    with pytest.raises(ValueError, match=r"val_paths: TorchRec npy day '.*day_5_dense.npy' holds no rows"):
        CriteoDataModule(train_paths=[str(tmp_path / "day_5")], val_paths=[str(tmp_path / "day_5")],
                         format="npy").setup("validate")


def test_drop_last_drops_only_the_training_tail_and_counts_it(tmp_path, caplog):
    path = write_tsv(tmp_path / "day_0", random_lines(50))
    datamodule = CriteoDataModule(train_paths=[path], val_paths=[path], batch_size=8, drop_last=True,
                                  num_embeddings_per_feature=SIZES)
    datamodule.setup("fit")
    assert [len(batch.labels) for batch in datamodule.train_dataloader()] == [8] * 6
    assert datamodule.datasets["train"].num_dropped_lines == 2 and datamodule.datasets["train"].num_lines == 50
    assert "drop_last dropped the last 2 inputs" in caplog.text
    assert [len(batch.labels) for batch in datamodule.val_dataloader()] == [8] * 6 + [2]  # never dropped
    default = CriteoDataModule(train_paths=[path], batch_size=8, num_embeddings_per_feature=SIZES)
    default.setup("fit")
    assert [len(batch.labels) for batch in default.train_dataloader()] == [8] * 6 + [2]  # the default trains all
    short = CriteoDataModule(train_paths=[path], batch_size=64, drop_last=True, num_embeddings_per_feature=SIZES)
    short.setup("fit")
    with pytest.raises(ValueError, match=r"train_paths \(.*day_0\): 50 inputs make no complete global batch of 64"):
        list(short.train_dataloader())


def test_the_datamodule_reads_the_lines_build_vocabulary_counts(tmp_path):
    lines = random_lines(37) + random_lines(37)  # every value twice
    lines[35] = "1\t2\n"  # malformed, inside the last partial batch of rank 1
    path = write_tsv(tmp_path / "day_0", lines)
    vocabulary = build_vocabulary(path, min_frequency=2, output_path=str(tmp_path / "vocab.npz"), skip_malformed=True,
                                  progress=False)
    assert vocabulary.metadata["num_lines"] == 74 and vocabulary.metadata["num_malformed_lines"] == 1
    datamodule = CriteoDataModule(train_paths=[path], vocabulary_path=vocabulary.path, batch_size=16,
                                  skip_malformed=True)
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    assert sum(len(batch.labels) for batch in datamodule.train_dataloader()) == 73
    assert dataset.num_lines == 74 and dataset.num_malformed_lines == 1
    # Two ranks (the datasets the DataModule builds on each) read the same lines between them.
    read, malformed = 0, 0
    for rank in range(2):
        dataset = CriteoTsvDataset(path, 16, vocabulary.num_embeddings_per_feature, vocabulary, rank, 2,
                                   skip_malformed=True)
        read += sum(len(batch.labels) for batch in dataset)
        malformed += dataset.num_malformed_lines
    assert read + malformed == vocabulary.metadata["num_lines"]


def test_missing_values_land_on_the_rows_missing_rows_names(tmp_path):
    empty = criteo_line("1", [""] * 13, [""] * 26)
    lines = [empty] + random_lines(9)
    path = write_tsv(tmp_path / "day_0", lines)
    vocab = build_vocabulary(path, min_frequency=1, output_path=str(tmp_path / "vocab.npz"), progress=False)
    for kwargs in ({"num_embeddings_per_feature": SIZES}, {"vocabulary_path": vocab.path}):
        datamodule = CriteoDataModule(train_paths=[path], batch_size=10, **kwargs)
        assert datamodule.missing_rows == {name: 0 for name in CRITEO_CATEGORICAL_COLUMNS}
        datamodule.setup("fit")
        (batch,) = datamodule.train_dataloader()
        for name, row in datamodule.missing_rows.items():
            assert int(batch.sparse_features[name].values()[0]) == row
    # With a vocabulary row 0 is shared with values it does not keep: an unseen value lands there too.
    assert vocab.lookup(np.full((1, 26), 0xDEADBEEF12345, dtype=np.uint64)).tolist() == [[0] * 26]


def test_two_ranks_step_together_on_partial_last_batches_and_validate_every_line(tmp_path, two_ranks):
    import json

    train = write_tsv(tmp_path / "train.txt", numbered_lines(53, seed=4))  # 3 global batches of 16, then 5
    val = write_tsv(tmp_path / "val.txt", numbered_lines(33, seed=5))  # 2 global batches of 16, then 1
    two_ranks("criteo_worker.py", "--train", train, "--val", val, "--batch-size", "8", "--out", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["train"] for r in ranks] == [[8, 8, 8, 2], [8, 8, 8, 3]]
    assert [r["val"] for r in ranks] == [[8, 8], [8, 9]]  # the single last line rides with rank 1's last batch
    assert sorted(ranks[0]["val_ids"] + ranks[1]["val_ids"]) == list(range(33))
    for name in ("val_auc", "val_logloss"):  # scored over both ranks' inputs: the same on each
        assert 0 < ranks[0]["metrics"][name] == ranks[1]["metrics"][name]


def test_a_resumed_pass_leaves_out_the_trained_global_batches_on_every_rank_and_worker(tmp_path):
    path = write_tsv(tmp_path / "day_0", numbered_lines(25))  # 2 ranks x 4: lines [0, 8), [8, 16), [16, 25)

    def lines_of_batches(dataset, skip: int, num_workers: int = 0) -> list[list[int]]:
        dataset.skip_first = skip
        return [c1_ids([batch]) for batch in DataLoader(dataset, batch_size=None, num_workers=num_workers)]

    rank1 = CriteoTsvDataset(path, 4, SIZES, rank=1, world_size=2)
    assert lines_of_batches(rank1, 1, num_workers=2) == [[12, 13, 14, 15], [20, 21, 22, 23, 24]]
    assert lines_of_batches(rank1, 2) == [[20, 21, 22, 23, 24]]  # the last, with the line riding on it
    assert lines_of_batches(rank1, 3) == []  # the whole epoch trained
    assert lines_of_batches(rank1, 0) == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23, 24]]  # once only
    assert lines_of_batches(CriteoTsvDataset(path, 4, SIZES, world_size=2), 2) == [[16, 17, 18, 19]]
    with pytest.raises(ValueError, match="after 4 global batches of 8 lines in this epoch.*only 25 lines"):
        lines_of_batches(rank1, 4)

    rng = np.random.default_rng(0)  # the npy reader: rows 0..14 of one day, the sparse value of C1 its row
    np.save(tmp_path / "day_0_dense.npy", rng.random((15, 13), dtype=np.float32))
    np.save(tmp_path / "day_0_sparse.npy", np.repeat(np.arange(15, dtype=np.int32)[:, None], 26, axis=1))
    np.save(tmp_path / "day_0_labels.npy", rng.integers(0, 2, 15).astype(np.int32))
    npy = CriteoNpyDataset(str(tmp_path / "day_0"), 3, SIZES, rank=1, world_size=2)  # 6, 6, then 3 split 1 + 2
    assert lines_of_batches(npy, 1, num_workers=2) == [[9, 10, 11], [13, 14]]


def test_a_restored_position_skips_in_the_training_loader_only_and_not_after_a_finished_epoch(tmp_path):
    data = CriteoDataModule(train_paths=[write_tsv(tmp_path / "train.txt", numbered_lines(20))],
                            num_embeddings_per_feature=SIZES, batch_size=4)
    data.setup("fit")
    every_batch = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    data.load_state_dict({"position": {"epoch": 0, "position": 2, "global_batch_size": 4, "epoch_length": None}})
    assert [c1_ids([b]) for b in data.train_dataloader().whole_stream()] == every_batch  # a profile sees them all
    assert [c1_ids([b]) for b in data.train_dataloader()] == every_batch[2:]
    assert data.state_dict()["position"]["epoch_length"] == 5  # the pass ran out: its length is known now
    data.load_state_dict({"position": {"epoch": 0, "position": 5, "global_batch_size": 4, "epoch_length": 5}})
    assert [c1_ids([b]) for b in data.train_dataloader()] == every_batch  # saved on the epoch's last batch


def test_a_tsv_fit_resumed_mid_epoch_with_workers_goes_on_as_the_uninterrupted_run(tmp_path):
    train = write_tsv(tmp_path / "train.txt", random_lines(43, seed=6))  # 5 batches of 8, then 3

    def make_data(num_workers: int = 0) -> CriteoDataModule:
        return CriteoDataModule(train_paths=[train], num_embeddings_per_feature=SIZES, batch_size=8,
                                num_workers=num_workers)

    # Checkpoints of a fit in one process, resumed under 2 workers: after step 3 worker 0 must go on with batch 3,
    # worker 1 with batch 4. The TSV's length is unknown before it is read: after step 6 (the epoch's last batch)
    # epoch 1 must start whole.
    assert_resumes_mid_epoch(make_data, tmp_path, steps_per_epoch=6, stop_at=3, from_epoch_end=True, num_workers=2)


def test_a_value_hashing_to_the_missing_slot_is_not_counted_as_missing(tmp_path):
    # Criteo C9's most frequent value a73ee510 is 0 modulo 16: the DLRM reference's `value % rows` put it on row 0,
    # the missing row, and the profile called it missing. Present values now keep off the missing row.
    from lightning_skew.profile import AccessProfile, profile_dataloader

    assert 0xA73EE510 % 16 == 0
    cats = [[f"{i:08x}"] * 8 + ["a73ee510"] + [f"{i:08x}"] * 17 for i in range(9)] + [["1"] * 8 + [""] + ["1"] * 17]
    path = write_tsv(tmp_path / "day_0", [criteo_line("1", ["1"] * 13, c) for c in cats])
    sizes = [50] * 8 + [16] + [50] * 17
    datamodule = CriteoDataModule(train_paths=[path], batch_size=5, num_embeddings_per_feature=sizes)
    datamodule.setup("fit")
    c9 = torch.cat([batch.sparse_features["C9"].values() for batch in datamodule.train_dataloader()])
    assert c9.tolist() == [1 + 0xA73EE510 % 15] * 9 + [0]
    profile = profile_dataloader(AccessProfile.for_datamodule(datamodule), datamodule.train_dataloader(),
                                 progress=False)
    stats = {s.table: s for s in profile.skew()}
    assert stats["C9"].missing_lookups == 1 and stats["C9"].missing_share == pytest.approx(0.1)
