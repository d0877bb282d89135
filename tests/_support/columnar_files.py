"""Small files in real formats for the columnar tests: Avazu's click-log CSV and MovieLens' RecBole files."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MOVIELENS = ROOT / ".data" / "ml-100k"
MOVIELENS_MISSING = (f"MovieLens-100k is not in {MOVIELENS}: run `bash scripts/env.sh` (or "
                     "`python scripts/fetch_movielens.py`) with the package registry reachable")

AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                 "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
AVAZU_CATEGORICAL = AVAZU_COLUMNS[3:]
# The first line of Avazu's train.csv (header aside), as published.
AVAZU_FIRST_ROW = ("1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,"
                   "a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79")


def avazu_rows(count: int, seed: int = 0, days: int = 2) -> list[str]:
    """Avazu-format rows over ``days`` days of hours (``YYMMDDHH``), in time order; clicks follow ``site_id``
    (20 sites, each with its own click rate, the same for every ``seed``)."""
    sites_rng = random.Random(12345)
    sites = [f"{sites_rng.getrandbits(32):08x}" for _ in range(20)]
    click_rate = {site: sites_rng.random() for site in sites}
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        hour = 14102100 + (i * days // count) * 100 + (i * days * 24 // count) % 24
        site = sites[min(int(rng.paretovariate(1.2)) - 1, len(sites) - 1)]
        click = int(rng.random() < click_rate[site])
        fields = [str(10**18 + i), str(click), str(hour), rng.choice(["1005", "1002", "1010"]), str(rng.randint(0, 1)),
                  site, f"{rng.getrandbits(32):08x}", "28905ebd", "ecad2386", "7801e8d9", "07d7df22",
                  "a99f214a", f"{rng.getrandbits(32):08x}", f"{rng.getrandbits(16):08x}", "1", str(rng.randint(0, 3)),
                  str(rng.randint(15000, 16000)), "320", "50", str(rng.randint(1700, 1800)), "0", "35",
                  rng.choice(["-1", "100084", "100148"]), str(rng.randint(0, 100))]
        rows.append(",".join(fields))
    return rows


def write_text(path: Path, text: str, compress: bool = False) -> Path:
    """``text`` into ``path``, gzip-compressed when ``compress``."""
    if compress:
        with gzip.open(path, "wt") as out:
            out.write(text)
    else:
        path.write_text(text)
    return path


def write_avazu(path: Path, rows: list[str], compress: bool = False) -> Path:
    return write_text(path, ",".join(AVAZU_COLUMNS) + "\n" + "".join(row + "\n" for row in rows), compress)
