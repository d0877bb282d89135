"""The benchmark command: its statistics, its variant registry, and a tiny side-by-side run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_skew import bench
from lightning_skew.bench import (
    VARIANTS,
    CpuSnapshot,
    RunResult,
    foreign_cpu_share,
    median,
    median_step_throughput,
    outside_model_ms,
    per_repeat_ratios,
    register_variant,
    run_order,
    summarize,
    throughput,
)


def test_median_of_odd_and_even_counts():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError, match="no values"):
        median([])


def test_throughput_times_only_the_steps_after_warmup():
    ends = [10.0, 11.0, 13.0, 14.0]
    samples = [100, 20, 30, 40]
    # One warm-up step: the clock starts when step 0 ends (t=10) and stops at t=14; 20+30+40 samples in 4 s.
    rate, timed_samples, timed_s = throughput(ends, samples, warmup_steps=1)
    assert (timed_samples, timed_s) == (90, 4.0)
    assert rate == pytest.approx(22.5)
    assert throughput(ends, samples, warmup_steps=2)[0] == pytest.approx(70 / 3.0)


def test_time_outside_the_model_is_each_steps_rest_averaged_over_the_timed_steps():
    ends = [0.0, 1.0, 3.0, 4.0, 10.0]
    model_s = [0.5, 0.5, 1.0, 1.0, 1.0]  # steps 2..4 timed: 2-1, 1-1, 6-1 seconds outside
    assert outside_model_ms(ends, model_s, warmup_steps=2) == pytest.approx(2000.0)  # a window's burst counts
    assert math.isnan(outside_model_ms(ends, [math.nan] * 5, warmup_steps=2))  # a loop that did not say


def test_median_step_throughput_ignores_a_burst_of_slow_steps():
    # Steps of 1 s each, but one of them took 10 s (another process ran): the mean rate halves, not the median.
    ends = [0.0, 1.0, 2.0, 12.0, 13.0, 14.0]
    samples = [8] * 6
    assert throughput(ends, samples, warmup_steps=1)[0] == pytest.approx(40 / 14.0)
    assert median_step_throughput(ends, samples, warmup_steps=1) == pytest.approx(8.0)


def test_throughput_needs_a_timed_step_and_a_warmup_step():
    with pytest.raises(ValueError, match="none after the 4 warm-up steps"):
        throughput([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1], warmup_steps=4)
    with pytest.raises(ValueError, match="at least 1"):
        throughput([1.0, 2.0], [1, 1], warmup_steps=0)


def test_run_order_rotates_each_repeat():
    variants = ["handwritten", "lightning", "hot_cold"]
    assert run_order(variants, 0) == ["handwritten", "lightning", "hot_cold"]
    assert run_order(variants, 1) == ["lightning", "hot_cold", "handwritten"]
    assert run_order(variants, 2) == ["hot_cold", "handwritten", "lightning"]
    assert run_order(variants, 3) == run_order(variants, 0)


def test_ratios_pair_each_run_with_the_baseline_of_its_own_repeat():
    rates = {0: {"base": 100.0, "other": 50.0}, 1: {"base": 200.0, "other": 150.0}}
    ratios = per_repeat_ratios(rates, "base")
    assert ratios == {"base": [1.0, 1.0], "other": [0.5, 0.75]}
    with pytest.raises(ValueError, match="no run of the baseline"):
        per_repeat_ratios({0: {"other": 1.0}}, "base")


def _run(repeat: int, variant: str, rate: float, auc: float = 0.7) -> RunResult:
    return RunResult(repeat=repeat, position=0, variant=variant, samples_per_s=rate, timed_samples=1000,
                     timed_s=1000 / rate, median_step_samples_per_s=2 * rate, steps=10, setup_s=1.0, auc=auc, logloss=0.5)


def test_summary_uses_the_median_of_per_repeat_ratios_not_the_ratio_of_medians():
    runs = [_run(0, "base", 100.0), _run(0, "other", 250.0, auc=0.6),
            _run(1, "base", 200.0), _run(1, "other", 150.0, auc=0.8),
            _run(2, "base", 400.0), _run(2, "other", 380.0, auc=0.7)]
    summaries = summarize(runs, baseline="base")
    assert list(summaries) == ["base", "other"]
    other = summaries["other"]
    # Per-repeat ratios 2.5, 0.75, 0.95; the ratio of the medians (250 / 200) would be 1.25.
    assert other.ratio == pytest.approx(0.95)
    assert (other.min_ratio, other.max_ratio) == (pytest.approx(0.75), pytest.approx(2.5))
    assert (other.median_samples_per_s, other.min_samples_per_s, other.max_samples_per_s) == (250.0, 150.0, 380.0)
    assert other.auc == pytest.approx(0.7) and other.repeats == 3
    assert summaries["base"].ratio == 1.0
    assert other.median_step_ratio == pytest.approx(0.95) and other.median_step_samples_per_s == 500.0


def test_a_variant_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register_variant("lightning")(lambda recipe: None)
    assert list(VARIANTS)[:2] == ["handwritten", "lightning"]


def test_unknown_variants_fail_before_any_run():
    with pytest.raises(ValueError, match="unknown benchmark variant"):
        bench.main(["--variants", "handwritten,no_such_variant"])


TINY = ["--data.init_args.num_embeddings_per_feature", "[40, 300, 7]", "--data.init_args.num_dense", "4",
        "--data.init_args.batch_size", "128", "--data.init_args.num_val_samples", "1024",
        "--model.init_args.embedding_dim", "8", "--model.init_args.dense_arch_layer_sizes", "[16, 8]",
        "--model.init_args.over_arch_layer_sizes", "[16, 1]"]


def test_tiny_bench_runs_both_variants_to_the_same_model(tmp_path):
    output = tmp_path / "bench.json"
    argv = ["--config", "recipes/dlrm_synthetic.yaml", "--repeats", "1", "--train-samples", "1536",
            "--warmup-steps", "2", "--output", str(output), *TINY]
    returned = bench.main(argv)
    report = json.loads(output.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["command"].startswith("lightning-skew bench --config recipes/dlrm_synthetic.yaml")
    assert report["baseline"] == "handwritten"
    assert report["machine"]["versions"]["torchrec"]
    runs = {run["variant"]: run for run in report["runs"]}
    assert set(runs) == set(report["variants"]) == {"handwritten", "lightning"}
    for run in runs.values():
        assert run["steps"] == 12  # 1536 / 128
        assert run["timed_samples"] == 10 * 128
        assert run["samples_per_s"] > 0 and run["median_step_samples_per_s"] > 0
        assert 0.0 <= run["auc"] <= 1.0
        assert run["outside_model_ms"] >= 0.0  # both loops time their model's work
    assert report["variants"]["handwritten"]["ratio"] == 1.0
    assert report["variants"]["lightning"]["ratio"] > 0
    assert 0.5 < report["best_attainable_auc"] <= 1.0
    assert 0.0 <= report["max_foreign_cpu_share"] <= 1.0
    # Same initial weights, same batches, same updates: the two loops train the same model.
    assert runs["lightning"]["auc"] == pytest.approx(runs["handwritten"]["auc"], abs=1e-4)
    assert runs["lightning"]["logloss"] == pytest.approx(runs["handwritten"]["logloss"], abs=1e-4)


def test_foreign_cpu_share_counts_only_other_processes():
    before = CpuSnapshot(wall_s=100.0, busy_cpu_s=1000.0, own_cpu_s=50.0)
    # 10 s on 2 cores: the machine was busy 15 CPU-seconds, 12 of them ours; others took 3 of 20.
    after = CpuSnapshot(wall_s=110.0, busy_cpu_s=1015.0, own_cpu_s=62.0)
    assert foreign_cpu_share(before, after, cores=2) == pytest.approx(0.15)
    alone = CpuSnapshot(wall_s=110.0, busy_cpu_s=1011.9, own_cpu_s=62.0)  # tick rounding: never below 0
    assert foreign_cpu_share(before, alone, cores=2) == 0.0


def test_popularity_variants_report_profiling_cost_and_train_every_input(tmp_path):
    output = tmp_path / "bench.json"
    argv = ["--config", "recipes/dlrm_synthetic.yaml", "--variants", "lightning,fae,interleave,stitch",
            "--repeats", "1", "--train-samples", "2048", "--warmup-steps", "2", "--output", str(output), *TINY]
    report = bench.main(argv)
    assert set(report["variants"]) == {"lightning", "fae", "interleave", "stitch"}
    for name in ("fae", "interleave", "stitch"):
        extras = report["variants"][name]["extras"]
        assert extras["profile_s"] > 0
        assert 0 < extras["profile_share_of_epoch"] < 10
        assert 0.0 <= extras["hot_input_share"] <= 1.0
        (run,) = [r for r in report["runs"] if r["variant"] == name]
        assert run["steps"] * 128 == 2048  # regrouped batches, but every input trained once
        assert 0.0 <= run["auc"] <= 1.0


def test_hot_cold_variants_train_the_baselines_model_and_gpu_variants_need_cuda(tmp_path):
    argv = ["--config", "recipes/dlrm_synthetic.yaml", "--variants", "lightning,hotcold,hotcold_fae,hotcold_plain",
            "--repeats", "1", "--train-samples", "2048", "--warmup-steps", "2", *TINY]
    report = bench.main(argv)
    runs = {run["variant"]: run for run in report["runs"]}
    # Placement re-indexes rows, it does not approximate: the same model as the baseline (the plain-PyTorch path
    # too, whose sparse row-wise Adagrad does FBGEMM's update).
    for name in ("hotcold", "hotcold_plain"):
        assert runs[name]["auc"] == pytest.approx(runs["lightning"]["auc"], abs=1e-4), name
        assert runs[name]["logloss"] == pytest.approx(runs["lightning"]["logloss"], abs=1e-4), name
    assert report["variants"]["hotcold"]["extras"]["hot_rows"] > 0
    assert report["variants"]["hotcold"]["extras"]["hot_mb"] <= bench.HOT_COLD_BUDGET_BYTES / 1e6
    if not torch.cuda.is_available():
        recipe = bench.build_recipe(["--config", "recipes/dlrm_synthetic.yaml", *TINY])
        for name in ("gpu_hotcold", "gpu_hotcold_plain", "gpu_handwritten_pipeline", "gpu_lightning_pipeline",
                     "gpu_host_stale", "gpu_hbm_freeze_t001"):
            with pytest.raises(RuntimeError, match="need CUDA"):
                bench.VARIANTS[name].train(recipe)


def test_the_all_variant_composes_every_technique_and_its_gpu_twin_needs_cuda():
    argv = ["--config", "recipes/dlrm_synthetic.yaml", "--variants", "lightning,all", "--repeats", "1",
            "--train-samples", "4096", "--warmup-steps", "2", *TINY]
    report = bench.main(argv)
    extras = report["variants"]["all"]["extras"]
    assert 0.0 <= extras["drop_share"] < 1.0 and extras["cold_skipped_steps"] >= 0
    runs = {run["variant"]: run for run in report["runs"]}
    assert 0.0 < runs["all"]["auc"] < 1.0 and runs["all"]["steps"] <= runs["lightning"]["steps"]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="need CUDA"):
            bench.VARIANTS["gpu_all"].train(bench.build_recipe(["--config", "recipes/dlrm_synthetic.yaml", *TINY]))


def test_a_long_run_reports_its_variant_repeat_steps_and_samples_per_second_as_it_goes():
    from lightning_skew.bench.types import StepClock, reporting_progress

    lines: list[str] = []
    with reporting_progress("repeat 2/3 stale", lines.append, every_s=0.0):
        clock = StepClock()
    for _ in range(3):
        clock.tick(128)
    assert lines and lines[-1].startswith("repeat 2/3 stale: step 3, ") and lines[-1].endswith("samples/s so far")
    assert StepClock().progress is None  # outside a run nothing is reported
    report: list[str] = []
    bench.run_bench(["--config", "recipes/dlrm_synthetic.yaml", "--data.init_args.num_train_samples", "1024", *TINY],
                    ["lightning"], repeats=1, warmup_steps=2, progress=report.append)
    assert report[0] == "repeat 1/1 lightning: started" and report[-1].startswith("repeat 1/1 lightning: ")
