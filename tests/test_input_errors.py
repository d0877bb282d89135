"""Damaged or mismatched input files fail with an error that names the file and the cause: a truncated gzip file
(and where it ends), a UTF-8 byte order mark, a list column where one number per row is expected."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_skew import ColumnarDataModule
from lightning_skew.data.criteo import CriteoTsvDataset

from _support.criteo_files import SIZES, random_lines, write_tsv


def test_a_truncated_gzip_criteo_file_names_the_file_and_the_last_line_read(tmp_path):
    lines = random_lines(3000)
    whole = gzip.compress("".join(lines).encode())
    (tmp_path / "day_0.gz").write_bytes(whole[: len(whole) * 2 // 3])  # a download cut short
    dataset = CriteoTsvDataset([str(tmp_path / "day_0.gz")], batch_size=100, num_embeddings_per_feature=SIZES)
    with pytest.raises(ValueError, match=r"day_0.gz: the file ends early or is damaged after line (\d+) "
                                         r"\(EOFError") as caught:
        list(dataset)
    readable = int(caught.value.args[0].split("after line ")[1].split(" ")[0])
    assert 1000 < readable < 3000  # where it ends: the lines before it were read


def test_a_utf8_byte_order_mark_in_a_criteo_file_is_named(tmp_path):
    lines = random_lines(5)
    path = tmp_path / "day_0"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(lines).encode())
    with pytest.raises(ValueError, match=r"day_0' starts with a UTF-8 byte order mark \(BOM\)"):
        CriteoTsvDataset([str(path)], batch_size=5, num_embeddings_per_feature=SIZES)
    assert len(list(CriteoTsvDataset([write_tsv(tmp_path / "day_1", lines)], batch_size=5,
                                     num_embeddings_per_feature=SIZES))) == 1


def test_a_truncated_gzip_csv_names_the_file(tmp_path):
    whole = gzip.compress("".join(f"{i % 2},s{i % 9},{i}\n" for i in range(20000)).encode())
    (tmp_path / "clicks.csv.gz").write_bytes(whole[: len(whole) // 2])
    module = ColumnarDataModule(train_paths=str(tmp_path / "clicks.csv.gz"), label="click", sparse_features=["site"],
                                dense_features=["price"], batch_size=100,
                                file_format={"column_names": ["click", "site", "price"]})
    with pytest.raises(ValueError, match=r"clicks.csv.gz: the file ends early or is damaged after \d+ rows were "
                                         r"read \(OSError: Truncated compressed stream\)"):
        module.setup("fit")


@pytest.mark.parametrize("column", ["price", "click"])
def test_a_parquet_list_column_where_a_number_is_expected_names_file_and_column(column, tmp_path):
    columns = {"click": [1, 0], "site": ["a", "b"], "price": [1.0, 2.0]}
    columns[column] = pa.array([[1, 0], [0]])
    pq.write_table(pa.table(columns), tmp_path / "clicks.parquet")
    module = ColumnarDataModule(train_paths=str(tmp_path / "clicks.parquet"), label="click",
                                sparse_features=["site"], dense_features=["price"], batch_size=2)
    with pytest.raises(ValueError, match=rf"clicks.parquet, column '{column}': holds list<element: int64> \(several "
                                         r"values per row\) where one number per row is expected"):
        module.setup("fit")
        list(module.train_dataloader())


def test_a_table_too_large_for_memory_is_refused_before_allocating_naming_it():
    from lightning_skew import DLRMModule
    from lightning_skew.core.tables import check_tables_fit_memory

    # 10^10 rows of 16 floats: 640 GB, refused at once (an allocation would fail or take the machine down).
    with pytest.raises(MemoryError, match=r"table 't_cat_0' alone is 10000000000 rows x 16 x 4 bytes = 640.0 GB"):
        DLRMModule([10**10, 10], ["cat_0", "cat_1"], 13, embedding_dim=16, dense_arch_layer_sizes=[32, 16])
    check_tables_fit_memory([("t_a", 1000, 16), ("t_b", 10, 16)], available=65_000)  # 64,640 bytes fit
    with pytest.raises(MemoryError, match=r"need 0.0 GB .*table 't_a' alone is 1000 rows"):
        check_tables_fit_memory([("t_a", 1000, 16), ("t_b", 10, 16)], available=64_000)
