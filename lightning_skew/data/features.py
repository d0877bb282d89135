"""Feature layout of the Criteo click logs, which the synthetic generator imitates by default."""

from __future__ import annotations

CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26

# The Criteo data set's own column names (its README): integer features I1..I13, categorical features C1..C26.
# CriteoDataModule names its features, tables, profiles and errors with them.
CRITEO_INTEGER_COLUMNS: list[str] = [f"I{i + 1}" for i in range(CRITEO_NUM_DENSE)]
CRITEO_CATEGORICAL_COLUMNS: list[str] = [f"C{i + 1}" for i in range(CRITEO_NUM_SPARSE)]

# Generic names of Criteo-shaped features, which the synthetic generator gives its own (cat_0, cat_1, ...).
CRITEO_DENSE_NAMES: list[str] = [f"int_{i}" for i in range(CRITEO_NUM_DENSE)]
CRITEO_SPARSE_NAMES: list[str] = [f"cat_{i}" for i in range(CRITEO_NUM_SPARSE)]

# Distinct values per categorical feature in the Criteo Kaggle (Display Advertising Challenge) data,
# as published with the DLRM reference implementation.
CRITEO_KAGGLE_CARDINALITIES: list[int] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]

# Distinct values per categorical feature in the Criteo Terabyte (1TB) click log, as published with
# TorchRec's DLRM example.
CRITEO_TERABYTE_CARDINALITIES: list[int] = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10, 2209,
    11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]


def capped_cardinalities(cardinalities: list[int], max_rows_per_table: int | None) -> list[int]:
    """Cap every table at ``max_rows_per_table`` rows (``None`` keeps them as they are)."""
    if max_rows_per_table is None:
        return list(cardinalities)
    if max_rows_per_table < 1:
        raise ValueError(f"max_rows_per_table must be at least 1, got {max_rows_per_table}")
    return [min(rows, max_rows_per_table) for rows in cardinalities]
