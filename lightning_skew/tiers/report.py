"""The tier report: policies replayed at several budgets, as a table, a plot and an estimate of link time per step."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lightning_skew.core.distributed import all_reduce_sum
from lightning_skew.tiers.fbgemm import fbgemm_cache
from lightning_skew.tiers.lookahead import lookahead_cache, lookahead_hot_set
from lightning_skew.tiers.policies import Traffic, all_fast, all_host, static_hot_set
from lightning_skew.tiers.stream import AccessStream

__all__ = ["DEVICES", "LinkModel", "TierResult", "format_tiers", "plot_tiers", "replay_policies"]


@dataclass(frozen=True)
class LinkModel:
    """Bandwidths of a named device, bytes per millisecond, as TorchRec's planner ``Topology`` holds them."""

    name: str
    hbm_mem_bw: float
    hbm_to_ddr_mem_bw: float
    source: str

    def step_ms(self, summary: dict[str, float]) -> dict[str, float]:
        """Estimated milliseconds per step: rows read and written over the host link at ``hbm_to_ddr_mem_bw``
        (reads and writes added: no overlap assumed), and the rows a step needs read and written in fast memory
        at ``hbm_mem_bw``. An estimate from bytes, not a measurement."""
        link = (summary["read_bytes_per_step"] + summary["written_bytes_per_step"]) / self.hbm_to_ddr_mem_bw
        mean_row = summary["row_bytes"]
        fast = 2 * summary["needed_rows_per_step"] * summary["hit_rate"] * mean_row / self.hbm_mem_bw
        return {"link_ms": link, "fast_ms": fast, "estimate_ms": link + fast}


def _torchrec_default() -> LinkModel:
    from torchrec.distributed.planner.types import Topology

    topology = Topology(world_size=1, compute_device="cuda")
    return LinkModel("torchrec", topology.hbm_mem_bw, topology.hbm_to_ddr_mem_bw,
                     "torchrec.distributed.planner Topology defaults (HBM_MEM_BW, HBM_TO_DDR_MEM_BW)")


_GB_PER_S = 1e9 / 1000  # bytes per ms in one GB/s

#: Named devices: TorchRec planner's defaults, and two data-sheet figures (PCIe one direction).
DEVICES = {
    "torchrec": _torchrec_default,
    "a100-pcie4": lambda: LinkModel("a100-pcie4", 1555 * _GB_PER_S, 32 * _GB_PER_S,
                                    "A100 40GB data sheet: HBM2 1,555 GB/s; PCIe 4.0 x16 32 GB/s per direction"),
    "h100-pcie5": lambda: LinkModel("h100-pcie5", 3350 * _GB_PER_S, 64 * _GB_PER_S,
                                    "H100 SXM data sheet: HBM3 3.35 TB/s; PCIe 5.0 x16 64 GB/s per direction"),
}


@dataclass
class TierResult:
    """One policy at one budget: its summary figures (full-stream scale) and the replay's cost."""

    policy: str
    budget_bytes: int
    summary: dict[str, float]
    seconds: float
    ahead: bool = False
    estimate: dict[str, float] = field(default_factory=dict)
    warm: bool = True
    first_step: int = 0


def _reduced(summary: dict[str, float], traffic: Traffic, skip: int) -> dict[str, float]:
    """Per-rank means over all ranks (hit rate from summed rows); one rank: the summary itself."""
    steps = slice(skip, None)
    local = torch.tensor([float(traffic.hits[steps].sum()), float(traffic.needed[steps].sum()),
                          summary["read_bytes_per_step"], summary["written_bytes_per_step"],
                          summary["read_rows_per_step"], summary["written_rows_per_step"],
                          summary["needed_rows_per_step"], 1.0], dtype=torch.float64)
    total = all_reduce_sum(local)
    ranks = float(total[-1])
    if ranks == 1.0:
        return summary
    keys = ("read_bytes_per_step", "written_bytes_per_step", "read_rows_per_step", "written_rows_per_step",
            "needed_rows_per_step")
    merged = dict(summary)
    merged.update({k: float(total[2 + i]) / ranks for i, k in enumerate(keys)})
    merged["hit_rate"] = float(total[0] / total[1]) if float(total[1]) else float("nan")
    return merged


def replay_policies(stream: AccessStream, budgets: Sequence[int], hot_rows_for: dict[int, Sequence[Tensor]],
                    windows: Sequence[int] = (64,), rebalance_every: int | None = None,
                    skip_steps: int = 0, device: LinkModel | None = None,
                    prefetch_budgets: Sequence[int] | None = None) -> list[TierResult]:
    """Every policy at every budget (the two ends once): summaries per rank averaged over ranks, with the cost.

    Args:
        stream: the access stream.
        budgets: fast-memory budgets in bytes.
        hot_rows_for: per budget, each table's hot rows (the placement ``HotColdStrategy`` makes there).
        windows: lookahead windows (batches) to replay.
        rebalance_every: also replay the hot set rebalanced every this many steps.
        skip_steps: warm-up steps left out of the figures.
        device: bandwidths for the estimate of link time per step.
        prefetch_budgets: the budgets at which to replay the hot set with lookahead prefetch (``LookaheadPrefetch``
            on the plain GPU path); ``None``: all.
    """
    runs: list[tuple[int, object]] = [(0, lambda: all_host(stream)), (stream.total_bytes, lambda: all_fast(stream))]
    for budget in budgets:
        runs.append((budget, lambda b=budget: static_hot_set(stream, hot_rows_for[b])))
        if rebalance_every is not None:
            runs.append((budget, lambda b=budget: static_hot_set(stream, hot_rows_for[b], rebalance_every)))
        for algorithm in ("lru", "lfu"):
            runs.append((budget, lambda b=budget, a=algorithm: fbgemm_cache(stream, b, a)))
        for window in windows:
            runs.append((budget, lambda b=budget, w=window: lookahead_cache(stream, b, w)))
            if prefetch_budgets is None or budget in prefetch_budgets:
                runs.append((budget, lambda b=budget, w=window: lookahead_hot_set(stream, hot_rows_for[b], w)))
    mean_row = stream.total_bytes / max(stream.total_rows, 1)
    results = []
    for budget, run in runs:
        began = time.perf_counter()
        traffic: Traffic = run()  # type: ignore[operator]
        seconds = time.perf_counter() - began
        first, warm = traffic.warm_from(skip_steps)
        summary = _reduced(traffic.summary(first), traffic, first) | {"row_bytes": mean_row}
        result = TierResult(_short_name(traffic.policy), budget, summary, seconds, traffic.ahead, warm=warm,
                            first_step=first)
        if device is not None:
            result.estimate = device.step_ms(summary)
        results.append(result)
    return results


def _short_name(policy: str) -> str:
    return policy.split(" (")[0] if policy.startswith("FBGEMM") else policy


def format_tiers(results: Sequence[TierResult], device: LinkModel | None = None) -> str:
    """The table: policy, budget, hit rate, rows and bytes read and written per step (and the estimate)."""
    from lightning_skew.profile.command import format_bytes

    header = ["policy", "fast memory", "hit rate", "read rows/step", "read/step", "written rows/step",
              "written/step"]
    if device is not None:
        header.append(f"est. link ms/step ({device.name})")
    lines = [header]
    for r in results:
        s = r.summary
        line = [r.policy + ("" if r.warm else " *"), format_bytes(r.budget_bytes), f"{s['hit_rate']:.4f}", f"{s['read_rows_per_step']:,.0f}",
                format_bytes(s["read_bytes_per_step"]), f"{s['written_rows_per_step']:,.0f}",
                format_bytes(s["written_bytes_per_step"])]
        if device is not None:
            line.append(f"{r.estimate['link_ms']:.3f}" + (" (prefetchable)" if r.ahead else ""))
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))) for row in lines)


def plot_tiers(results: Sequence[TierResult], budget: int, path: Path) -> None:
    """Hit rate and host-link bytes per step (read plus written) against the fast-memory budget, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure, (hit_axes, bytes_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_policy: dict[str, list[TierResult]] = {}
    for r in results:
        if r.policy not in ("all host", "all fast"):
            by_policy.setdefault(r.policy, []).append(r)
    for policy, rows in by_policy.items():
        rows = sorted(rows, key=lambda r: r.budget_bytes)
        megabytes = [r.budget_bytes / 1e6 for r in rows]
        hit_axes.plot(megabytes, [r.summary["hit_rate"] for r in rows], marker=".", label=policy)
        bytes_axes.plot(megabytes, [(r.summary["read_bytes_per_step"] + r.summary["written_bytes_per_step"]) / 1e6
                                    for r in rows], marker=".", label=policy)
    for r in results:
        if r.policy == "all host":
            bytes_axes.axhline((r.summary["read_bytes_per_step"] + r.summary["written_bytes_per_step"]) / 1e6,
                               color="black", linestyle=":", label="all host")
    for axes in (hit_axes, bytes_axes):
        axes.axvline(budget / 1e6, color="gray", linestyle="--", label="chosen budget")
        axes.set(xscale="log", xlabel="fast-memory budget (MB, rows plus optimizer state)")
        axes.grid(True, which="both", alpha=0.3)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    hit_axes.set(ylabel="fast-memory hit rate (distinct rows per step)", ylim=(0, 1.02),
                 title="Hit rate against budget")
    bytes_axes.set(ylabel="MB over the host link per step (read + written)", yscale="log",
                   title="Host-link traffic against budget")
    bytes_axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
