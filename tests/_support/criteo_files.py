"""Small Criteo files in the real TSV format: table sizes and random or given lines."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

SIZES = [97, 1000, 13, 7] + [50] * 22


def criteo_line(label: str, dense: list[str], categorical: list[str]) -> str:
    assert len(dense) == 13 and len(categorical) == 26
    return "\t".join([label, *dense, *categorical]) + "\n"


def random_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        dense = ["" if rng.random() < 0.2 else str(rng.randint(-3, 3000)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.getrandbits(32):08x}" for _ in range(26)]
        lines.append(criteo_line(str(rng.randint(0, 1)), dense, cats))
    return lines


def write_tsv(path: Path, lines: list[str], compress: bool = False) -> str:
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)
