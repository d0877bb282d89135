"""``lightning-skew profile``: profile a recipe's training data, print its skew and suggest a hot-set budget."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_skew.cli import SkewCLI
from lightning_skew.profile.access import AccessProfile
from lightning_skew.profile.budget import BudgetPoint, lookup_coverage
from lightning_skew.profile.loader import profile_dataloader
from lightning_skew.profile.skew import TableSkew
from lightning_skew.profile.sources import profiled_data

__all__ = ["build_datamodule", "format_bytes", "format_table", "main", "parse_bytes", "sample_line"]

DEFAULT_CONFIG = "recipes/dlrm_synthetic.yaml"
PROFILE_FILE = "profile.pt"
COVERAGE_PLOT = "coverage.png"
POPULARITY_PLOT = "popularity.png"
SUMMARY_FILE = "summary.json"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """Bytes from a size: ``65536``, ``64MB`` (10^6), ``64MiB`` or ``64M`` (2^20), ``1.5GB``; case-insensitive."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 65536, 64MB, 64MiB or 1.5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(size: float) -> str:
    """A size in decimal units, e.g. ``1.21 MB``."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


class _DataOnlyCLI(SkewCLI):
    """Parses a recipe (model optional) and builds only its DataModule."""

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        # build_datamodule always names both classes, so the public attributes hold them.
        parser.add_lightning_class_args(self.model_class, "model", subclass_mode=True, required=False)
        parser.add_lightning_class_args(self.datamodule_class, "data", subclass_mode=True)

    def instantiate_classes(self) -> None:
        config = self.config.clone()
        for section in ("trainer", "model"):
            if section in config:
                del config[section]
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
        self.config_init = instantiate(config)
        self.datamodule = self.config_init["data"]
        self.model = None
        self.trainer = None


def build_datamodule(recipe_args: list[str]) -> tuple[pl.LightningDataModule, dict[str, Any]]:
    """The DataModule of a recipe (``--config recipe.yaml --data.init_args.X v ...``) and its model's init args.

    Only the data is built; the trainer and model sections are parsed (so a full recipe is accepted)
    but not instantiated. The model's arguments (``{}`` without a model) give the embedding width.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _DataOnlyCLI(model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule,
                           subclass_mode_model=True, subclass_mode_data=True, save_config_callback=None,
                           args=list(recipe_args), run=False, auto_configure_optimizers=False)
    model = cli.config.get("model")
    model_args = dict(vars(model.init_args)) if model is not None and model.get("init_args") is not None else {}
    return cli.datamodule, model_args


def format_table(stats: list[TableSkew], hot_per_table: list[int], coverage_per_table: list[float]) -> str:
    """The per-table report: rows, rows seen (and their share of the rows), lookups, share of missing values,
    top-1% share and exponent (over present values and the rows seen), hot rows and coverage."""
    header = ("table", "rows", "seen", "seen%", "lookups", "missing", "top1%", "exponent", "hot rows", "coverage")
    lines = [header]
    for stat, hot, coverage in zip(stats, hot_per_table, coverage_per_table, strict=True):
        seen = f"{stat.distinct_rows}" if stat.exact else f">={stat.distinct_rows}"
        exponent = "-" if math.isnan(stat.exponent) else f"{stat.exponent:.3f}"
        missing = "-" if stat.missing_row is None else f"{stat.missing_share:.3f}"
        lines.append((stat.table, str(stat.num_rows), seen, _percent(stat.seen_share), str(stat.lookups), missing,
                      f"{stat.top1_share:.3f}", exponent, str(hot), f"{coverage:.3f}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))) for row in lines)


def _percent(share: float) -> str:
    """A share as a percentage with two significant digits below 10% (``0.05%``), else one decimal."""
    percent = 100 * share
    return f"{percent:.1f}%" if percent >= 10 or percent == 0 else f"{percent:.2g}%"


def sample_line(profile: AccessProfile) -> str:
    """How much of the stream was counted: inputs and batches counted of those seen, and the lookups."""
    return (f"counted {profile.num_inputs_counted} of {profile.num_inputs_seen} inputs "
            f"({_percent(profile.num_inputs_counted / max(profile.num_inputs_seen, 1))}; "
            f"{profile.num_batches_counted} of {profile.num_batches_seen} batches, sample fraction "
            f"{profile.sample_fraction:g} by {profile.sample_by}), {profile.total_lookups} lookups")


def _per_table_coverage(profile: AccessProfile, hot_rows: list[torch.Tensor]) -> list[float]:
    return [lookup_coverage([profile.counts(name)], [rows], profile.lookups[name])
            for name, rows in zip(profile.feature_names, hot_rows, strict=True)]


def curve_budgets(smallest_row: int, largest: int, chosen: int, suggested: int | None, points: int = 24) -> list[int]:
    """Log-spaced budgets from one row to ``largest`` bytes, plus the chosen and suggested ones, sorted."""
    largest = max(largest, smallest_row)
    spaced = torch.logspace(math.log10(smallest_row), math.log10(largest), points, dtype=torch.float64)
    budgets = {int(b) for b in spaced.tolist()} | {chosen} | ({suggested} if suggested else set())
    return sorted(b for b in budgets if b >= smallest_row)


def plot_coverage(points: list[BudgetPoint], budget: int, suggested: int | None, path: Path) -> None:
    """Lookup coverage and all-hot input share against the budget (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    megabytes = [p.budget_bytes / 1e6 for p in points]
    axes.plot(megabytes, [p.coverage for p in points], marker=".", label="lookup coverage")
    axes.plot(megabytes, [p.all_hot_inputs for p in points], marker=".", label="inputs whose lookups are all hot")
    axes.axvline(budget / 1e6, color="gray", linestyle="--", label=f"budget {format_bytes(budget)}")
    if suggested:
        axes.axvline(suggested / 1e6, color="green", linestyle=":", label=f"90% coverage {format_bytes(suggested)}")
    axes.set(xscale="log", xlabel="hot-set budget (MB)", ylabel="share", ylim=(0, 1.02),
             title="Hot-set coverage against memory budget")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_popularity(profile: AccessProfile, path: Path, max_points: int = 400) -> None:
    """Lookup count against popularity rank per table (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in profile.feature_names:
        _, counts = profile.present_counts(name)  # the missing row is no popular value
        ordered = torch.sort(counts[counts > 0], descending=True).values
        if ordered.numel() == 0:
            continue
        ranks = torch.unique(torch.logspace(0, math.log10(ordered.numel()), max_points).round().long())
        axes.plot(ranks.numpy(), ordered[ranks - 1].numpy(), linewidth=1, label=name)
    axes.set(xscale="log", yscale="log", xlabel="popularity rank", ylabel="lookups counted",
             title="Popularity curve per table")
    axes.grid(True, which="both", alpha=0.3)
    if len(profile.feature_names) <= 10:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _log_to_wandb(output_dir: Path, settings: dict[str, Any], stats: list[TableSkew], hot_per_table: list[int],
                  coverage_per_table: list[float], summary: dict[str, Any]) -> None:
    import wandb

    run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(output_dir), project="lightning-skew",
                     name="profile", job_type="profile", config=settings)
    columns = ["table", "rows", "rows_seen", "seen_share", "lookups", "missing_share", "top1_share", "exponent",
               "hot_rows", "coverage", "exact"]
    table = wandb.Table(columns=columns)
    for stat, hot, coverage in zip(stats, hot_per_table, coverage_per_table, strict=True):
        table.add_data(stat.table, stat.num_rows, stat.distinct_rows, stat.seen_share, stat.lookups,
                       stat.missing_share, stat.top1_share, stat.exponent, hot, coverage, stat.exact)
    run.log({"profile/tables": table,
             "profile/coverage": wandb.Image(str(output_dir / COVERAGE_PLOT)),
             "profile/popularity": wandb.Image(str(output_dir / POPULARITY_PLOT))})
    if "tiers" in summary:  # profile --tiers: the policies' table and plot
        from lightning_skew.tiers.command import log_tiers_to_wandb

        log_tiers_to_wandb(run, summary["tiers"])
    run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
    run.finish()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-skew profile", allow_abbrev=False,
        description="Count the embedding lookups of a recipe's training data per (table, row), print each table's "
                    "skew, choose the hot rows under a memory budget and suggest the budget that covers 90% of "
                    "lookups. Other arguments (--data.init_args.X v, --model.init_args.X v) override the recipe; "
                    "only the DataModule is built.")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the recipe or any config with a data section")
    parser.add_argument("--budget", default=None,
                        help="hot-set memory, e.g. 64MB (10^6 bytes), 64MiB (2^20) or bytes; default: the suggestion")
    parser.add_argument("--sample-fraction", type=float, default=0.05,
                        help="share of batches (or inputs) counted (FAE profiles 5%%); 1 counts every input exactly")
    parser.add_argument("--sample-by", choices=("inputs", "batches"), default="batches",
                        help="batches: whole batches are sampled, and data that can seek (the synthetic "
                             "generator) never produces the others; inputs: every batch is read, a share of "
                             "its inputs counted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--embedding-dim", type=int, default=None,
                        help="row width; default: the recipe model's embedding_dim, else 16")
    parser.add_argument("--optimizer", default=None,
                        help="embedding optimizer whose state a hot row carries (sgd, rowwise_adagrad, adagrad, "
                             "adam); default: the recipe model's embedding_optimizer, else rowwise_adagrad")
    parser.add_argument("--bytes-per-element", type=int, default=4, help="bytes of one weight (fp32: 4)")
    parser.add_argument("--mode", choices=("global", "proportional", "equal"), default="global",
                        help="global: FAE's cut over all tables; proportional/equal: per-table budget shares")
    parser.add_argument("--target-coverage", type=float, default=0.9, help="coverage the suggested budget reaches")
    parser.add_argument("--sketch-above-rows", type=int, default=None,
                        help="count tables with more rows than this with a bounded-memory sketch")
    parser.add_argument("--sketch-counters", type=int, default=65536, help="counters per sketched table")
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; profiling is a stream of small tensor ops, which a second "
                             "thread slows down on a busy machine (default 1)")
    parser.add_argument("--repeat-batches", type=int, default=8,
                        help="training batches whose repeated bags per feature are reported (0: none)")
    parser.add_argument("--output-dir", default="runs/profile", help="where the profile, plots and summary go")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to wandb")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from lightning_skew.tiers.command import add_tier_arguments

    add_tier_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> AccessProfile:
    """``lightning-skew profile``: profile, report, plot, log, save; returns the profile."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parser().parse_known_args(argv)
    if not 0.0 < args.target_coverage <= 1.0:
        raise SystemExit(f"--target-coverage must be in (0, 1], got {args.target_coverage}")
    budget = parse_bytes(args.budget) if args.budget is not None else None
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    datamodule, model_args = build_datamodule(["--config", args.config, *overrides])
    for needed in ("sparse_feature_names", "num_embeddings_per_feature"):
        if not hasattr(datamodule, needed):
            raise SystemExit(f"{type(datamodule).__name__} has no {needed}: profile needs a RecDataModule")
    embedding_dim = args.embedding_dim or model_args.get("embedding_dim") or 16
    optimizer = args.optimizer or model_args.get("embedding_optimizer") or "rowwise_adagrad"
    row_size = {"bytes_per_element": args.bytes_per_element, "optimizer": optimizer}

    data = profiled_data(datamodule)  # wrappers regroup or filter batches; the profile describes the data
    data.setup("fit")
    profile = AccessProfile.for_datamodule(data, sample_fraction=args.sample_fraction,
                                           sample_by=args.sample_by, seed=args.seed,
                                           sketch_above_rows=args.sketch_above_rows,
                                           sketch_counters=args.sketch_counters)
    profile_dataloader(profile, data.train_dataloader(), progress=not args.no_progress,
                       max_batches=args.max_batches)
    profile.all_reduce()
    if profile.total_lookups == 0:
        raise SystemExit(f"no lookups were counted ({sample_line(profile)}): the training loader is empty or the "
                         f"sample too small; raise --sample-fraction (1 counts every input)")
    speed = profile.num_inputs_seen / max(profile.seconds, 1e-9)
    print(f"profiled {profile.num_inputs_seen} inputs in {profile.seconds:.1f} s ({speed:,.0f} inputs/s); "
          f"{sample_line(profile)}", flush=True)
    sample_warning = profile.sample_warning(option="--sample-fraction")

    sizes = profile.bytes_per_row(embedding_dim, **row_size)
    suggested = profile.suggest_budget(args.target_coverage, embedding_dim, **row_size)
    chosen = budget if budget is not None else (suggested or sum(s * n for s, n in zip(sizes, profile.num_rows,
                                                                                      strict=True)))
    hot = profile.hot_rows(chosen, embedding_dim, mode=args.mode, **row_size)
    stats = profile.skew()
    hot_per_table = [int(rows.numel()) for rows in hot.rows]
    coverage_per_table = _per_table_coverage(profile, hot.rows)
    coverage, all_hot = profile.coverage(hot), profile.all_hot_share(hot)
    hot_bytes = sum(n * s for n, s in zip(hot_per_table, sizes, strict=True))

    print(f"\nrows take {sizes[0] if len(set(sizes)) == 1 else sizes} bytes each (embedding_dim {embedding_dim}, "
          f"{optimizer} state, {args.bytes_per_element}-byte elements)")
    print(format_table(stats, hot_per_table, coverage_per_table))
    print(f"\nbudget {format_bytes(chosen)} ({chosen} bytes, {args.mode} cut): {sum(hot_per_table)} hot rows "
          f"({hot_bytes} bytes), lookup coverage {coverage:.3f}, inputs all hot {all_hot:.3f}")
    if suggested is None:
        print(f"suggested budget: none; the counted rows cover less than {args.target_coverage:.0%} of lookups "
              f"(sketched tables dropped counts)")
    else:
        print(f"suggested budget: {format_bytes(suggested)} ({suggested} bytes) covers "
              f"{args.target_coverage:.0%} of lookups")

    missing = [f"{stat.table} {stat.missing_share:.3f}" for stat in stats if stat.missing_lookups]
    if missing:
        print(f"missing values (their own row, hot like any other; skew is over present values): "
              f"{', '.join(missing)}")

    repeats = {}
    if args.repeat_batches > 0:
        from lightning_skew.dedup.lookups import batch_repeats, format_repeats

        repeats = batch_repeats(data.train_dataloader(), args.repeat_batches)
        print("\n" + format_repeats(repeats, getattr(data, "batch_size", None), args.repeat_batches))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    largest = sum(profile.counts(name)[0].numel() * size for name, size in zip(profile.feature_names, sizes,
                                                                               strict=True))
    points = profile.coverage_curve(curve_budgets(min(sizes), largest, chosen, suggested), embedding_dim,
                                    mode=args.mode, **row_size)
    plot_coverage(points, chosen, suggested, output_dir / COVERAGE_PLOT)
    plot_popularity(profile, output_dir / POPULARITY_PLOT)
    profile.save(output_dir / PROFILE_FILE)
    summary = {
        "command": "lightning-skew profile " + " ".join(argv),
        "profile_file": str(output_dir / PROFILE_FILE),
        "inputs_seen": profile.num_inputs_seen, "inputs_counted": profile.num_inputs_counted,
        "batches_seen": profile.num_batches_seen, "batches_counted": profile.num_batches_counted,
        "sample_fraction": profile.sample_fraction, "sample_by": profile.sample_by, "sample_warning": sample_warning,
        "lookups_counted": profile.total_lookups, "seconds": profile.seconds, "inputs_per_s": speed,
        "embedding_dim": embedding_dim, "optimizer": optimizer, "bytes_per_row": sizes,
        "budget_bytes": chosen, "mode": args.mode, "hot_rows": sum(hot_per_table), "hot_bytes": hot_bytes,
        "coverage": coverage, "all_hot_inputs": all_hot, "suggested_budget_bytes": suggested,
        "target_coverage": args.target_coverage,
        "tables": [{**asdict(s), "seen_share": s.seen_share, "missing_share": s.missing_share, "hot_rows": h,
                    "coverage": c} for s, h, c in zip(stats, hot_per_table, coverage_per_table, strict=True)],
        "curve": [asdict(p) for p in points],
        "distinct_bag_share": repeats,
    }
    if args.tiers:
        from lightning_skew.tiers.command import simulate_tiers

        summary["tiers"] = simulate_tiers(args, datamodule, profile, chosen, embedding_dim, optimizer, output_dir)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if not args.no_wandb:
        settings = dict(vars(args)) | {"overrides": overrides, "dataset": profile.dataset}
        _log_to_wandb(output_dir, settings, stats, hot_per_table, coverage_per_table, summary)
    print(f"wrote {output_dir / PROFILE_FILE}, {output_dir / COVERAGE_PLOT}, {output_dir / POPULARITY_PLOT}, "
          f"{output_dir / SUMMARY_FILE}", flush=True)
    if sample_warning is not None:
        print(f"\nwarning: {sample_warning}", flush=True)
    return profile


if __name__ == "__main__":
    main()
