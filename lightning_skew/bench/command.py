"""``lightning-skew bench``: the command line that runs variants side by side and prints and writes the report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning_skew.bench.launch import COMMAND_ENV, launch_ranks, launched_rank
from lightning_skew.bench.report import format_report, machine_info
from lightning_skew.bench.runner import build_recipe, run_bench, world_size_of
from lightning_skew.bench.stats import RATIO_METHOD, summarize
from lightning_skew.bench.variants import presets, variants_from

DEFAULT_CONFIG = "recipes/dlrm_synthetic.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-skew bench", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train benchmark variants side by side (alternating, repeated) and compare samples/s and "
                    "model quality. A variant is what `lightning-skew fit --config RECIPE ...` runs with more "
                    "arguments: a preset (recipes/variants/NAME.yaml), a YAML fragment, or overrides. Other "
                    "arguments (--data.init_args.X v, --trainer.devices 2) override the recipe for every variant.",
        epilog="presets:\n" + "\n".join(f"  {name:30} {text}" for name, text in presets().items()))
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the recipe (a LightningCLI config)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated preset names (default handwritten,lightning unless --variant is given)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                        help="a variant of your own, after those of --variants: SPEC is an optional preset name or "
                             "YAML file, then LightningCLI arguments, e.g. base= , hc=recipes/variants/hotcold.yaml, "
                             "k4=\"stale --trainer.callbacks.init_args.keep_one_in 4\"; repeatable. The first "
                             "variant is the baseline")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="training samples per run (sets data.init_args.num_train_samples)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps of every run left untimed")
    parser.add_argument("--epochs", type=int, default=1, help="epochs every variant trains (default 1)")
    parser.add_argument("--output", default=None, help="also write the report here as JSON")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``lightning-skew bench``: parse arguments, run, print the report and write it (``--output``).

    The first variant is the baseline that the others are divided by. With ``--trainer.devices N`` (N > 1, on
    CPU with gloo) the command starts N ranks that run every variant together (the hand-written baseline on
    TorchRec's DMP over the same ranks); figures are global samples/s, rank zero prints and writes the report.
    Example::

        lightning-skew bench --config recipes/dlrm_synthetic.yaml --variants handwritten,lightning,hotcold \\
            --variant small_hot="hotcold --trainer.strategy.init_args.budget_bytes 4000000" --output bench.json
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parser().parse_known_args(argv)
    names = args.variants if args.variants is not None or args.variant else "handwritten,lightning"
    variants = variants_from(names, args.variant)  # an unknown name fails here, listing the presets
    if args.repeats < 1 or args.warmup_steps < 1 or args.epochs < 1:
        raise SystemExit(f"--repeats, --warmup-steps and --epochs must be at least 1, got {args.repeats}, "
                         f"{args.warmup_steps}, {args.epochs}")
    world_size = world_size_of(overrides)
    if world_size > 1 and launched_rank() is None:
        return launch_ranks(argv, world_size, args.output)
    rank = launched_rank() or 0
    machine = machine_info()  # before any work, so the load average is the machine's, not ours
    _quiet_logs()
    recipe_args = ["--config", args.config, *overrides]
    if args.train_samples is not None:
        recipe_args += ["--data.init_args.num_train_samples", str(args.train_samples)]
    probe = build_recipe(recipe_args)  # fails early on a bad recipe; also gives the data's sizes
    best = getattr(probe.datamodule, "best_attainable_auc", None)
    best_auc = float(best("val")) if callable(best) else None
    train_samples = getattr(probe.datamodule, "num_samples", {}).get("train")
    del probe

    runs = run_bench(recipe_args, variants, args.repeats, args.warmup_steps,
                     progress=(lambda line: print(line, flush=True)) if rank == 0 else None, epochs=args.epochs)
    summaries = summarize(runs, baseline=variants[0].name)
    report = {
        "command": "lightning-skew bench " + os.environ.get(COMMAND_ENV, shlex.join(argv)),
        "machine": machine,
        "settings": {"config": args.config, "overrides": overrides, "variants": [v.name for v in variants],
                     "variant_args": {v.name: list(v.args) for v in variants},
                     "repeats": args.repeats, "train_samples_per_run": train_samples,
                     "warmup_steps": args.warmup_steps, "epochs": args.epochs, "world_size": world_size},
        "baseline": variants[0].name,
        "ratio_method": RATIO_METHOD,
        "best_attainable_auc": best_auc,
        "max_foreign_cpu_share": max((r.foreign_cpu_share for r in runs if r.foreign_cpu_share is not None),
                                     default=None),
        "variants": {name: asdict(s) for name, s in summaries.items()},
        "runs": [asdict(run) for run in runs],
    }
    if rank == 0:
        print(format_report(report), flush=True)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if launched_rank() is not None:
        _finish_rank()
    return report


def _finish_rank() -> None:
    # A launched rank ends here, skipping interpreter teardown: destructors of gloo's and TorchRec's background
    # threads can abort a finished process (exit -6). Every collective has completed, so no rank waits on it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _quiet_logs() -> None:
    # Per-run banners (devices, sharding plan, process group) would bury the figures; warnings stay.
    for name in ("lightning.pytorch", "lightning.fabric", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="torchrec")
    warnings.filterwarnings("ignore", module="fbgemm_gpu")
    # Lightning's guess about sized IterableDatasets; lightning-skew's streams split batches among workers.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
