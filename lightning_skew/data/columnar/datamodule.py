"""ColumnarDataModule: Parquet or CSV/TSV files of any shape, mapped column by column, as torchrec Batches."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_skew.data.base import RecDataModule
from lightning_skew.data.columnar.datasets import ColumnarDataset
from lightning_skew.data.columnar.decoding import RowDecoder, SideTable, check_non_finite
from lightning_skew.data.columnar.encoding import MISSING_ROW, FeatureEncoder, Vocabulary
from lightning_skew.data.columnar.preparation import Preparation, prepare
from lightning_skew.data.columnar.readers import ColumnarFile, resolve_paths
from lightning_skew.data.columnar.spec import (
    ColumnMapping,
    DenseFeature,
    FileFormat,
    Join,
    Label,
    SparseFeature,
)
from lightning_skew.data.columnar.splits import SPLITS
from lightning_skew.data.position import FileSplitLoaders, StreamPosition

__all__ = ["ColumnarDataModule"]

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class ColumnarDataModule(FileSplitLoaders, RecDataModule):
    """Recommendation data in Parquet or CSV/TSV files (plain or gzip/bz2/zstd), mapped to a label, dense and
    sparse features by column name, streamed as torchrec Batches and sharded across ranks and workers.

    Each sparse feature's column name is its feature name (the KeyedJaggedTensor key, the table ``t_<name>``).
    Values become rows through a vocabulary counted over the training rows (``encoding: vocabulary``: values
    seen ``min_frequency`` times get rows ``2..``, most frequent first, the others share row 1) or by hashing
    into ``num_embeddings`` rows (``encoding: hash``); row 0 is the missing value in every table
    (:attr:`missing_rows`). Multi-hot features are lists (Parquet) or delimited strings (``delimiter``).

    Splits: by files (``val_paths``, ``test_paths``), or by time: with ``time_column`` and ``val_fraction`` /
    ``test_fraction``, the last shares of the training files' rows in time order are held out (ties in time go
    to the later split). Every split yields every row, the last batch smaller (every rank takes the same
    number of steps); ``drop_last=True`` leaves the training rows after the last complete global batch out.

    Before the first loader (or the first table size, for vocabularies), a preparation pass reads the files once
    (twice for a time split with vocabularies): it counts each split's rows, finds the time boundaries and
    counts the vocabularies, and fails early on bad data. Parquet files split by files and hashed need no pass.

    Args:
        train_paths: Training files: files, directories or globs (relative ones under ``root``).
        label: The label column, with an optional ``threshold`` (``{column: rating, threshold: 4}``).
        sparse_features: Categorical columns: names, or :class:`SparseFeature` mappings (``delimiter``,
            ``encoding``, ``num_embeddings``, ``min_frequency``, ``missing_values``).
        dense_features: Continuous columns: names or :class:`DenseFeature` mappings (``transform``: ``log1p``,
            the default, or ``none``). May be empty.
        val_paths: Validation files. ``None``: none, or cut by time (``val_fraction``).
        test_paths: Test files. ``None``: none, or cut by time (``test_fraction``).
        root: The folder relative paths (data files and joins) are under; ``None``: the working directory.
        file_format: How the data files are read (:class:`FileFormat`: format, delimiter, header, column_names).
        time_column: The column that orders the rows in time (numbers: a Unix time, Avazu's ``YYMMDDHH``).
        val_fraction: With ``time_column``: the share of the training files' rows, the latest but the test
            share, that goes to validation.
        test_fraction: With ``time_column``: the latest share of the rows, held out for test.
        joins: Side tables whose columns join the rows on a key (:class:`Join`), e.g. item genres.
        encoding: Default encoding of sparse features: ``"vocabulary"`` or ``"hash"``.
        num_embeddings: Default table rows for hashing, or cap for vocabularies (``None``: no cap).
        min_frequency: Default vocabulary threshold.
        missing_values: Default values that mean "missing" (e.g. ``["-1"]``), besides empty fields and nulls.
        batch_size: Rows per batch on each rank.
        num_workers: DataLoader workers per rank (each reads every row and encodes its own batches).
        skip_malformed: Skip and count malformed rows (wrong field counts, unreadable numbers, bad labels)
            instead of raising ``ValueError`` with the file, line and column.
        non_finite: A NaN or infinite dense value (``nan``, ``inf`` in a CSV, NaN in a Parquet float column):
            ``"error"`` (default: a malformed row, naming file, row and column) or ``"zero"`` (read as 0, counted
            in the pass's log line).
        pin_memory: Pin batches in the DataLoader (for GPU training).
        drop_last: Leave out the training rows after the last complete global batch (logged with their count).
            Default ``False``: one epoch trains on every row, the last batch smaller (as ``CriteoDataModule``).

    .. note::
        ``batch_size`` is per rank: a global batch has ``world_size * batch_size`` rows. Nothing is shuffled:
        rows arrive in file order (click logs are in time order; shuffle the files beforehand if yours are not).

    .. note::
        **Resume mid-epoch.** A checkpoint holds the training stream's position
        (:class:`~lightning_skew.data.position.StreamPosition`): a run resumed from a step checkpoint goes on with
        the next global batch, on every rank and DataLoader worker, and trains as the uninterrupted run. The rows
        of the batches it skips are read and decoded (which rows count depends on it) but not encoded.

    Example::

        data = ColumnarDataModule(
            train_paths="ml-100k.inter", label={"column": "rating", "threshold": 4},
            sparse_features=["user_id", "item_id"], time_column="timestamp", val_fraction=0.2,
            file_format=FileFormat(column_names=["user_id", "item_id", "rating", "timestamp"]))
        model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features)
    """

    def __init__(
        self,
        train_paths: list[str] | str | None = None,
        *,
        label: Label | str,
        sparse_features: list[SparseFeature | str],
        dense_features: list[DenseFeature | str] | None = None,
        val_paths: list[str] | str | None = None,
        test_paths: list[str] | str | None = None,
        root: str | None = None,
        file_format: FileFormat | None = None,
        time_column: str | None = None,
        val_fraction: float = 0.0,
        test_fraction: float = 0.0,
        joins: list[Join] | None = None,
        encoding: str = "vocabulary",
        num_embeddings: int | None = None,
        min_frequency: int = 1,
        missing_values: list[str] | None = None,
        batch_size: int = 2048,
        num_workers: int = 0,
        skip_malformed: bool = False,
        non_finite: str = "error",
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        self.mapping = ColumnMapping(label, dense_features or (), sparse_features, time_column, joins or (),
                                     encoding, num_embeddings, min_frequency, missing_values or ())
        for split, fraction, paths in (("val", val_fraction, val_paths), ("test", test_fraction, test_paths)):
            if fraction and paths is not None:
                raise ValueError(f"give either {split}_paths or {split}_fraction (a split cut by time from the "
                                 f"training files), not both")
        if (val_fraction or test_fraction) and time_column is None:
            raise ValueError("val_fraction / test_fraction cut the latest rows by time: name the time_column")
        if time_column is not None and not (val_fraction or test_fraction):
            raise ValueError(f"time_column {time_column!r} is given but val_fraction and test_fraction are 0: give "
                             "the share of the latest rows to hold out, or leave time_column out")
        self.paths = {"train": train_paths, "val": val_paths, "test": test_paths}
        self.root = root
        self.file_format = FileFormat(**file_format) if isinstance(file_format, dict) else file_format or FileFormat()
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skip_malformed, self.pin_memory, self.drop_last = skip_malformed, pin_memory, drop_last
        check_non_finite(non_finite)
        self.non_finite = non_finite
        self.save_hyperparameters({
            "train_paths": train_paths, "val_paths": val_paths, "test_paths": test_paths, "root": root,
            "file_format": vars(self.file_format).copy(), **self.mapping.describe(),
            "val_fraction": val_fraction, "test_fraction": test_fraction, "skip_malformed": skip_malformed,
            "batch_size": batch_size, "num_workers": num_workers,
            # Only when it changes the data: profiles of data read the default way keep their fingerprint.
            **({"non_finite": non_finite} if non_finite != "error" else {}),
        })
        self.rank, self.world_size = 0, 1
        self._files: dict[str, list[ColumnarFile]] | None = None
        self._decoder: RowDecoder | None = None
        self._preparation: Preparation | None = None
        self.datasets: dict[str, ColumnarDataset] = {}
        self.position = StreamPosition()

    # -- the contract -----------------------------------------------------------------------------------------

    @property
    def dense_in_features(self) -> int:
        return len(self.mapping.dense)

    @property
    def sparse_feature_names(self) -> list[str]:
        return [f.name for f in self.mapping.sparse]

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return [encoder.num_embeddings for encoder in self.encoders()]

    @property
    def missing_rows(self) -> dict[str, int]:
        """Row 0 of every table is the missing value (an empty field, a null or a missing code such as ``-1``)."""
        return dict.fromkeys(self.sparse_feature_names, MISSING_ROW)

    # -- files, preparation, encoders -------------------------------------------------------------------------

    def files(self) -> dict[str, list[ColumnarFile]]:
        """Each split's files, opened, every one checked for the columns the mapping names."""
        if self._files is None:
            roles = self.mapping.file_roles()
            files: dict[str, list[ColumnarFile]] = {}
            for split in SPLITS:
                paths = self.paths[split]
                files[split] = []
                if paths is None:
                    continue
                for path in resolve_paths(paths, f"{split}_paths", self.root):
                    file = ColumnarFile(path, self.file_format)
                    file.require(roles)
                    files[split].append(file)
            self._files = files
        return self._files

    def decoder(self) -> RowDecoder:
        if self._decoder is None:
            sides = [SideTable(join, resolve_paths(join.path, "joins.path", self.root)[0])
                     for join in self.mapping.joins]
            self._decoder = RowDecoder(self.mapping, sides, self.skip_malformed, self.non_finite)
        return self._decoder

    @property
    def preparation(self) -> Preparation:
        """The preparation pass's findings (run on first use)."""
        if self._preparation is None:
            files = self.files()
            if not files["train"] and (self.val_fraction or self.test_fraction):
                raise ValueError("val_fraction / test_fraction cut the held-out rows from train_paths: give them")
            preparation = prepare(files, self.decoder(), self.val_fraction, self.test_fraction)
            if preparation.counts.summary():
                rank_zero_warn(f"ColumnarDataModule: {preparation.counts.summary()}")
            self._preparation = preparation
        return self._preparation

    def vocabulary(self, feature: str) -> Vocabulary:
        """The vocabulary of a vocabulary-encoded feature (its values, rows and counts)."""
        vocabularies = self.preparation.vocabularies
        if feature not in vocabularies:
            raise KeyError(f"{feature!r} has no vocabulary; vocabulary-encoded features: {sorted(vocabularies)}")
        return vocabularies[feature]

    def encoders(self) -> list[FeatureEncoder]:
        vocabularies = self.preparation.vocabularies if self.mapping.vocabulary_features() else {}
        return [FeatureEncoder(f, vocabularies.get(f.column)) for f in self.mapping.sparse]

    # -- Lightning hooks --------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.rank, self.world_size = self.rank_and_world_size()
        if stage == "fit" and self.paths["train"] is None:
            raise ValueError("ColumnarDataModule: train_paths is required to fit")
        preparation, files, encoders = self.preparation, self.files(), self.encoders()
        for split in _STAGE_SPLITS[stage]:
            by_time = split != "train" and preparation.boundaries is not None and \
                getattr(self, f"{split}_fraction") > 0
            split_files = files["train"] if by_time else files[split]
            if not split_files:
                if stage in ("validate", "test") or (stage == "predict" and split == "test"):
                    raise ValueError(f"ColumnarDataModule: {split}_paths (or {split}_fraction) is required to {stage}")
                continue
            boundaries = preparation.boundaries if (by_time or split == "train") else None
            self.datasets[split] = ColumnarDataset(
                split_files, self.decoder(), encoders, split, preparation.num_rows[split], self.batch_size,
                boundaries, self.rank, self.world_size, keep_last=split != "train" or not self.drop_last)
        if "train" in self.datasets and len(self.datasets["train"]) == 0:
            rank_zero_warn(f"the training split has {preparation.num_rows['train']} rows, less than one global batch "
                           f"({self.batch_size} x {self.world_size} ranks): the train loader is empty")

    def dataset_of(self, split: str) -> Any:
        if split not in self.datasets:
            if self.paths[split] is None and not getattr(self, f"{split}_fraction", 0):
                return None
            raise RuntimeError(f"ColumnarDataModule: call setup() before the {split} dataloader")
        return self.datasets[split]

    def describe(self) -> dict[str, Any]:
        """Rows per split and table sizes, for a look at what the mapping made of the data."""
        return {"num_rows": dict(self.preparation.num_rows),
                "tables": dict(zip(self.sparse_feature_names, self.num_embeddings_per_feature, strict=True)),
                "dense_features": [f.column for f in self.mapping.dense]}
