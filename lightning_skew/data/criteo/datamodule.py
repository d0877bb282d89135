"""CriteoDataModule: the Criteo datasets of each split behind one LightningDataModule."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset

from lightning_skew.data.base import RecDataModule
from lightning_skew.data.criteo.datasets import CriteoNpyDataset, CriteoTsvDataset, _check_table_sizes
from lightning_skew.data.criteo.files import resolve_npy_days, resolve_tsv_paths
from lightning_skew.data.criteo.vocabulary import CriteoVocabulary
from lightning_skew.data.features import (
    CRITEO_CATEGORICAL_COLUMNS,
    CRITEO_INTEGER_COLUMNS,
    CRITEO_KAGGLE_CARDINALITIES,
    CRITEO_NUM_DENSE,
    capped_cardinalities,
)
from lightning_skew.data.position import FileSplitLoaders, StreamPosition

_FORMATS = ("tsv", "npy")


class CriteoDataModule(FileSplitLoaders, RecDataModule):
    """Criteo Kaggle / Terabyte data (TSV or TorchRec npy) as torchrec Batches, sharded across ranks.

    A thin wrapper: :meth:`setup` reads the rank and world size (from the trainer when attached, else
    ``torch.distributed`` when initialized, else 0 / 1), checks the paths of the stage and builds a
    :class:`CriteoTsvDataset` or :class:`CriteoNpyDataset` per split; each loader is a
    ``DataLoader(dataset, batch_size=None)``. Every rank yields the same number of batches.

    Features carry the data set's own column names: sparse ``C1`` .. ``C26`` (the batches' keys, so the
    model's tables, the sharding plan and profiles say ``C3``), dense ``I1`` .. ``I13``
    (:attr:`dense_feature_names`), as Criteo's README and the parse errors do.

    .. note::
        ``batch_size`` is per rank: a global batch has ``world_size * batch_size`` examples.

    .. note::
        **Every input is read.** Validation and test read every line: the last global batch may be
        partial, and is then split over the ranks (shares differ by at most one input; a remainder smaller
        than the number of ranks rides with the full batch before it, so no rank gets an empty batch).
        Training does the same by default, so that one epoch trains on every input once; ``drop_last=True``
        drops the partial last global batch of each training epoch instead (counted and logged). A file
        without any line is an error naming it. The lines read are the lines :func:`build_vocabulary`
        counts.

    .. note::
        **Resume mid-epoch.** A checkpoint holds the training stream's position
        (:class:`~lightning_skew.data.position.StreamPosition`): a run resumed from a step checkpoint goes on with
        the next global batch, on every rank and DataLoader worker, and trains as the uninterrupted run. TSV
        lines already trained are skipped unparsed; a file shorter than the checkpoint says is an error.

    .. note::
        **Missing values** (empty categorical fields) land on row 0 of every table (:attr:`missing_rows`).
        Hashing keeps that row for them alone (present values take rows ``1 + value % (rows - 1)``; in npy
        files, where empty fields were written as 0, the value 0 counts as missing); with a vocabulary row 0 is
        shared with every value the vocabulary does not keep (rare, unseen, or past ``max_rows_per_table``).

    Args:
        train_paths: Training files: TSV files, directories or globs; for ``npy``, day prefixes
            (``/data/day_0``), day files or directories (see :func:`resolve_npy_days`).
        val_paths: Validation files, as ``train_paths``. ``None``: no validation loader.
        test_paths: Test files, as ``train_paths``. ``None``: no test loader.
        format: ``"tsv"`` (Criteo's text files, plain or gzip) or ``"npy"`` (TorchRec's layout).
        num_embeddings_per_feature: Rows per table (26 sizes) for hashing; ``None`` uses
            ``CRITEO_KAGGLE_CARDINALITIES``. Must be ``None`` with a vocabulary, whose sizes are used.
        max_rows_per_table: Cap every table at this many rows (hashing: modulo the cap; vocabulary:
            values whose row is past the cap go to row 0, which keeps the most frequent ones).
        vocabulary_path: A ``.npz`` written by :func:`build_vocabulary`; ``None`` hashes.
        batch_size: Examples per batch on each rank.
        num_workers: DataLoader workers per rank (each scans the whole stream, parses its share).
        skip_malformed: Skip and count malformed TSV lines instead of raising ``ValueError``.
        pin_memory: Pin batches in the DataLoader (for GPU training).
        drop_last: Drop the partial last global batch of the training data (default ``False``: train on
            every input). Validation and test never drop.
        out_of_range_ids: What a batch with an ID outside its table does under a Trainer: ``"error"``
            (default) or ``"clamp"`` (to row 0); see :class:`~lightning_skew.data.base.RecDataModule`. This
            reader's IDs are in range by construction (hashing modulo, or capped vocabulary rows).

    Example::

        datamodule = CriteoDataModule(train_paths=["/data/criteo/day_0.gz"], batch_size=4096,
                                      max_rows_per_table=1_000_000)
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
    """

    def __init__(
        self,
        train_paths: list[str] | None = None,
        val_paths: list[str] | None = None,
        test_paths: list[str] | None = None,
        format: str = "tsv",
        num_embeddings_per_feature: list[int] | None = None,
        max_rows_per_table: int | None = None,
        vocabulary_path: str | None = None,
        batch_size: int = 2048,
        num_workers: int = 0,
        skip_malformed: bool = False,
        pin_memory: bool = False,
        drop_last: bool = False,
        out_of_range_ids: str = "error",
    ) -> None:
        super().__init__(out_of_range_ids=out_of_range_ids)
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        self.paths = {"train": train_paths, "val": val_paths, "test": test_paths}
        self.format = format
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_malformed = skip_malformed
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.vocabulary: CriteoVocabulary | None = None
        if vocabulary_path is not None:
            if num_embeddings_per_feature is not None:
                raise ValueError(
                    "num_embeddings_per_feature must be None with vocabulary_path: the table sizes are "
                    "the vocabulary's (use max_rows_per_table to cap them)"
                )
            self.vocabulary = CriteoVocabulary(vocabulary_path)
            sizes = self.vocabulary.num_embeddings_per_feature
        elif num_embeddings_per_feature is None:
            sizes = CRITEO_KAGGLE_CARDINALITIES
        else:
            sizes = num_embeddings_per_feature
        self._num_embeddings = capped_cardinalities(_check_table_sizes(sizes), max_rows_per_table)
        self.datasets: dict[str, IterableDataset] = {}
        self.rank, self.world_size = 0, 1
        self.position = StreamPosition()

    @property
    def dense_in_features(self) -> int:
        return CRITEO_NUM_DENSE

    @property
    def dense_feature_names(self) -> list[str]:
        """Names of the dense features, in column order: Criteo's ``I1`` .. ``I13``."""
        return list(CRITEO_INTEGER_COLUMNS)

    @property
    def sparse_feature_names(self) -> list[str]:
        """Criteo's ``C1`` .. ``C26``."""
        return list(CRITEO_CATEGORICAL_COLUMNS)

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return list(self._num_embeddings)

    @property
    def missing_rows(self) -> dict[str, int]:
        """Row 0 for every feature, with a vocabulary or without (see the class notes for what else lands there)."""
        return {name: 0 for name in CRITEO_CATEGORICAL_COLUMNS}

    def _make_dataset(self, split: str) -> IterableDataset:
        paths = self.paths[split]
        assert paths is not None
        what = f"{split}_paths"
        drop_last = self.drop_last and split == "train"
        if self.format == "npy":
            return CriteoNpyDataset(
                resolve_npy_days(paths, what), self.batch_size, self._num_embeddings,
                self.vocabulary, self.rank, self.world_size, drop_last=drop_last, what=what,
            )
        return CriteoTsvDataset(
            resolve_tsv_paths(paths, what), self.batch_size, self._num_embeddings,
            self.vocabulary, self.rank, self.world_size, self.skip_malformed, drop_last=drop_last, what=what,
        )

    def setup(self, stage: str) -> None:
        self.rank, self.world_size = self.rank_and_world_size()
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}[stage]
        if stage == "fit" and self.paths["train"] is None:
            raise ValueError("CriteoDataModule: train_paths is required to fit")
        if stage in ("validate", "test") and self.paths[splits[0]] is None:
            raise ValueError(f"CriteoDataModule: {splits[0]}_paths is required to {stage}")
        for split in splits:
            if self.paths[split] is not None:
                self.datasets[split] = self._make_dataset(split)
        if self.vocabulary is not None and stage == "fit" and self.format == "tsv":
            train_files = [os.path.abspath(f) for f in self.datasets["train"].files]  # type: ignore[attr-defined]
            if train_files != self.vocabulary.source_files:
                rank_zero_warn(
                    f"the vocabulary {self.vocabulary.path} was built from {self.vocabulary.source_files}, "
                    f"not from the training files {train_files}"
                )

    def dataset_of(self, split: str) -> Any:
        if split not in self.datasets:
            if self.paths[split] is None:
                return None
            raise RuntimeError(f"CriteoDataModule: call setup() before the {split} dataloader")
        return self.datasets[split]

    def train_length(self, dataset: Any) -> int | None:
        return len(dataset) if isinstance(dataset, CriteoNpyDataset) else None  # a TSV's is known once read
