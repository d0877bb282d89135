"""ColumnarDataModule on small files in real formats: CSV, TSV (gzip) and Parquet, Avazu and MovieLens layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightning_skew import ColumnarDataModule
from lightning_skew.data.columnar import (
    MISSING_ROW,
    OUT_OF_VOCABULARY_ROW,
    ColumnarFile,
    FileFormat,
    Join,
    SparseFeature,
    TimeCounts,
    hash_strings,
    resolve_paths,
    time_boundaries,
)

from _support.columnar_files import (
    AVAZU_CATEGORICAL,
    AVAZU_FIRST_ROW,
    MOVIELENS,
    MOVIELENS_MISSING,
    avazu_rows,
    write_avazu,
    write_text,
)
from _support.resume_fit import assert_resumes_mid_epoch

RATINGS_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
RATINGS_NAMES = ["user_id", "item_id", "rating", "timestamp"]


def ratings_file(path: Path, rows: list[tuple], compress: bool = False) -> Path:
    """A RecBole ``.inter`` file (tab-separated, typed header) of ``(user, item, rating, timestamp)`` rows."""
    return write_text(path, RATINGS_HEADER + "".join("\t".join(map(str, row)) + "\n" for row in rows), compress)


def ratings_module(paths, **overrides) -> ColumnarDataModule:
    arguments = dict(train_paths=paths, label={"column": "rating", "threshold": 4},
                     sparse_features=["user_id", "item_id"], file_format=FileFormat(column_names=RATINGS_NAMES),
                     batch_size=4)
    arguments.update(overrides)
    return ColumnarDataModule(**arguments)


def batches(datamodule: ColumnarDataModule, split: str = "train") -> list:
    loader = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader,
              "test": datamodule.test_dataloader}[split]()
    return list(loader)


def ids(batch, feature: str) -> list[int]:
    return batch.sparse_features[feature].values().tolist()


RATINGS = [(1, 10, 5, 100), (2, 10, 3, 101), (1, 11, 4, 102), (3, 12, 1, 103), (2, 10, 4, 104), (1, 12, 2, 105),
           (4, 10, 5, 106), (1, 13, 4, 107)]


# -- formats -----------------------------------------------------------------------------------------------------


def test_tsv_gzip_csv_and_parquet_of_the_same_rows_give_the_same_batches(tmp_path):
    tsv = ratings_file(tmp_path / "r.inter.gz", RATINGS, compress=True)
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("u,i,r,t\n" + "".join(",".join(map(str, row)) + "\n" for row in RATINGS))
    parquet = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user_id": [r[0] for r in RATINGS], "item_id": [str(r[1]) for r in RATINGS],
                             "rating": [float(r[2]) for r in RATINGS], "timestamp": [r[3] for r in RATINGS]}),
                   parquet, row_group_size=3)
    modules = [ratings_module(str(tsv)), ratings_module(str(csv_path)),
               ratings_module(str(parquet), file_format=FileFormat())]
    for module in modules:
        module.setup("fit")
    results = [batches(m) for m in modules]
    assert [len(r) for r in results] == [2, 2, 2]
    for other in results[1:]:
        for mine, theirs in zip(results[0], other, strict=True):
            assert torch.equal(mine.labels, theirs.labels)
            assert torch.equal(mine.sparse_features.values(), theirs.sparse_features.values())
    assert results[0][0].labels.tolist() == [1.0, 0.0, 1.0, 0.0]  # rating >= 4
    assert modules[0].sparse_feature_names == ["user_id", "item_id"]  # the data's own column names


def test_the_real_movielens_files_read_with_their_headers_and_genres():
    if not (MOVIELENS / "ml-100k.inter").is_file():
        pytest.skip(MOVIELENS_MISSING)
    inter = ColumnarFile(str(MOVIELENS / "ml-100k.inter"))
    assert inter.columns == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert inter.delimiter == "\t"
    module = ColumnarDataModule(
        train_paths="ml-100k.inter", root=str(MOVIELENS), label={"column": "rating:float", "threshold": 4},
        sparse_features=["user_id:token", "item_id:token", {"column": "class:token_seq", "delimiter": " "}],
        joins=[{"path": "ml-100k.item", "key": "item_id:token", "columns": ["class:token_seq"]}],
        time_column="timestamp:float", val_fraction=0.2, batch_size=4096)
    assert module.preparation.num_rows == {"train": 79999, "val": 20001, "test": 0}
    genres = module.vocabulary("class:token_seq")
    assert genres.value_of(2) == "Drama" and len(genres.values) == 19  # 18 genres and "unknown"
    module.setup("fit")
    val = batches(module, "val")
    assert sum(len(b.labels) for b in val) == 20001 and len(val[-1].labels) == 20001 % 4096
    first = next(iter(module.train_dataloader()))
    # Line 2 of the file: user 196 rated item 242 (Kolya, a comedy) 3 stars.
    assert first.labels[0] == 0.0
    assert first.sparse_features["class:token_seq"].lengths()[0] == 1
    assert genres.value_of(ids(first, "class:token_seq")[0]) == "Comedy"


def test_avazu_rows_hash_into_bounded_tables_with_minus_one_as_the_missing_row(tmp_path):
    path = write_avazu(tmp_path / "train.csv.gz", [AVAZU_FIRST_ROW, *avazu_rows(99)], compress=True)
    module = ColumnarDataModule(train_paths=str(path), label="click", sparse_features=AVAZU_CATEGORICAL,
                                encoding="hash", num_embeddings=1000, missing_values=["-1"], batch_size=10)
    module.setup("fit")
    assert module.num_embeddings_per_feature == [1000] * 21
    assert module.missing_rows == dict.fromkeys(AVAZU_CATEGORICAL, MISSING_ROW)
    loaded = batches(module)
    assert len(loaded) == 10
    first = loaded[0]
    c20 = ids(first, "C20")
    assert c20[0] == MISSING_ROW  # the published first row has C20 = -1
    assert all(1 <= row < 1000 for feature in AVAZU_CATEGORICAL if feature != "C20" for row in ids(first, feature))
    # Hashing depends on the value only: the same site in another row lands on the same row.
    assert ids(first, "site_category")[0] == ids(first, "site_category")[1]  # both 28905ebd
    assert first.dense_features.shape == (10, 0)


# -- encoding ----------------------------------------------------------------------------------------------------


def test_vocabulary_rows_follow_frequency_with_a_threshold_and_an_out_of_vocabulary_row(tmp_path):
    rows = [(1, 10, 5, t) for t in range(5)] + [(2, 11, 5, t) for t in range(5, 8)] + [(3, 12, 5, 8), (9, 0, 5, 9)]
    path = ratings_file(tmp_path / "r.inter", rows)
    module = ratings_module(str(path), sparse_features=[{"column": "item_id", "min_frequency": 2}, "user_id"],
                            batch_size=10)
    items = module.vocabulary("item_id")
    assert items.values.to_pylist() == ["10", "11"]  # 12 and 0 are seen once
    assert module.num_embeddings_per_feature == [4, 6]  # missing, out-of-vocabulary, kept values
    module.setup("fit")
    (batch,) = batches(module)
    assert ids(batch, "item_id") == [2] * 5 + [3] * 3 + [OUT_OF_VOCABULARY_ROW] * 2
    capped = ratings_module(str(path), sparse_features=["item_id"], num_embeddings=3, batch_size=10)
    assert capped.num_embeddings_per_feature == [3]  # only the most frequent value keeps a row
    capped.setup("fit")
    assert ids(batches(capped)[0], "item_id") == [2] * 5 + [OUT_OF_VOCABULARY_ROW] * 5


def test_values_unseen_in_training_are_out_of_vocabulary_in_validation(tmp_path):
    train = ratings_file(tmp_path / "train.inter", RATINGS)
    val = ratings_file(tmp_path / "val.inter", [(1, 10, 5, 200), (77, 99, 5, 201)])
    module = ratings_module(str(train), val_paths=str(val), batch_size=4)
    module.setup("fit")
    (batch,) = batches(module, "val")
    users = module.vocabulary("user_id")
    assert ids(batch, "user_id") == [users.rows_of(pa.array(["1"]))[0], OUT_OF_VOCABULARY_ROW]
    assert users.value_of(ids(batch, "user_id")[0]) == "1"


def test_multi_hot_genres_from_delimited_strings_and_parquet_lists_give_the_same_lookups(tmp_path):
    genres = ["Action|Comedy", "Drama", "", "Comedy|Drama|", "Action"]
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("click,movie,genres\n" + "".join(f"{i % 2},{i},{g}\n" for i, g in enumerate(genres)))
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"click": [i % 2 for i in range(5)], "movie": list(range(5)),
                             "genres": [[t for t in g.split("|") if t] for g in genres]}), parquet)
    lookups = []
    for path, feature in ((csv_path, {"column": "genres", "delimiter": "|"}), (parquet, "genres")):
        module = ColumnarDataModule(train_paths=str(path), label="click", sparse_features=["movie", feature],
                                    batch_size=5)
        module.setup("fit")
        (batch,) = batches(module)
        kjt = batch.sparse_features["genres"]
        lookups.append((kjt.lengths().tolist(), [module.vocabulary("genres").value_of(r) for r in kjt.values().tolist()]))
    assert lookups[0] == lookups[1]
    # The empty string and the trailing delimiter are no IDs: an input may have none.
    assert lookups[0] == ([2, 1, 0, 2, 1], ["Action", "Comedy", "Drama", "Comedy", "Drama", "Action"])


def test_a_join_adds_the_side_tables_columns_and_counts_keys_it_lacks(tmp_path, caplog):
    path = ratings_file(tmp_path / "r.inter", RATINGS)
    items = tmp_path / "items.csv"
    items.write_text("item_id,genre\n10,Drama\n11,Comedy\n12,Drama\n")  # no item 13
    module = ratings_module(str(path), sparse_features=["user_id", "genre"], batch_size=8,
                            joins=[Join(path=str(items), key="item_id", columns=["genre"])])
    assert module.preparation.counts.unmatched == {str(items): 1}
    module.setup("fit")
    (batch,) = batches(module)
    genre = module.vocabulary("genre")
    assert [genre.value_of(r) for r in ids(batch, "genre")] == ["Drama", "Drama", "Comedy", "Drama", "Drama",
                                                                 "Drama", "Drama", None]
    assert ids(batch, "genre")[-1] == MISSING_ROW
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("item_id,genre\n10,Drama\n10,Comedy\n")
    with pytest.raises(ValueError, match=r"repeated.csv: the join key 'item_id' repeats"):
        ratings_module(str(path), sparse_features=["genre"], joins=[Join(str(repeated), "item_id", ["genre"])]
                       ).setup("fit")


def test_dense_features_are_log1p_counts_and_missing_values_are_zero(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("click,count,score,ad\n1,3,0.5,a\n0,,-2,b\n1,-4,,a\n")
    module = ColumnarDataModule(train_paths=str(path), label="click", sparse_features=["ad"],
                                dense_features=["count", {"column": "score", "transform": "none"}], batch_size=3)
    assert module.dense_in_features == 2
    module.setup("fit")
    (batch,) = batches(module)
    expected = torch.tensor([[np.log1p(3.0), 0.5], [0.0, -2.0], [0.0, 0.0]], dtype=torch.float32)
    torch.testing.assert_close(batch.dense_features, expected)


# -- splits and sharding -----------------------------------------------------------------------------------------


def test_the_time_split_holds_out_the_latest_rows_and_ties_go_to_the_later_split(tmp_path):
    # File order is not time order; time 7 holds two rows that must fall together.
    times = [5, 1, 7, 3, 9, 7, 0, 2, 4, 6]
    rows = [(u, 10 + u, 5, t) for u, t in enumerate(times)]
    path = ratings_file(tmp_path / "r.inter", rows)
    module = ratings_module(str(path), time_column="timestamp", val_fraction=0.2, test_fraction=0.1, batch_size=2,
                            dense_features=[{"column": "timestamp", "transform": "none"}], drop_last=True)
    boundaries = module.preparation.boundaries
    assert (boundaries.val_start, boundaries.test_start) == (7.0, 9.0)
    assert module.preparation.num_rows == {"train": 7, "val": 2, "test": 1}
    module.setup("fit")

    def times_of(batch_list) -> list[int]:
        return [int(t) for b in batch_list for t in b.dense_features[:, 0].tolist()]

    assert times_of(batches(module)) == [5, 1, 3, 0, 2, 4]  # 3 complete batches of 2, in file order
    assert sorted(times_of(batches(module, "val"))) == [7, 7]
    module.setup("test")
    test = batches(module, "test")
    assert [len(b.labels) for b in test] == [1]
    # The vocabulary is counted over training rows only: held-out users have no row of their own.
    assert ids(test[0], "user_id") == [OUT_OF_VOCABULARY_ROW]


def test_time_boundaries_take_shares_of_the_rows_in_time_order():
    counts = TimeCounts()
    counts.update(np.array([3.0, 1.0, 2.0, 4.0]))
    counts.update(np.array([4.0, 4.0, 5.0, 6.0, 7.0, 8.0]))
    assert counts.times.tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and counts.num_rows == 10
    boundaries = time_boundaries(counts, 0.2, 0.2, "t")
    # Sorted: 1 2 3 4 4 4 | 5 6 | 7 8: the first held-out rows are the 7th and the 9th.
    assert (boundaries.val_start, boundaries.test_start) == (5.0, 7.0)
    assert boundaries.num_rows == {"train": 6, "val": 2, "test": 2}
    with pytest.raises(ValueError, match="the val split by 't' is empty"):
        single = TimeCounts()
        single.update(np.array([1.0, 2.0, 2.0, 2.0]))
        time_boundaries(single, 0.3, 0.2, "t")
    # An Avazu file of one hour: no fraction can help; the error says what can.
    one_hour = TimeCounts()
    one_hour.update(np.full(8, 14102100.0))
    with pytest.raises(ValueError, match=r"all rows share one 'hour' value, so a time split cannot cut them: give "
                                         r"val_paths / test_paths"):
        time_boundaries(one_hour, 0.1, 0.0, "hour")


def test_every_rank_gets_as_many_batches_and_validation_sees_every_input_once(tmp_path):
    path = write_avazu(tmp_path / "train.csv", avazu_rows(103))
    val = write_avazu(tmp_path / "val.csv", avazu_rows(23, seed=1))
    seen = {}
    for world_size in (1, 2, 3):
        per_rank = []
        for rank in range(world_size):
            module = ColumnarDataModule(train_paths=str(path), val_paths=str(val), label="click",
                                        sparse_features=AVAZU_CATEGORICAL, encoding="hash", num_embeddings=10**6,
                                        batch_size=4, drop_last=True)
            module.trainer = None
            module.rank_and_world_size = lambda r=rank, w=world_size: (r, w)  # as a Trainer would say
            module.setup("fit")
            per_rank.append((batches(module), batches(module, "val")))
        assert len({len(train) for train, _ in per_rank}) == 1  # the same number of training batches on every rank
        assert len(per_rank[0][0]) == 103 // (4 * world_size)
        assert len({len(v) for _, v in per_rank}) == 1
        val_ids = sorted(i for _, v in per_rank for b in v for i in ids(b, "device_ip"))
        assert len(val_ids) == 23  # every validation input, once
        seen[world_size] = val_ids
    assert seen[1] == seen[2] == seen[3]
    # 23 = 1 global batch of 3 x 4 and 11 rows: the ranks share the last rows 3 / 4 / 4.
    assert [len(v[-1].labels) for _, v in per_rank] == [3, 4, 4]


def test_dataloader_workers_yield_the_batches_of_one_process(tmp_path):
    path = write_avazu(tmp_path / "train.csv", avazu_rows(200))
    module = ColumnarDataModule(train_paths=str(path), label="click", sparse_features=AVAZU_CATEGORICAL,
                                encoding="hash", num_embeddings=5000, batch_size=16, drop_last=True)
    module.setup("fit")
    plain = batches(module)
    module.num_workers = 2
    with_workers = batches(module)
    assert len(plain) == len(with_workers) == 12
    for mine, theirs in zip(plain, with_workers, strict=True):
        assert torch.equal(mine.sparse_features.values(), theirs.sparse_features.values())
        assert torch.equal(mine.labels, theirs.labels)


# -- errors ------------------------------------------------------------------------------------------------------


def test_a_missing_column_names_the_file_and_the_columns_it_has(tmp_path):
    path = write_avazu(tmp_path / "train.csv", avazu_rows(5))
    module = ColumnarDataModule(train_paths=str(path), label="clicked", sparse_features=["site_id", "site"],
                                encoding="hash", num_embeddings=10)
    with pytest.raises(ValueError) as error:
        module.setup("fit")
    message = str(error.value)
    assert "train.csv: no column 'clicked' (the label), 'site' (a sparse feature)" in message
    assert "the file has columns ['id', 'click', 'hour'" in message


def test_an_empty_training_file_is_an_error_naming_it(tmp_path):
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("click,site\n")
    with pytest.raises(ValueError, match=r"header_only.csv: no rows \(training file\)"):
        ColumnarDataModule(train_paths=str(header_only), label="click", sparse_features=["site"]).setup("fit")
    zero_bytes = tmp_path / "zero.csv"
    zero_bytes.write_text("")
    with pytest.raises(ValueError, match=r"zero.csv: the file is empty"):
        ColumnarDataModule(train_paths=str(zero_bytes), label="click", sparse_features=["site"]).setup("fit")


def test_malformed_lines_name_the_file_and_line_or_are_skipped_and_counted(tmp_path):
    lines = ["click,site,price", "1,a,3", "0,b,4", "1,c", "0,d,x", "2,e,1", "1,f,2", ""]
    path = tmp_path / "dirty.csv"
    path.write_text("\n".join(lines) + "\n")

    def module(**extra) -> ColumnarDataModule:
        return ColumnarDataModule(train_paths=str(path), label="click", sparse_features=["site"],
                                  dense_features=["price"], batch_size=1, **extra)

    with pytest.raises(ValueError, match=r"dirty.csv, line 4: expected 3 fields separated by ',' .* found 2"):
        module().setup("fit")
    path.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # the short line removed: now line 4 is 'x'
    with pytest.raises(ValueError, match=r"dirty.csv, line 4, column 'price': not a number: 'x'"):
        module().setup("fit")
    path.write_text("\n".join(lines[:3] + lines[5:]) + "\n")
    with pytest.raises(ValueError, match=r"dirty.csv, line 4, column 'click': the label must be 0 or 1"):
        module().setup("fit")
    path.write_text("\n".join(lines) + "\n")
    skipping = module(skip_malformed=True)
    counts = skipping.preparation.counts
    assert (counts.malformed, counts.empty) == (3, 1)  # the short line, 'x', the label 2; and the blank line
    assert counts.examples[0] == f"{path}, line 4: expected 3 fields, found 2"
    assert counts.examples[1] == f"{path}, line 5, column 'price': not a number: 'x'"
    assert counts.examples[2].startswith(f"{path}, line 6, column 'click': the label must be 0 or 1")
    skipping.setup("fit")
    sites = skipping.vocabulary("site")
    assert [sites.value_of(r) for b in batches(skipping) for r in ids(b, "site")] == ["a", "b", "f"]
    assert skipping.preparation.num_rows["train"] == 3


def test_hash_strings_is_deterministic_and_tells_long_values_apart():
    values = pa.array(["a", "ab", "abcdefgh", "abcdefghi", "abcdefghj", "", None, "x" * 40 + "1", "x" * 40 + "2"])
    hashes = hash_strings(values)
    assert len(set(hashes[:6].tolist())) == 6 and hashes[7] != hashes[8]
    assert hashes[5] == hashes[6]  # a null hashes as the empty string
    assert np.array_equal(hash_strings(values.slice(2, 3)), hashes[2:5])  # a slice hashes as its values
    assert np.array_equal(hash_strings(pa.array(["abcdefgh"])), hashes[2:3])


def test_settings_that_contradict_each_other_are_errors_at_construction(tmp_path):
    common = dict(train_paths="x.csv", label="click")
    with pytest.raises(ValueError, match="hashing needs num_embeddings of at least 2"):
        ColumnarDataModule(**common, sparse_features=[SparseFeature("site", encoding="hash")])
    with pytest.raises(ValueError, match="label column 'click' is also a feature"):
        ColumnarDataModule(**common, sparse_features=["click"])
    with pytest.raises(ValueError, match="give either val_paths or val_fraction"):
        ColumnarDataModule(**common, sparse_features=["site"], time_column="t", val_fraction=0.1, val_paths="v.csv")
    with pytest.raises(ValueError, match="name the time_column"):
        ColumnarDataModule(**common, sparse_features=["site"], val_fraction=0.1)


def test_two_processes_train_as_many_steps_and_validate_every_input_even_with_an_empty_last_batch(tmp_path,
                                                                                                   two_ranks):
    train = write_avazu(tmp_path / "train.csv", avazu_rows(1000))
    # 2 ranks x 64 = 128 rows a global batch: 257 validation rows leave 1 row, so one rank's last batch is empty.
    val = write_avazu(tmp_path / "val.csv", avazu_rows(257, seed=1))
    two_ranks("columnar_worker.py", "--train", str(train), "--val", str(val), "--out", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Every training row too: 7 global batches of 128, then 104 rows shared 52 / 52.
    assert ranks[0]["train"] == ranks[1]["train"] == [64] * (1000 // 128) + [52]
    assert [r["val"] for r in ranks] == [[64, 64, 0], [64, 64, 1]]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and 0 < ranks[0]["metrics"]["val_auc"] < 1


def test_a_folder_or_a_glob_names_its_files_in_natural_order_and_their_rows_follow_in_it(tmp_path):
    folder = tmp_path / "days"
    folder.mkdir()
    for day in (10, 2, 1):
        ratings_file(folder / f"day_{day}.inter", [(day, 10, 5, day)])
    (folder / ".hidden").write_text("not data")
    expected = [str(folder / f"day_{day}.inter") for day in (1, 2, 10)]
    assert resolve_paths(str(folder)) == resolve_paths(str(folder / "day_*.inter")) == expected
    module = ratings_module("days", root=str(tmp_path), batch_size=1)
    module.setup("fit")
    users = module.vocabulary("user_id")
    assert [users.value_of(ids(b, "user_id")[0]) for b in batches(module)] == ["1", "2", "10"]
    with pytest.raises(FileNotFoundError, match=r"train_paths: .*day_\*.csv' matches no file"):
        ratings_module(str(folder / "day_*.csv")).setup("fit")


# -- resume ------------------------------------------------------------------------------------------------------


def test_a_csv_fit_resumed_mid_epoch_with_workers_goes_on_as_the_uninterrupted_run(tmp_path):
    path = write_avazu(tmp_path / "train.csv", avazu_rows(52))  # 6 global batches of 8 (drop_last drops the 4 left)

    def make_data(num_workers: int = 0) -> ColumnarDataModule:
        return ColumnarDataModule(train_paths=str(path), label="click", sparse_features=AVAZU_CATEGORICAL[:6],
                                  dense_features=["C15", "C16"], encoding="hash", num_embeddings=200, batch_size=8,
                                  num_workers=num_workers, drop_last=True)

    # Stopped after step 3 under 2 workers: worker 0 must go on with batch 3, worker 1 with batch 4.
    assert_resumes_mid_epoch(make_data, tmp_path, steps_per_epoch=6, stop_at=3, num_workers=2)


def test_training_reads_every_row_by_default_and_drop_last_leaves_the_partial_batch_out(tmp_path, caplog):
    # 21 rows in batches of 8: 8, 8 and 5 (an Avazu file of 8,087 rows lost its last 1,943 before).
    from lightning_skew.profile import AccessProfile, profile_dataloader

    path = write_avazu(tmp_path / "train.csv", avazu_rows(21))

    def module(**kwargs) -> ColumnarDataModule:
        data = ColumnarDataModule(train_paths=str(path), label="click", sparse_features=AVAZU_CATEGORICAL[:3],
                                  encoding="hash", num_embeddings=100, batch_size=8, **kwargs)
        data.setup("fit")
        return data

    data = module()
    assert [len(b.labels) for b in data.train_dataloader()] == [8, 8, 5] and len(data.train_dataloader()) == 3
    profile = profile_dataloader(AccessProfile.for_datamodule(data, sample_fraction=1.0), data.train_dataloader(),
                                 progress=False)
    assert (profile.num_inputs_seen, profile.num_inputs_counted) == (21, 21)
    dropping = module(drop_last=True)
    assert [len(b.labels) for b in dropping.train_dataloader()] == [8, 8]
    assert "5 rows after the last complete global batch of 8 were left out" in caplog.text


def test_every_rank_trains_as_many_nonempty_batches_and_together_they_read_every_row(tmp_path):
    # 21 rows, 8 per rank: 2 ranks share the last 5 as 2 + 3, 3 ranks take 7 each. 17 rows over 2 ranks leave 1 row
    # after the last global batch, fewer than ranks: it cannot make a batch on every rank and is left out.
    for rows, world_size, expected in ((21, 2, [[8, 2], [8, 3]]), (21, 3, [[7], [7], [7]]), (17, 2, [[8], [8]])):
        path = write_avazu(tmp_path / f"train{rows}.csv", avazu_rows(rows))
        per_rank = []
        for rank in range(world_size):
            module = ColumnarDataModule(train_paths=str(path), label="click", sparse_features=AVAZU_CATEGORICAL,
                                        encoding="hash", num_embeddings=10**6, batch_size=8)
            module.trainer = None
            module.rank_and_world_size = lambda r=rank, w=world_size: (r, w)
            module.setup("fit")
            per_rank.append([len(b.labels) for b in batches(module)])
            assert len(module.train_dataloader()) == len(expected[0])
        assert per_rank == expected
