"""A history feature for interaction logs: each row's previous items of its user, in time order, no look-ahead.

Run as ``python -m lightning_skew.dedup.history RATINGS OUT [--length N]`` on a tab-separated log with a header
(MovieLens-100k's ``ml-100k.inter``: user, item, rating, timestamp): it writes the log in time order with one
more column, ``history``, the user's ``N`` most recent items rated strictly before the row's timestamp
(oldest first, space-separated; empty for a user's first ratings). Ratings of one user at one timestamp share
their history, so a log in time order repeats it over consecutive rows: what
:class:`~lightning_skew.dedup.DedupDataModule` sends once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["histories", "write_with_history"]


def histories(users: np.ndarray, items: np.ndarray, times: np.ndarray, length: int) -> list[list[int]]:
    """For every row, the items of the same user with an earlier time, the ``length`` most recent, oldest first
    (rows with equal time see none of each other)."""
    if length < 1:
        raise ValueError(f"history length must be at least 1, got {length}")
    order = np.lexsort((items, times, users))
    out: list[list[int]] = [[] for _ in range(len(users))]
    start = 0
    for stop in range(1, len(order) + 1):
        if stop < len(order) and users[order[stop]] == users[order[start]]:
            continue
        rows = order[start:stop]
        earlier = np.searchsorted(times[rows], times[rows], side="left")
        user_items = items[rows].tolist()
        for row, count in zip(rows.tolist(), earlier.tolist(), strict=True):
            out[row] = user_items[max(0, count - length):count]
        start = stop
    return out


def write_with_history(ratings: Path, out: Path, length: int = 50) -> int:
    """Write ``ratings`` (tab-separated, header, columns user, item, ..., timestamp last) in time order (ties by
    user, then item) with a ``history`` column appended; returns the rows written."""
    lines = Path(ratings).read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{ratings}: no rows under the header")
    header, rows = lines[0], [line.split("\t") for line in lines[1:] if line.strip()]
    bad = next((n + 2 for n, row in enumerate(rows) if len(row) != len(rows[0])), None)
    if bad is not None:
        raise ValueError(f"{ratings}, line {bad}: {len(rows[bad - 2])} fields where the first row has {len(rows[0])}")
    users = np.array([int(row[0]) for row in rows])
    items = np.array([int(row[1]) for row in rows])
    times = np.array([float(row[-1]) for row in rows])
    past = histories(users, items, times, length)
    order = np.lexsort((items, users, times))
    body = ["\t".join([*rows[i], " ".join(map(str, past[i]))]) for i in order.tolist()]
    Path(out).write_text("\n".join([header + "\thistory", *body]) + "\n")
    return len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ratings", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--length", type=int, default=50, help="most items in a history (default 50)")
    args = parser.parse_args()
    print(f"wrote {write_with_history(args.ratings, args.out, args.length)} rows to {args.out}")


if __name__ == "__main__":
    main()
