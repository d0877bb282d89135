"""The column mapping of columnar data: which columns are the label, the dense and the sparse features."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DENSE_TRANSFORMS",
    "ENCODINGS",
    "ColumnMapping",
    "DenseFeature",
    "FileFormat",
    "Join",
    "Label",
    "SparseFeature",
]

ENCODINGS = ("vocabulary", "hash")
DENSE_TRANSFORMS = ("log1p", "none")
FORMATS = ("auto", "parquet", "csv")


@dataclass
class FileFormat:
    """How a group of files is read.

    Args:
        format: ``"parquet"``, ``"csv"`` (any delimiter, plain or compressed: gzip, bz2, zstd, lz4), or
            ``"auto"``: Parquet when the file starts with Parquet's magic bytes, else CSV.
        delimiter: The field separator of CSV files; ``None``: a tab if the first line holds one, else a comma.
        header: Whether the first line of a CSV file names the columns.
        column_names: Names for the columns, in file order, used instead of the header (which is then skipped,
            and must have as many fields) or for files without one (``header: false``). RecBole's atomic files,
            for instance, write ``user_id:token``; ``column_names`` gives them plain names.
    """

    format: str = "auto"
    delimiter: str | None = None
    header: bool = True
    column_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"file_format.format must be one of {FORMATS}, got {self.format!r}")
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ValueError(f"file_format.delimiter must be one character, got {self.delimiter!r}")
        if not self.header and self.column_names is None:
            raise ValueError("file_format: a CSV file without a header (header: false) needs column_names")
        if self.column_names is not None:
            _check_unique(self.column_names, "file_format.column_names")


@dataclass
class Label:
    """The click (or any binary) label.

    Args:
        column: The label's column.
        threshold: The label is 1 where the value is at least this (``rating >= 4``) and 0 elsewhere;
            ``None``: the values must be 0 or 1 already.
    """

    column: str
    threshold: float | None = None


@dataclass
class DenseFeature:
    """A continuous feature: one number per input; a missing (empty) value is 0.

    Args:
        column: The feature's column (numbers).
        transform: ``"log1p"``: negatives clamped to 0, then ``log(1 + x)`` (Criteo's transform, for counts);
            ``"none"``: the value as is.
    """

    column: str
    transform: str = "log1p"


@dataclass
class SparseFeature:
    """A categorical feature: one ID per input, or a list of IDs (multi-hot), each mapped to an embedding row.

    Row 0 of every table stands for a missing value (an empty or null field, or one of ``missing_values``).
    With the vocabulary encoding, row 1 holds every value outside the vocabulary (too rare, unseen in
    training, or past the ``num_embeddings`` cap) and the kept values take rows ``2..``, most frequent first;
    with hashing, values take rows ``1 + hash(value) % (num_embeddings - 1)``.

    Args:
        column: The feature's column. Its name is the feature's name (the KeyedJaggedTensor key).
        delimiter: Multi-hot values written as one delimited string (MovieLens genres ``Action|Comedy``): the
            tokens between delimiters are the IDs. Parquet list columns are multi-hot without it. In a multi-hot
            feature, empty tokens and missing codes are no IDs; an input without any has no lookups.
        encoding: ``"vocabulary"`` or ``"hash"``; ``None``: the DataModule's ``encoding``.
        num_embeddings: Hashing: the table's rows (at least 2); vocabulary: a cap on them. ``None``: the
            DataModule's ``num_embeddings``.
        min_frequency: Vocabulary: a value gets its own row when seen at least this many times in the training
            rows. ``None``: the DataModule's ``min_frequency``.
        missing_values: Values that mean "missing" (Avazu writes ``-1``). ``None``: the DataModule's.
    """

    column: str
    delimiter: str | None = None
    encoding: str | None = None
    num_embeddings: int | None = None
    min_frequency: int | None = None
    missing_values: list[str] | None = None

    @property
    def name(self) -> str:
        return self.column


@dataclass
class Join:
    """Columns taken from a small side table (item or user attributes), matched on a key column.

    The side table is read whole into memory once. An input whose key the table lacks gets missing values in
    the joined columns (row 0, or no IDs for a multi-hot feature); how many did is logged after each pass.

    Args:
        path: The side table's file (Parquet or CSV, see :class:`FileFormat`).
        key: The column both the data and the side table hold (e.g. ``item_id``).
        columns: The side table's columns to add to each input.
        file_format: How the side table is read.
    """

    path: str
    key: str
    columns: list[str]
    file_format: FileFormat = field(default_factory=FileFormat)


def _check_unique(names: Sequence[str], what: str) -> None:
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"{what} names these columns more than once: {repeated}")


def _as(cls: type, value: Any, what: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and "column" in {f.name for f in dataclasses.fields(cls)}:
        return cls(column=value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{what}: unknown keys {unknown}; a {cls.__name__} takes {sorted(known)}")
        if cls is Join and isinstance(value.get("file_format"), dict):
            value = {**value, "file_format": FileFormat(**value["file_format"])}
        return cls(**value)
    raise TypeError(f"{what}: expected a {cls.__name__}, a dict or a column name, got {value!r}")


class ColumnMapping:
    """The resolved column mapping of a :class:`~lightning_skew.data.columnar.ColumnarDataModule`.

    Features given as column names or dicts become dataclasses; the DataModule's defaults fill each sparse
    feature's unset fields; everything is validated once, here.

    Args:
        label: The label column.
        dense_features: Continuous features (may be empty: data without dense features trains too).
        sparse_features: Categorical features (at least one).
        time_column: The column that orders the data in time (for a time-ordered split), or ``None``.
        joins: Side tables whose columns join the data's.
        encoding: Default encoding of sparse features.
        num_embeddings: Default table rows (hashing) or cap (vocabulary).
        min_frequency: Default vocabulary threshold.
        missing_values: Default missing codes.
    """

    def __init__(
        self,
        label: Label | dict | str,
        dense_features: Iterable[DenseFeature | dict | str] = (),
        sparse_features: Iterable[SparseFeature | dict | str] = (),
        time_column: str | None = None,
        joins: Iterable[Join | dict] = (),
        encoding: str = "vocabulary",
        num_embeddings: int | None = None,
        min_frequency: int = 1,
        missing_values: Sequence[str] = (),
    ) -> None:
        self.label: Label = _as(Label, label, "label")
        self.dense: list[DenseFeature] = [_as(DenseFeature, d, "dense_features") for d in dense_features]
        defaults = {"encoding": encoding, "num_embeddings": num_embeddings, "min_frequency": min_frequency,
                    "missing_values": list(missing_values)}
        self.sparse: list[SparseFeature] = []
        for given in sparse_features:
            feature = _as(SparseFeature, given, "sparse_features")
            unset = {k: v for k, v in defaults.items() if getattr(feature, k) is None}
            self.sparse.append(dataclasses.replace(feature, **unset))
        self.time_column = time_column
        self.joins: list[Join] = [_as(Join, j, "joins") for j in joins]
        self._validate()

    def _validate(self) -> None:
        if not self.sparse:
            raise ValueError("sparse_features is empty: name at least one categorical column")
        _check_unique([f.column for f in self.sparse], "sparse_features")
        _check_unique([f.column for f in self.dense], "dense_features")
        both = sorted({f.column for f in self.sparse} & {f.column for f in self.dense})
        if both:
            raise ValueError(f"columns {both} are both dense and sparse features; give each column one role")
        features = [f.column for f in self.sparse] + [f.column for f in self.dense]
        if self.label.column in features:
            raise ValueError(f"the label column {self.label.column!r} is also a feature: the model would read "
                             "its own answer; remove it from the features")
        for dense in self.dense:
            if dense.transform not in DENSE_TRANSFORMS:
                raise ValueError(f"dense feature {dense.column!r}: transform must be one of {DENSE_TRANSFORMS}, "
                                 f"got {dense.transform!r}")
        for sparse in self.sparse:
            where = f"sparse feature {sparse.column!r}"
            if sparse.encoding not in ENCODINGS:
                raise ValueError(f"{where}: encoding must be one of {ENCODINGS}, got {sparse.encoding!r}")
            if sparse.encoding == "hash" and (sparse.num_embeddings is None or sparse.num_embeddings < 2):
                raise ValueError(f"{where}: hashing needs num_embeddings of at least 2 (row 0 is the missing "
                                 f"value), got {sparse.num_embeddings}")
            if sparse.encoding == "vocabulary" and sparse.num_embeddings is not None and sparse.num_embeddings < 3:
                raise ValueError(f"{where}: a vocabulary capped at num_embeddings={sparse.num_embeddings} rows has "
                                 "no row for any value (rows 0 and 1 are missing and out-of-vocabulary); use >= 3")
            if sparse.min_frequency is None or sparse.min_frequency < 1:
                raise ValueError(f"{where}: min_frequency must be at least 1, got {sparse.min_frequency}")
            if sparse.delimiter is not None and len(sparse.delimiter) == 0:
                raise ValueError(f"{where}: delimiter must not be empty (use null for single IDs)")
        joined: list[str] = []
        for join in self.joins:
            if not join.columns:
                raise ValueError(f"join with {join.path}: columns is empty; name the side table's columns to add")
            if join.key in join.columns:
                raise ValueError(f"join with {join.path}: the key {join.key!r} is also in columns")
            joined.extend(join.columns)
        _check_unique(joined, "joins")
        if self.label.column in joined:
            raise ValueError(f"the label column {self.label.column!r} cannot come from a join")

    @property
    def joined_columns(self) -> set[str]:
        return {c for join in self.joins for c in join.columns}

    def roles(self) -> dict[str, str]:
        """Every column a batch is made from, joined ones included, with its role (for error messages)."""
        roles = {self.label.column: "the label"}
        roles.update({f.column: "a dense feature" for f in self.dense})
        roles.update({f.column: "a sparse feature" for f in self.sparse})
        if self.time_column is not None:
            roles.setdefault(self.time_column, "the time column")
        return roles

    def file_roles(self) -> dict[str, str]:
        """The columns read from the data files (the used ones not joined, and the join keys), with their roles."""
        joined = self.joined_columns
        roles = {column: role for column, role in self.roles().items() if column not in joined}
        for join in self.joins:
            roles.setdefault(join.key, f"the key of the join with {join.path}")
        return roles

    def file_columns(self) -> list[str]:
        return list(self.file_roles())

    def vocabulary_features(self) -> list[SparseFeature]:
        return [f for f in self.sparse if f.encoding == "vocabulary"]

    def describe(self) -> dict[str, Any]:
        """The mapping as plain values (for hyperparameters and dataset descriptions)."""
        return {
            "label": dataclasses.asdict(self.label),
            "dense_features": [dataclasses.asdict(f) for f in self.dense],
            "sparse_features": [dataclasses.asdict(f) for f in self.sparse],
            "time_column": self.time_column,
            "joins": [dataclasses.asdict(j) for j in self.joins],
        }
