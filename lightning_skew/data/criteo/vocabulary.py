"""The frequency-thresholded vocabulary of the Criteo categorical features, and the pass that builds it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from lightning_skew.data.criteo.files import _LineStream, resolve_tsv_paths
from lightning_skew.data.criteo.parse import _handle_malformed, parse_tsv_lines
from lightning_skew.data.features import CRITEO_NUM_SPARSE

log = logging.getLogger(__name__)

VOCABULARY_FORMAT_VERSION = 1


class CriteoVocabulary:
    """Frequency-thresholded vocabulary of the 26 categorical features, built by :func:`build_vocabulary`.

    Feature ``i`` maps each of its ``V_i`` kept values to a row in ``1..V_i`` (most frequent first, ties
    by value); row 0 holds every other value: rare, unseen or missing. Its table has ``V_i + 1`` rows.

    Stored as one ``.npz`` file: per feature ``keys_{i}`` (the kept values, sorted, ``uint64``) and
    ``rows_{i}`` (their rows, ``int64``), and ``metadata``, a JSON string with ``format_version``,
    ``source_files`` (absolute paths), ``min_frequency``, ``num_lines``, ``num_malformed_lines`` and
    ``num_embeddings_per_feature``. Memory: 16 bytes per kept value when loaded (about 540 MB for all
    Criteo Kaggle values), loaded on first lookup.

    Args:
        path: The ``.npz`` file written by :func:`build_vocabulary`.

    Example::

        vocabulary = CriteoVocabulary("criteo_vocab.npz")
        vocabulary.num_embeddings_per_feature  # [V_0 + 1, ..., V_25 + 1]
        rows = vocabulary.lookup(parsed.categorical, parsed.categorical_missing)
    """

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"vocabulary file {path!r} does not exist; write it first with "
                "lightning_skew.data.criteo.build_vocabulary(paths, min_frequency, output_path)"
            )
        self.path = path
        with np.load(path, allow_pickle=False) as archive:
            self.metadata: dict = json.loads(str(archive["metadata"]))
        if self.metadata.get("format_version") != VOCABULARY_FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported vocabulary format {self.metadata.get('format_version')!r}")
        self._tables: list[tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        """Rows per table: kept values plus row 0."""
        return list(self.metadata["num_embeddings_per_feature"])

    @property
    def min_frequency(self) -> int:
        return int(self.metadata["min_frequency"])

    @property
    def source_files(self) -> list[str]:
        return list(self.metadata["source_files"])

    def _load(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._tables is None:
            with np.load(self.path, allow_pickle=False) as archive:
                self._tables = [
                    (archive[f"keys_{i}"], archive[f"rows_{i}"]) for i in range(CRITEO_NUM_SPARSE)
                ]
        return self._tables

    def lookup(self, raw: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
        """Rows (``int64 [n, 26]``) of raw categorical values; ``missing`` marks empty fields (row 0)."""
        raw = raw.astype(np.uint64, copy=False)
        ids = np.zeros(raw.shape, dtype=np.int64)
        for i, (keys, rows) in enumerate(self._load()):
            if len(keys) == 0:
                continue
            column = raw[:, i]
            index = np.minimum(np.searchsorted(keys, column), len(keys) - 1)
            found = keys[index] == column
            if missing is not None:
                found &= ~missing[:, i]
            ids[:, i] = np.where(found, rows[index], 0)
        return ids


def _merge_counts(
    keys: np.ndarray, counts: np.ndarray, new_keys: np.ndarray, new_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    merged, inverse = np.unique(np.concatenate([keys, new_keys]), return_inverse=True)
    return merged, np.bincount(inverse, weights=np.concatenate([counts, new_counts])).astype(np.int64)


def build_vocabulary(
    paths: Sequence[str] | str,
    min_frequency: int,
    output_path: str,
    skip_malformed: bool = False,
    lines_per_chunk: int = 1 << 18,
    progress: bool = True,
) -> CriteoVocabulary:
    """Count the categorical values of Criteo TSV files and write a :class:`CriteoVocabulary`.

    One sequential pass over ``paths`` (files, directories or globs, plain or gzip) with bounded
    memory for the lines (``lines_per_chunk`` at a time); the counts themselves take 16 bytes per
    distinct value and feature (plus a transient copy while merging), so the Kaggle data (~34M
    distinct values) fits in a few GB but the full Terabyte data does not: build it from a subset
    of days, or with a higher threshold on a machine with the memory.

    Args:
        paths: The TSV files whose values are counted (usually the training files only).
        min_frequency: A value is kept (gets its own row) when seen at least this many times.
        output_path: Where the ``.npz`` is written (atomically, through a temporary file).
        skip_malformed: Skip and count malformed lines instead of raising.
        lines_per_chunk: Lines parsed at once.
        progress: Show a progress bar of the lines read (on stderr).

    Returns:
        The vocabulary, read back from ``output_path``.
    """
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    files = resolve_tsv_paths(paths, "build_vocabulary")
    keys = [np.zeros(0, dtype=np.uint64) for _ in range(CRITEO_NUM_SPARSE)]
    counts = [np.zeros(0, dtype=np.int64) for _ in range(CRITEO_NUM_SPARSE)]
    num_lines = num_malformed = 0
    stream = _LineStream(files)
    bar = tqdm(desc="build_vocabulary", unit=" lines", unit_scale=True, disable=not progress)
    while True:
        lines = stream.take(lines_per_chunk)
        if not lines:
            break
        parsed = parse_tsv_lines(lines)
        num_malformed += _handle_malformed(parsed, stream.locate, skip_malformed)
        num_lines += len(lines)
        bar.update(len(lines))
        for i in range(CRITEO_NUM_SPARSE):
            present = parsed.categorical[~parsed.categorical_missing[:, i], i]
            chunk_keys, chunk_counts = np.unique(present, return_counts=True)
            keys[i], counts[i] = _merge_counts(keys[i], counts[i], chunk_keys, chunk_counts)

    bar.close()
    arrays: dict[str, np.ndarray] = {}
    sizes: list[int] = []
    for i in range(CRITEO_NUM_SPARSE):
        kept = counts[i] >= min_frequency
        kept_keys, kept_counts = keys[i][kept], counts[i][kept]
        # Most frequent first (hot rows at the top of the table); keys are sorted, so ties go by value.
        order = np.argsort(-kept_counts, kind="stable")
        rows = np.empty(len(kept_keys), dtype=np.int64)
        rows[order] = np.arange(1, len(kept_keys) + 1)
        arrays[f"keys_{i}"], arrays[f"rows_{i}"] = kept_keys, rows
        sizes.append(len(kept_keys) + 1)
    metadata = {
        "format_version": VOCABULARY_FORMAT_VERSION,
        "source_files": [os.path.abspath(f) for f in files],
        "min_frequency": min_frequency,
        "num_lines": num_lines,
        "num_malformed_lines": num_malformed,
        "num_embeddings_per_feature": sizes,
    }
    arrays["metadata"] = np.array(json.dumps(metadata))
    temporary = f"{output_path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as out:
        np.savez(out, **arrays)
    os.replace(temporary, output_path)
    if num_malformed:
        log.warning("build_vocabulary skipped %d malformed lines of %d", num_malformed, num_lines)
    return CriteoVocabulary(output_path)
