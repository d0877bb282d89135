"""SyntheticDataModule: each rank's share of the synthetic click log's streams as torchrec Batches."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchmetrics.functional.classification import binary_auroc

from lightning_skew.data.base import Batch, RecDataModule
from lightning_skew.data.features import (
    CRITEO_KAGGLE_CARDINALITIES,
    CRITEO_NUM_DENSE,
    CRITEO_SPARSE_NAMES,
    capped_cardinalities,
)
from lightning_skew.data.position import ResumableTrainStream, StreamPosition
from lightning_skew.data.synthetic.generator import SPLITS, SyntheticClickLog
from lightning_skew.data.synthetic.sessions import Sessions

# Keys of the user-level features a log with sessions appends after the per-sample ones.
SESSION_FEATURES = ("user_id", "history")


class SyntheticClickStream(IterableDataset):
    """One rank's share of a split's stream, as ready :class:`Batch` objects.

    Rank ``r`` of ``W`` yields, as its ``j``-th batch, stream samples ``[(j W + r) B, (j W + r + 1) B)``; the
    incomplete last global batch is dropped so every rank yields the same number of batches. With
    ``n`` loader workers, worker ``w`` yields batches ``j = w (mod n)``, which the DataLoader's
    round-robin puts back in order.
    """

    def __init__(
        self,
        log: SyntheticClickLog,
        split: str,
        num_samples: int,
        batch_size: int,
        keys: list[str],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.log, self.split, self.num_samples, self.batch_size = log, split, num_samples, batch_size
        self.keys, self.rank, self.world_size = keys, rank, world_size
        self.skip_first = 0  # batches the first pass leaves out (a run resumed mid-epoch trained them)

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def batch_start(self, index: int) -> int:
        return (index * self.world_size + self.rank) * self.batch_size

    def batch_at(self, index: int) -> Batch:
        """This rank's ``index``-th batch, generated without the others (sampled profiling skips the rest)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of a {len(self)}-batch stream")
        start = self.batch_start(index)
        return self.log.to_batch(self.log.generate(self.split, start, start + self.batch_size), self.keys)

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        # Persistent workers keep their own copy, so each copy skips on its first pass only, as the main one does.
        skip, self.skip_first = self.skip_first, 0
        for index in range(skip + worker_id, len(self), num_workers):
            yield self.batch_at(index)


def _per_feature(name: str, value: float | Sequence[float], num_features: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_features:
            raise ValueError(
                f"{name} must be a single value or one per sparse feature ({num_features}), got {len(value)} values"
            )
        return list(value)
    return [value] * num_features


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SyntheticDataModule(ResumableTrainStream, RecDataModule):
    """Synthetic Criteo-Kaggle-shaped click logs with skewed (power-law) ID popularity.

    Each split (train, val, test) is a fixed stream: sample ``i`` depends only on ``seed``, so runs are
    reproducible and independent of the world size. Each sparse feature's row IDs follow a power law:
    popularity rank ``k`` (0 = most popular) has probability proportional to ``(k + 1) ** -s``, and ranks
    are scattered over the table by the bijection ``row = (a k + b) mod N`` as hashing would. Labels
    come from a hidden teacher, ``click ~ Bernoulli(sigmoid(bias + sum_f effect_f(row_f) + g(dense)))``
    with hash-based Gaussian per-row effects, so the AUC is learnable up to
    :meth:`best_attainable_auc`.

    Args:
        num_embeddings_per_feature: Rows of each sparse feature's table (one entry per feature). ``None``
            uses the 26 Criteo Kaggle cardinalities.
        max_rows_per_table: Cap on every table's rows; ``None`` keeps them as they are.
        num_dense: Number of dense features (non-negative counts, delivered as ``log(1 + count)``).
        popularity_exponent: Power-law exponent ``s`` of ID popularity, one for all features or a list
            with one per feature. ``0`` is uniform; ~1 is typical of click logs.
        uniform: If ``True``, IDs are uniform whatever ``popularity_exponent`` says (a non-skewed control).
        multi_hot: IDs per input of each feature (one for all features or a list). ``1`` is one-hot.
        num_train_samples: Samples in the training stream (one epoch replays the same stream).
        num_val_samples: Samples in the validation stream.
        num_test_samples: Samples in the test stream.
        batch_size: Samples per batch per rank (the global batch is ``batch_size * world_size``).
        seed: Seed of everything: the hidden structure (row mapping, teacher) and the streams.
        num_workers: DataLoader worker processes; ``0`` generates in the main process.
        drift_every_samples: If set, popularity drifts every this many samples of each stream (by
            the sample's position in its split's stream, so val and test drift the same way).
        drift_fraction: At each drift the popularity ranks of a table with ``N`` rows rotate by
            ``max(1, round(drift_fraction * N))``: the row at rank ``k`` becomes the row that was at rank
            ``k + shift``, so the ``shift`` hottest rows turn coldest. A hot set smaller than the shift is
            replaced entirely. Rows keep their teacher effects; only their popularity moves.
        click_rate: Mean click probability (Criteo: about 0.25); the teacher's bias is fitted to it on
            16k samples of a separate stream, so splits land within about 0.01 of it (without drift).
        logit_std: Standard deviation of the teacher's logit; sets the best attainable AUC (1.4: ~0.8).
        sessions: If set (a :class:`~lightning_skew.data.synthetic.sessions.Sessions`), the stream is made of
            sessions: runs of consecutive samples of one user (sessions in random order), each sample carrying
            two more sparse features that stay constant within its session, ``user_id`` (one-hot) and
            ``history`` (a bag of item IDs drawn from the item popularity), and that enter the teacher's click
            probability. ``None`` (default): independent samples, as without this option.

    .. note::
        Sample ``i`` of a split never changes, so ``1`` process with ``batch_size=2B`` sees the same global
        batches as ``2`` processes with ``batch_size=B``: rank ``r``'s ``j``-th batch is samples
        ``[(2j + r) B, (2j + r + 1) B)``. The incomplete last global batch is dropped.

    .. note::
        The most popular 256 ranks of each table get their exact probabilities; the rest follow a
        continuous approximation of the power law (see :class:`PowerLawTables`), and
        :func:`expected_top_share` is exact for what is sampled. The ``multi_hot`` IDs of one input are
        drawn independently, so they may repeat. A checkpoint holds the training stream's position
        (:class:`~lightning_skew.data.position.StreamPosition`): a run resumed mid-epoch goes on with the next
        batch.

    Example::

        >>> dm = SyntheticDataModule(max_rows_per_table=1000, num_train_samples=4096, batch_size=512)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.dense_features.shape, batch.sparse_features.keys()[:2], batch.labels.shape
        (torch.Size([512, 13]), ['cat_0', 'cat_1'], torch.Size([512]))
        >>> 0.7 < dm.best_attainable_auc("val") < 0.9
        True
    """

    def __init__(
        self,
        num_embeddings_per_feature: list[int] | None = None,
        max_rows_per_table: int | None = None,
        num_dense: int = CRITEO_NUM_DENSE,
        popularity_exponent: float | list[float] = 1.05,
        uniform: bool = False,
        multi_hot: int | list[int] = 1,
        num_train_samples: int = 1_048_576,
        num_val_samples: int = 131_072,
        num_test_samples: int = 131_072,
        batch_size: int = 2048,
        seed: int = 0,
        num_workers: int = 0,
        drift_every_samples: int | None = None,
        drift_fraction: float = 0.01,
        click_rate: float = 0.25,
        logit_std: float = 1.4,
        sessions: Sessions | None = None,
    ) -> None:
        super().__init__()
        if num_embeddings_per_feature is None:
            num_embeddings_per_feature = CRITEO_KAGGLE_CARDINALITIES
        _check(
            len(num_embeddings_per_feature) > 0
            and all(_is_int(rows) and rows >= 1 for rows in num_embeddings_per_feature),
            f"num_embeddings_per_feature must be a non-empty list of integers >= 1, got {num_embeddings_per_feature}",
        )
        self._num_embeddings = capped_cardinalities(list(num_embeddings_per_feature), max_rows_per_table)
        # The table sizes in force are logged with the model, which LightningCLI links to them; logged here as
        # well (as given, possibly None) they would clash when Lightning merges both sets of hyperparameters.
        self.save_hyperparameters(ignore=["num_embeddings_per_feature"])
        num_features = len(self._num_embeddings)
        exponents = _per_feature("popularity_exponent", popularity_exponent, num_features)
        for exponent in exponents:
            _check(isinstance(exponent, (int, float)) and math.isfinite(exponent) and exponent >= 0,
                   f"popularity_exponent must be finite and >= 0 (0 = uniform), got {popularity_exponent}")
        if uniform:
            exponents = [0.0] * num_features
        hots = _per_feature("multi_hot", multi_hot, num_features)
        _check(all(_is_int(m) and m >= 1 for m in hots), f"multi_hot must be integers >= 1, got {multi_hot}")
        _check(_is_int(num_dense) and num_dense >= 1, f"num_dense must be an integer >= 1, got {num_dense}")
        for name, value in (("num_train_samples", num_train_samples), ("num_val_samples", num_val_samples),
                            ("num_test_samples", num_test_samples), ("num_workers", num_workers)):
            _check(_is_int(value) and value >= 0, f"{name} must be an integer >= 0, got {value}")
        _check(_is_int(batch_size) and batch_size >= 1, f"batch_size must be an integer >= 1, got {batch_size}")
        _check(_is_int(seed), f"seed must be an integer, got {seed!r}")
        _check(drift_every_samples is None or (_is_int(drift_every_samples) and drift_every_samples >= 1),
               f"drift_every_samples must be None or an integer >= 1, got {drift_every_samples}")
        _check(0.0 < drift_fraction <= 1.0, f"drift_fraction must be in (0, 1], got {drift_fraction}")
        _check(0.0 < click_rate < 1.0, f"click_rate must be in (0, 1), got {click_rate}")
        _check(math.isfinite(logit_std) and logit_std >= 0, f"logit_std must be finite and >= 0, got {logit_std}")

        self.num_samples = {"train": num_train_samples, "val": num_val_samples, "test": num_test_samples}
        self.batch_size = batch_size
        self.num_workers = num_workers
        _check(sessions is None or isinstance(sessions, Sessions),
               f"sessions must be None or a lightning_skew.data.synthetic.Sessions, got {sessions!r}")
        session_rows = None
        if sessions is not None:
            session_rows = tuple(capped_cardinalities([sessions.num_users, sessions.num_items], max_rows_per_table))
        self.log = SyntheticClickLog(
            self._num_embeddings, exponents, hots, num_dense=num_dense, seed=seed,
            drift_every_samples=drift_every_samples, drift_fraction=drift_fraction,
            click_rate=click_rate, logit_std=logit_std, sessions=sessions, session_rows=session_rows,
        )
        extra_names = [f"cat_{i}" for i in range(len(CRITEO_SPARSE_NAMES), num_features)]
        self._names = CRITEO_SPARSE_NAMES[:num_features] + extra_names
        if session_rows is not None:
            self._num_embeddings = self._num_embeddings + list(session_rows)
            self._names = self._names + list(SESSION_FEATURES)
        self.rank, self.world_size = 0, 1
        self.position = StreamPosition()

    @property
    def dense_in_features(self) -> int:
        return self.log.num_dense

    @property
    def sparse_feature_names(self) -> list[str]:
        return list(self._names)

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return list(self._num_embeddings)

    def setup(self, stage: str | None = None) -> None:
        self.rank, self.world_size = self.rank_and_world_size()
        global_batch = self.batch_size * self.world_size
        for split, count in self.num_samples.items():
            if 0 < count < global_batch:
                rank_zero_warn(f"num_{split}_samples={count} is less than one global batch "
                               f"({self.batch_size} x {self.world_size} ranks): the {split} loader is empty")

    def stream(self, split: str, rank: int | None = None, world_size: int | None = None) -> SyntheticClickStream:
        """A rank's dataset for ``split``; by default this rank's, as found by :meth:`setup`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return SyntheticClickStream(self.log, split, self.num_samples[split], self.batch_size,
                                    self.sparse_feature_names, rank, world_size)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.stream(split), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        stream = self.stream("train")
        return self.resuming_loader(stream, len(stream), self.batch_size * self.world_size,
                                    num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def best_attainable_auc(self, split: str = "val") -> float:
        """AUC of the teacher's true click probabilities against the drawn labels over the whole split."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.num_samples[split] == 0:
            raise ValueError(f"num_{split}_samples is 0: no samples to score")
        probabilities, labels = self.log.click_probabilities(split, self.num_samples[split])
        return float(binary_auroc(probabilities, labels.long()))


def generation_throughput(datamodule: SyntheticDataModule, num_batches: int = 20, split: str = "train") -> float:
    """Samples per second generated in this process (batches as the loader yields them, one rank)."""
    stream = datamodule.stream(split)
    start = stream.batch_start(0)
    datamodule.log.to_batch(datamodule.log.generate(split, start, start + stream.batch_size), stream.keys)  # warm-up
    began = time.perf_counter()
    for index in range(num_batches):
        start = stream.batch_start(index + 1)
        datamodule.log.to_batch(datamodule.log.generate(split, start, start + stream.batch_size), stream.keys)
    return num_batches * stream.batch_size / (time.perf_counter() - began)
