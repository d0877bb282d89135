"""Fetch MovieLens-100k (RecBole's atomic files) for the tests and recipes/dlrm_movielens.yaml.

The files ship inside the ``recbole==1.2.1`` wheel (``recbole/dataset_example/ml-100k/``). The wheel is
downloaded with ``pip download --no-deps`` (RecBole itself is never installed: its dependencies are heavy) and
the three files are extracted with :mod:`zipfile`. Nothing happens when the files are there already. Exits 0
whatever happens, after saying so when the files could not be fetched (no network): the set-up must not fail,
and the tests that need the files skip with a message naming this script.

    python scripts/fetch_movielens.py [DEST]   # DEST defaults to .data/ml-100k in the checkout
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
SUFFIXES = ("inter", "user", "item")


def fetch(dest: Path) -> bool:
    """Put ml-100k.inter, .user and .item into ``dest``; True when they are there afterwards."""
    wanted = [dest / f"ml-100k.{suffix}" for suffix in SUFFIXES]
    if all(path.is_file() for path in wanted):
        return True
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "--retries", "1", "--timeout", "20", WHEEL, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            print(f"fetch_movielens: could not download {WHEEL} ({reason}); the MovieLens tests will skip. "
                  f"Run `python scripts/fetch_movielens.py` once the package registry is reachable.", file=sys.stderr)
            return False
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for suffix, path in zip(SUFFIXES, wanted, strict=True):
                partial = path.with_name(path.name + ".part")
                partial.write_bytes(wheel.read(MEMBER.format(suffix)))
                os.replace(partial, path)  # a file is whole or absent, never half written
    print(f"fetch_movielens: MovieLens-100k is in {dest}", file=sys.stderr)
    return True


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / ".data" / "ml-100k"
    fetch(target)
