"""Columnar files: resolving paths, reading Parquet and CSV/TSV (plain or compressed) in chunks, by line."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lightning_skew.data.columnar.spec import FileFormat
from lightning_skew.data.criteo.files import _expand

__all__ = ["ColumnarFile", "MalformedRow", "resolve_paths"]

# Magic bytes of the compressions pyarrow reads natively.
_COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))
_PARQUET_MAGIC = b"PAR1"
# CSV is parsed in blocks of this many bytes (pyarrow's streaming reader keeps a few in memory).
CSV_BLOCK_BYTES = 1 << 22
PARQUET_BATCH_ROWS = 1 << 16
# Skipped malformed lines numbered for the log (numbering them costs a second read of the file).
_NUMBERED_EXAMPLES = 3


def resolve_paths(paths: Sequence[str] | str, what: str = "paths", root: str | None = None) -> list[str]:
    """Files named by ``paths`` (files, directories or globs; relative ones under ``root`` when given), in order.

    A directory stands for its non-hidden files in natural order (``part-2`` before ``part-10``), as for the
    Criteo files. Raises when nothing is named, a pattern matches nothing, or a file does not exist.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError(f"{what}: expected at least one file, got an empty list")
    files: list[str] = []
    for path in paths:
        if root is not None and not os.path.isabs(path):
            path = os.path.join(root, path)
        expanded = [p for p in _expand(path) if os.path.isfile(p) or not os.path.isdir(path)]
        if not expanded:
            raise FileNotFoundError(f"{what}: {path!r} matches no file")
        missing = [file for file in expanded if not os.path.isfile(file)]
        if missing:
            raise FileNotFoundError(f"{what}: file {missing[0]!r} does not exist")
        files.extend(expanded)
    return files


def _compression(path: str) -> str | None:
    with open(path, "rb") as probe:
        magic = probe.read(4)
    for prefix, codec in _COMPRESSIONS:
        if magic.startswith(prefix):
            return codec
    return None


@dataclass(frozen=True)
class MalformedRow:
    """A CSV line with the wrong number of fields: its 1-based line (``None`` until located) and text."""

    line: int | None
    expected_columns: int
    actual_columns: int
    text: str


class ColumnarFile:
    """One Parquet or CSV file: its columns, its rows in chunks of the columns asked for, and where a row lies.

    CSV values are read as strings (the decoders convert them, so that a bad value can be reported with its
    line); Parquet columns keep their types. Rows are counted from 0 in file order; :meth:`where` turns a row's
    index into ``"line N"`` (CSV, 1-based physical lines, the header included) or ``"row N"`` (Parquet).

    Args:
        path: The file.
        file_format: How to read it (:class:`~lightning_skew.data.columnar.FileFormat`).

    Example::

        file = ColumnarFile("ml-100k.inter", FileFormat(column_names=["user_id", "item_id", "rating", "time"]))
        file.require(["user_id", "rating"], "the label and features")
        for first_row, table in file.chunks(["user_id", "rating"]):
            ...
    """

    def __init__(self, path: str, file_format: FileFormat | None = None) -> None:
        self.path = path
        self.file_format = file_format or FileFormat()
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: the file is empty")
        with open(path, "rb") as probe:
            is_parquet = probe.read(4) == _PARQUET_MAGIC
        kind = self.file_format.format
        if kind == "auto":
            kind = "parquet" if is_parquet else "csv"
        if kind == "parquet" and not is_parquet:
            raise ValueError(f"{path}: not a Parquet file (it does not start with PAR1); set file_format.format")
        self.kind = kind
        self.compression: str | None = None
        self.delimiter = ","
        self._header_lines = 0
        self._parquet_file: pq.ParquetFile | None = None
        if kind == "parquet":
            self.columns = list(self._parquet.schema_arrow.names)
            if self.file_format.column_names is not None:
                raise ValueError(f"{path}: column_names is for CSV files; a Parquet file names its columns")
        else:
            self.compression = _compression(path)
            self.columns = self._csv_columns()

    @property
    def _parquet(self) -> pq.ParquetFile:
        if self._parquet_file is None:
            self._parquet_file = pq.ParquetFile(self.path)
        return self._parquet_file

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy: the open Parquet handle stays here, they open their own.
        return {**self.__dict__, "_parquet_file": None}

    # -- CSV header -------------------------------------------------------------------------------------------

    def _open_stream(self) -> pa.NativeFile:
        return pa.input_stream(self.path, compression=self.compression)

    def _first_line(self) -> str:
        with self._open_stream() as stream:
            data = b""
            while b"\n" not in data:
                block = stream.read(1 << 16)
                if not block:
                    break
                data += block
        line = data.split(b"\n", 1)[0].rstrip(b"\r")
        try:
            return line.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path}, line 1: not UTF-8 text ({error}); is the format right?") from None

    def _csv_columns(self) -> list[str]:
        fmt = self.file_format
        first = self._first_line()
        self.delimiter = fmt.delimiter or ("\t" if "\t" in first else ",")
        if not first.strip() and fmt.header:
            raise ValueError(f"{self.path}, line 1: the header line is empty")
        header = next(csv.reader(io.StringIO(first), delimiter=self.delimiter)) if first else []
        self._header_lines = 1 if fmt.header else 0
        if fmt.column_names is None:
            return header
        if fmt.header and len(header) != len(fmt.column_names):
            raise ValueError(f"{self.path}, line 1: the header has {len(header)} columns ({header}) but "
                             f"column_names gives {len(fmt.column_names)} ({fmt.column_names})")
        return list(fmt.column_names)

    # -- columns and rows -------------------------------------------------------------------------------------

    def require(self, columns: Sequence[str] | dict[str, str], what: str = "asked for") -> None:
        """Raise ``ValueError`` naming this file and its columns unless it holds every one of ``columns``
        (a list, or a dict from column to its role, which the message then names)."""
        roles = columns if isinstance(columns, dict) else dict.fromkeys(columns, what)
        missing = [f"{column!r} ({role})" for column, role in roles.items() if column not in self.columns]
        if missing:
            raise ValueError(f"{self.path}: no column {', '.join(missing)}; the file has columns {self.columns}")

    def num_rows(self) -> int | None:
        """Rows in the file when known without reading it (Parquet metadata), else ``None``."""
        return self._parquet.metadata.num_rows if self.kind == "parquet" else None

    def chunks(self, columns: Sequence[str], malformed: list[MalformedRow] | None = None,
               use_threads: bool = True, dictionary_columns: Sequence[str] = ()) -> Iterator[tuple[int, pa.Table]]:
        """``(first_row, table)`` per chunk of ``columns``, in file order.

        ``dictionary_columns`` (text columns) are read as dictionary arrays, which spares materialising each
        value: categorical columns repeat few values many times. CSV lines with the wrong number of fields are
        left out and appended to ``malformed`` (their lines located); without a list they raise ``ValueError``
        naming the file and line.
        """
        self.require(columns)
        if self.kind == "parquet":
            schema = self._parquet.schema_arrow
            text = [c for c in dictionary_columns if pa.types.is_string(schema.field(c).type)
                    or pa.types.is_large_string(schema.field(c).type)]
            parquet = pq.ParquetFile(self.path, read_dictionary=text) if text else self._parquet
            first = 0
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(columns),
                                              use_threads=use_threads):
                yield first, pa.Table.from_batches([batch])
                first += batch.num_rows
            return
        found: list[MalformedRow] = []
        first = 0
        located = 0
        try:
            reader = self._csv_reader(columns, found, use_threads, dictionary_columns)
        except OSError as error:  # the first block is read at once
            raise self._damaged(error, first) from None
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except OSError as error:  # a truncated or damaged compressed stream (pyarrow names no file)
                    raise self._damaged(error, first) from None
                if found[located:]:
                    self._report_malformed(found, located, malformed)
                    located = len(found)
                yield first, pa.Table.from_batches([batch])
                first += batch.num_rows
        finally:
            reader.close()
        if found[located:]:
            self._report_malformed(found, located, malformed)

    def _damaged(self, error: OSError, rows_read: int) -> ValueError:
        return ValueError(f"{self.path}: the file ends early or is damaged after {rows_read} rows were read "
                          f"({type(error).__name__}: {error}); a truncated copy or download? Copy it again")

    def _csv_reader(self, columns: Sequence[str], found: list[MalformedRow], use_threads: bool,
                    dictionary_columns: Sequence[str] = ()) -> pacsv.CSVStreamingReader:
        def record(row) -> str:
            found.append(MalformedRow(row.number, row.expected_columns, row.actual_columns, row.text))
            return "skip"

        dictionary = pa.dictionary(pa.int32(), pa.string())
        types = {c: dictionary if c in dictionary_columns else pa.string() for c in columns}
        return pacsv.open_csv(
            self._open_stream(),
            read_options=pacsv.ReadOptions(column_names=self.columns, skip_rows=self._header_lines,
                                           block_size=CSV_BLOCK_BYTES, use_threads=use_threads),
            # Blank lines stay rows (of empty values), so that every physical line is counted.
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter, invalid_row_handler=record,
                                             ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(include_columns=list(columns), column_types=types),
        )

    def _report_malformed(self, found: list[MalformedRow], start: int, malformed: list[MalformedRow] | None) -> None:
        new = found[start:]
        if any(row.line is None for row in new) and start < _NUMBERED_EXAMPLES:
            # The threaded reader neither numbers rows nor reports them in order: read again, by one thread
            # (for the error, or the first few skipped lines the log shows; the others are only counted).
            new = self._malformed_rows(len(found))[start:]
        if malformed is None:
            row = new[0]
            raise ValueError(
                f"{self.path}, line {row.line}: expected {row.expected_columns} fields separated by "
                f"{self.delimiter!r} ({self.columns}), found {row.actual_columns}: {_shown(row.text)} "
                "(pass skip_malformed=True to skip and count such lines)")
        malformed.extend(new)

    def _malformed_rows(self, count: int) -> list[MalformedRow]:
        """The first ``count`` malformed rows in file order, numbered (read again by one thread)."""
        found: list[MalformedRow] = []
        reader = self._csv_reader(self.columns[:1], found, use_threads=False)
        try:
            for _ in reader:
                if len(found) >= count:
                    break
        finally:
            reader.close()
        return found[:count]

    def where(self, row: int) -> str:
        """``"line N"`` (CSV) or ``"row N"`` (Parquet) of the row with index ``row`` (from 0, as in :meth:`chunks`)."""
        if self.kind == "parquet":
            return f"row {row + 1}"
        # Count the malformed lines before it: they are left out of the row indices.
        found: list[MalformedRow] = []
        reader = self._csv_reader(self.columns[:1], found, use_threads=False)
        seen = 0
        try:
            for batch in reader:
                seen += batch.num_rows
                if seen > row:
                    break
        finally:
            reader.close()
        line = self._header_lines + row + 1
        for skipped in sorted(int(r.line) for r in found if r.line is not None):
            if skipped <= line:
                line += 1
        return f"line {line}"


def _shown(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
