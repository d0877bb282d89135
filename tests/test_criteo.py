"""Tests of the Criteo TSV / npy readers and CriteoDataModule on small files written in the real formats."""

from __future__ import annotations

import gzip
import math
import random
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
    build_vocabulary,
    hash_categorical,
    parse_tsv_lines,
    transform_dense,
)
from lightning_skew.data.features import CRITEO_SPARSE_NAMES

SIZES = [97, 1000, 13, 7] + [50] * 22


def criteo_line(label: str, dense: list[str], categorical: list[str]) -> str:
    assert len(dense) == 13 and len(categorical) == 26
    return "\t".join([label, *dense, *categorical]) + "\n"


def random_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        dense = ["" if rng.random() < 0.2 else str(rng.randint(-3, 3000)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.getrandbits(32):08x}" for _ in range(26)]
        lines.append(criteo_line(str(rng.randint(0, 1)), dense, cats))
    return lines


def write_tsv(path: Path, lines: list[str], compress: bool = False) -> str:
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


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
    ids = hash_categorical(parsed.categorical, SIZES)
    # Missing is the value 0 before hashing (DLRM reference), so it lands on row 0.
    np.testing.assert_array_equal(ids[0, :4], [0, 0x0A1B2C3D % 1000, 0xFFFFFFFF % 13, 0])
    assert ids[0, 4] == 0x68FD1E64 % 50


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
    assert len(reference) == 6  # 50 lines -> 6 complete batches of 8
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
    assert len(single) == 4  # 47 lines -> only the 4 complete global batches of 10
    assert [len(batches) for batches in per_rank] == [4, 4]
    for step, (dense, sparse, labels) in enumerate(single):
        np.testing.assert_array_equal(dense, np.concatenate([per_rank[r][step][0] for r in range(2)]))
        np.testing.assert_array_equal(labels, np.concatenate([per_rank[r][step][2] for r in range(2)]))
        for key in CRITEO_SPARSE_NAMES:
            np.testing.assert_array_equal(sparse[key], np.concatenate([per_rank[r][step][1][key] for r in range(2)]))


def test_dataloader_workers_keep_the_batch_order(tmp_path):
    path = write_tsv(tmp_path / "day_0", random_lines(70))
    dataset = CriteoTsvDataset(path, batch_size=4, num_embeddings_per_feature=SIZES, rank=1, world_size=2)
    in_process = batches_as_arrays(DataLoader(dataset, batch_size=None, num_workers=0))
    with_workers = batches_as_arrays(DataLoader(dataset, batch_size=None, num_workers=2))
    assert len(in_process) == 8  # 70 // (2 * 4)
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
        for key, size in zip(CRITEO_SPARSE_NAMES, sizes, strict=True):
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
    assert len(npy) == len(tsv_batches) == 4
    stored_dense = np.load(f"{prefix}_dense.npy")
    for step, ((dense, sparse, labels), (_, tsv_sparse, tsv_labels)) in enumerate(zip(npy, tsv_batches, strict=True)):
        np.testing.assert_array_equal(labels, tsv_labels)
        # TorchRec already log-transformed the dense features: they are used as stored.
        np.testing.assert_array_equal(dense, stored_dense[step * 7 : (step + 1) * 7])
        for key in CRITEO_SPARSE_NAMES:
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
    assert [len(d) for d in datasets] == [2, 2]  # 15 rows -> 2 complete global batches of 6
    rank1 = batches_as_arrays(DataLoader(datasets[1], batch_size=None, num_workers=0))
    # Rank 1's second batch is rows 9..11: the first three rows of day 1.
    np.testing.assert_allclose(rank1[1][0], transform_dense(dense[9:12]))
    expected_ids = hash_categorical(sparse[9:12].view(np.uint32).astype(np.uint64), SIZES)
    for i, key in enumerate(CRITEO_SPARSE_NAMES):
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
    assert datamodule.sparse_feature_names == CRITEO_SPARSE_NAMES
    assert max(datamodule.num_embeddings_per_feature) == 100
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 5
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.dense_features.shape == (16, 13) and batch.dense_features.dtype == torch.float32
        assert batch.labels.shape == (16,)
        assert batch.sparse_features.keys() == CRITEO_SPARSE_NAMES
        for key, size in zip(CRITEO_SPARSE_NAMES, datamodule.num_embeddings_per_feature, strict=True):
            values = batch.sparse_features[key].values()
            assert len(values) == 16 and int(values.min()) >= 0 and int(values.max()) < size
    assert len(list(datamodule.val_dataloader())) == 1
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
    import sys

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
