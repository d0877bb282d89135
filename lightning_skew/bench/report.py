"""The benchmark's report: the machine it ran on, and the figures as text with a Markdown table."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from lightning_skew.bench.stats import FOREIGN_CPU_WARNING, RATIO_METHOD, usable_cores


def machine_info() -> dict[str, Any]:
    """CPU model and cores, torch threads, load average and the versions of the packages that matter."""
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "lightning", "torchmetrics"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu_model": cpu_model, "cpu_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "torch_threads": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg()),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def format_report(report: dict[str, Any]) -> str:
    """The report as text: machine, command, and a Markdown table of the variants."""
    machine, settings = report["machine"], report["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    baseline = report["baseline"]
    lines = [
        f"command: {report['command']}",
        f"machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores, torch threads "
        f"{machine['torch_threads']}, load average at start {load}; python {machine['python']}, {versions}",
        f"settings: {settings['repeats']} repeat(s), order rotated each repeat; {settings['train_samples_per_run']} "
        f"training samples per epoch, {settings.get('epochs', 1)} epoch(s) per run, {settings['warmup_steps']} "
        f"warm-up steps not timed; ratio = {RATIO_METHOD}",
        "",
        f"| variant | samples/s (median) | min | max | ratio to {baseline} [min, max] | median-step samples/s | "
        "its ratio | outside the model, ms/step | val AUC | val log-loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["variants"].values():
        outside = s.get("outside_model_ms", math.nan)
        lines.append(f"| {s['variant']} | {s['median_samples_per_s']:,.0f} | {s['min_samples_per_s']:,.0f} | "
                     f"{s['max_samples_per_s']:,.0f} | {s['ratio']:.3f} [{s['min_ratio']:.3f}, "
                     f"{s['max_ratio']:.3f}] | {s['median_step_samples_per_s']:,.0f} | {s['median_step_ratio']:.3f} | "
                     f"{'n/a' if outside != outside else f'{outside:.2f}'} | {s['auc']:.4f} | {s['logloss']:.4f} |")
    lines.append("")
    baseline_quality = report["variants"][baseline]
    for s in report["variants"].values():
        delta = f"AUC {s['auc'] - baseline_quality['auc']:+.4f}, log-loss {s['logloss'] - baseline_quality['logloss']:+.4f}"
        notes = ", ".join(f"{key} {value:.4g}" for key, value in s.get("extras", {}).items())
        if s["variant"] != baseline or notes:
            lines.append(f"{s['variant']}: against {baseline} {delta}" + (f"; {notes}" if notes else ""))
    foreign = report.get("max_foreign_cpu_share")
    if foreign is not None:
        verdict = "fine" if foreign < FOREIGN_CPU_WARNING else "NOT trustworthy: rerun on a quiet machine"
        lines += ["", f"other processes' CPU use during the runs: at most {foreign:.1%} of the cores ({verdict})"]
    if report.get("best_attainable_auc") is not None:
        lines += ["", f"best attainable val AUC (the generator's true click probabilities): "
                      f"{report['best_attainable_auc']:.4f}"]
    return "\n".join(lines)
