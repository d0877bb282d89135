"""Readers for the real Criteo click logs (Kaggle / Terabyte TSV, TorchRec npy) and their DataModule.

Two on-disk layouts are read:

* **TSV**, as Criteo publishes it (Kaggle ``train.txt``, Terabyte ``day_0`` ... ``day_23``, plain or
  gzip): one example per line, ``label \\t I1..I13 \\t C1..C26``. The label is ``0`` or ``1``; the 13
  integer features are decimal and may be negative; the 26 categorical features are hexadecimal
  hashes (8 digits in the published data). An empty field is a missing value.
* **npy**, as TorchRec's ``BinaryCriteoUtils.tsv_to_npys`` / ``scripts/npy_preproc_criteo.py`` write
  it: per day ``day_{i}_dense.npy`` ([N, 13]), ``day_{i}_sparse.npy`` ([N, 26]) and
  ``day_{i}_labels.npy`` ([N, 1]).

Feature transforms (pure functions, tested on their own):

* dense (TSV, or integer npy): missing -> 0, negatives clamped to 0, then ``log(1 + x)``
  (:func:`transform_dense`). Float npy dense is taken as is: TorchRec already wrote
  ``log(x - min + 2)`` there, and applying a second transform would change the data's meaning.
* categorical by hashing: ``1 + int(hex, 16) % (num_embeddings[i] - 1)``; a missing value lands on row 0,
  which no present value shares (:func:`hash_categorical`; the DLRM reference's ``% num_embeddings`` would put
  every value that hashes to 0, e.g. C9's frequent ``a73ee510`` in a table of 10 rows, on the missing row).
* categorical by vocabulary (:func:`build_vocabulary`, a separate pass): values seen at least
  ``min_frequency`` times get rows ``1..V`` (most frequent first), every other value (rare, unseen or
  missing) gets row 0.

Streaming and sharding (both readers, :class:`GlobalBatchSharding`): the rows of all files, in order,
are cut into global batches of ``world_size * batch_size`` rows; rank ``r`` reads rows
``[r * n // W, (r + 1) * n // W)`` of a global batch of ``n`` rows (``[r * B, (r + 1) * B)`` of a full one),
and DataLoader worker ``w`` of ``k`` yields the global batches ``j`` with ``j % k == w``, so the
DataLoader's round-robin keeps the order. Every row is read: the last global batch may be partial and is
split over the ranks (a remainder smaller than the number of ranks rides with the batch before it), so
every rank yields the same number of batches, none of them empty; ``drop_last`` (training) drops the
partial batch instead, counted.

Features are named as the data set names its columns: ``C1`` .. ``C26`` (sparse), ``I1`` .. ``I13`` (dense).
"""

from lightning_skew.data.criteo.datamodule import CriteoDataModule
from lightning_skew.data.criteo.datasets import CriteoNpyDataset, CriteoTsvDataset, GlobalBatchSharding
from lightning_skew.data.criteo.files import open_criteo_file, resolve_npy_days, resolve_tsv_paths
from lightning_skew.data.criteo.parse import (
    ParsedLines,
    hash_categorical,
    make_batch,
    parse_tsv_lines,
    transform_dense,
)
from lightning_skew.data.criteo.vocabulary import CriteoVocabulary, build_vocabulary

__all__ = [
    "CriteoDataModule",
    "CriteoNpyDataset",
    "CriteoTsvDataset",
    "CriteoVocabulary",
    "GlobalBatchSharding",
    "ParsedLines",
    "build_vocabulary",
    "hash_categorical",
    "make_batch",
    "open_criteo_file",
    "parse_tsv_lines",
    "resolve_npy_days",
    "resolve_tsv_paths",
    "transform_dense",
]

# A profile names the DataModule it counted by ``__module__`` and ``__qualname__`` and fingerprints that name
# (``lightning_skew.profile.access.describe_datamodule``): keep the public path it had as a single module.
CriteoDataModule.__module__ = __name__
