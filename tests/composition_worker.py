"""One composition cell (strategy x popularity batching x skipper) as a fit: in the test process, or as one rank
of a several-process run started by the tests (like torchrun). Writes losses, drops and whole tables to --out."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch

from _support.composition import fit_cell


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cell", required=True, help="strategy,batching,skipper ('none' for none)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cell = tuple(None if part == "none" else part for part in args.cell.split(","))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    result = fit_cell(cell, Path(args.out), epochs=1, world_size=world_size)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(args.out) / "result.pt")


if __name__ == "__main__":
    from _support.launch import finish_rank

    main()
    finish_rank()
