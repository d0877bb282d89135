"""``lightning-skew profile --tiers``: replay the recipe's training stream through placements and caches."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_skew.hotcold.placement import TableSpec, plan_placement
from lightning_skew.profile.access import AccessProfile
from lightning_skew.tiers.report import DEVICES, format_tiers, plot_tiers, replay_policies
from lightning_skew.tiers.stream import stream_from_batches

__all__ = ["TIERS_PLOT", "add_tier_arguments", "hot_rows_by_budget", "log_tiers_to_wandb", "simulate_tiers"]

TIERS_PLOT = "tiers.png"
DEFAULT_STEPS = 256
#: With --tiers-sample-rate auto, rows are sampled so that about this many of the tables' rows remain.
AUTO_SAMPLE_ROWS = 100_000


def add_tier_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--tiers`` options of ``lightning-skew profile``."""
    group = parser.add_argument_group("tier simulation (--tiers)")
    group.add_argument("--tiers", action="store_true",
                       help="replay the training stream (as the DataModule emits it, wrappers included, per rank) "
                            "through the static hot set, FBGEMM's UVM cache (LRU, LFU) and a lookahead cache, at "
                            "the budget and around it: hit rate and bytes over the host link per step")
    group.add_argument("--tiers-budgets", default=None,
                       help="comma-separated fast-memory budgets (e.g. 2MB,8MB,32MB); default: the budget above "
                            "and 1/4 and 4 times it")
    group.add_argument("--tiers-steps", type=int, default=DEFAULT_STEPS,
                       help="replay the first this many training steps (0: the whole epoch); the first quarter "
                            "warms the caches and is left out of the figures")
    group.add_argument("--tiers-sample-rate", default="auto",
                       help="share of rows kept by spatial hashing (SHARDS), or 'auto' (about "
                            f"{AUTO_SAMPLE_ROWS:,} rows kept); 1 replays every row exactly")
    group.add_argument("--tiers-windows", default="64",
                       help="lookahead windows in batches, comma-separated (the lookahead cache at every budget; the "
                            "hot set with lookahead prefetch, as LookaheadPrefetch runs it, at the chosen budget)")
    group.add_argument("--tiers-rebalance-every", type=int, default=None,
                       help="also replay the hot set rebalanced every this many steps (as HotColdStrategy's "
                            "rebalance_every_n_steps; needs --tiers-sample-rate 1)")
    group.add_argument("--tiers-device", choices=sorted(DEVICES), default="torchrec",
                       help="bandwidths of the estimate of link time per step (torchrec: its planner's defaults)")


def hot_rows_by_budget(profile: AccessProfile, budgets: list[int], embedding_dim: int, optimizer: str,
                       bytes_per_element: int, mode: str) -> dict[int, list[Tensor]]:
    """Per budget, each table's hot rows as ``HotColdStrategy`` places them: the profile's cut, then every table
    whose remaining rows fit the budget left over made hot entirely (:func:`plan_placement`)."""
    sizes = profile.bytes_per_row(embedding_dim, bytes_per_element, optimizer)
    specs = [TableSpec(name, (name,), rows, embedding_dim)
             for name, rows in zip(profile.feature_names, profile.num_rows, strict=True)]
    placements = {}
    for budget in budgets:
        hot = profile.hot_rows(budget, embedding_dim, bytes_per_element=bytes_per_element, optimizer=optimizer,
                               mode=mode)
        placement = plan_placement(specs, hot.rows, budget, sizes)
        placements[budget] = [table.hot_rows for table in placement.tables]
    return placements


def _budgets(text: str | None, chosen: int, smallest: int, largest: int) -> list[int]:
    from lightning_skew.profile.command import parse_bytes

    if text:
        budgets = [parse_bytes(part) for part in text.split(",") if part.strip()]
    elif chosen >= largest:  # every row fits: the curve below it shows what a smaller memory would do
        budgets = [largest // 16, largest // 4, chosen]
    else:
        budgets = [chosen // 4, chosen, chosen * 4]
    kept = sorted({b for b in budgets if b >= smallest and (b < largest or b == chosen or text)})
    if not kept:
        raise SystemExit(f"no tier budget holds one row ({smallest} bytes): {budgets}; give --tiers-budgets")
    return kept


def simulate_tiers(args: argparse.Namespace, datamodule: Any, profile: AccessProfile, chosen: int,
                   embedding_dim: int, optimizer: str, output_dir: Path) -> dict[str, Any]:
    """Build the access stream of ``datamodule``'s training batches, replay every policy, print the table, plot
    it; returns the figures for the summary."""
    sizes = profile.bytes_per_row(embedding_dim, args.bytes_per_element, optimizer)
    total_rows = sum(profile.num_rows)
    largest = sum(n * s for n, s in zip(profile.num_rows, sizes, strict=True))
    budgets = _budgets(args.tiers_budgets, chosen, min(sizes), largest)
    if args.tiers_sample_rate == "auto":
        rate = min(1.0, AUTO_SAMPLE_ROWS / max(total_rows, 1))
    else:
        rate = float(args.tiers_sample_rate)
    if args.tiers_rebalance_every is not None and rate < 1.0:
        raise SystemExit("--tiers-rebalance-every replays the exact stream: give --tiers-sample-rate 1")
    windows = [int(w) for w in args.tiers_windows.split(",") if w.strip()]
    device = DEVICES[args.tiers_device]()
    began, cpu_began = time.perf_counter(), time.process_time()
    hot_rows = hot_rows_by_budget(profile, budgets, embedding_dim, optimizer, args.bytes_per_element, args.mode)
    if datamodule is not profile_source(datamodule):
        datamodule.setup("fit")  # a wrapper (popularity batching, repacking): replay the batches it emits
    steps = args.tiers_steps if args.tiers_steps > 0 else None
    stream = stream_from_batches(datamodule.train_dataloader(), profile.feature_names, profile.num_rows, sizes,
                                 max_steps=steps, sample_rate=rate)
    if stream.num_steps == 0:
        raise SystemExit("--tiers: the training loader yielded no batch")
    skip = stream.num_steps // 4
    results = replay_policies(stream, budgets, hot_rows, windows, args.tiers_rebalance_every, skip, device,
                              prefetch_budgets=[chosen] if chosen in budgets else budgets[:1])
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    print(f"\ntier simulation: {stream.num_steps} training steps replayed (the first {skip} warm the caches and "
          f"are left out), rows sampled at {rate:.3g} by spatial hashing (SHARDS; figures scaled back), "
          f"{seconds:.1f} s ({cpu_seconds:.1f} s of CPU; the stream {stream.seconds:.1f} s). Per rank, per step; bytes are rows plus optimizer "
          f"state. The last column is an ESTIMATE from these bytes and {device.source}, not a measurement.")
    print(format_tiers(results, device))
    if not all(r.warm for r in results):
        print("* the cache was not full by the last quarter of the replay (or never fills: the rows fit): it writes "
              "back only once full, so its write-backs are undercounted against a long run; raise --tiers-steps")
    plot_tiers(results, chosen, output_dir / TIERS_PLOT)
    return {"steps": stream.num_steps, "warmup_steps": skip, "sample_rate": rate, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "stream_seconds": stream.seconds, "device": device.name, "device_source": device.source,
            "plot": str(output_dir / TIERS_PLOT),
            "results": [{"policy": r.policy, "budget_bytes": r.budget_bytes, **r.summary, "seconds": r.seconds,
                         "prefetchable": r.ahead, "warm": r.warm, "first_step": r.first_step, **{f"estimate_{k}": v for k, v in r.estimate.items()}}
                        for r in results]}


def log_tiers_to_wandb(run: Any, tiers: dict[str, Any]) -> None:
    """The tier table (one row per policy and budget) and its plot, in a wandb run."""
    import wandb

    columns = ["policy", "budget_bytes", "hit_rate", "read_rows_per_step", "read_bytes_per_step",
               "written_rows_per_step", "written_bytes_per_step", "estimate_link_ms", "warm"]
    table = wandb.Table(columns=columns)
    for result in tiers["results"]:
        table.add_data(*[result.get(c) for c in columns])
    run.log({"profile/tiers": table, "profile/tiers_plot": wandb.Image(tiers["plot"])})


def profile_source(datamodule: Any) -> Any:
    from lightning_skew.profile.sources import profiled_data

    return profiled_data(datamodule)
