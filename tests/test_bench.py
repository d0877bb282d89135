"""The benchmark command: its statistics, its variants as configuration (presets, fragments, overrides), tiny
side-by-side runs on one process and on two gloo ranks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from lightning_skew import bench
from lightning_skew.bench import (
    CpuSnapshot,
    RunResult,
    foreign_cpu_share,
    median,
    median_step_throughput,
    outside_model_ms,
    parse_variant,
    per_repeat_ratios,
    presets,
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


def test_presets_are_yaml_files_listed_after_the_code_baseline():
    names = list(presets())
    assert names[:1] == ["handwritten"] and "lightning" in names
    assert all((bench.PRESETS_DIR / f"{name}.yaml").is_file() for name in names[1:])
    assert all(presets().values())  # every preset says what it is (its first comment line)
    variant = parse_variant("lightning")
    assert variant.args == ("--config", str(bench.PRESETS_DIR / "lightning.yaml")) and not variant.handwritten
    assert parse_variant("handwritten").handwritten


def test_a_variant_spec_is_a_preset_or_file_then_overrides():
    assert parse_variant("base=").args == ()
    own = parse_variant("small=hotcold --trainer.strategy.init_args.budget_bytes 4000")
    assert own.args == ("--config", str(bench.PRESETS_DIR / "hotcold.yaml"),
                        "--trainer.strategy.init_args.budget_bytes", "4000")
    assert parse_variant("f=recipes/variants/fae.yaml").args == ("--config", "recipes/variants/fae.yaml")
    with pytest.raises(ValueError, match="variants repeat a name"):
        bench.variants_from("lightning", ["lightning="])


def test_a_fragment_wraps_the_recipes_data_and_adds_to_its_callbacks():
    recipe = {"data": {"class_path": "lightning_skew.data.SyntheticDataModule", "init_args": {"seed": 3}},
              "trainer": {"callbacks": [{"class_path": "lightning_skew.SamplesPerSecond"}]}}
    fragment = {"data": {"class_path": "lightning_skew.RepackedDataModule", "init_args": {"datamodule": {
        "class_path": "lightning_skew.PopularityDataModule", "init_args": {"schedule": "fae"}}}},
        "trainer": {"callbacks": [{"class_path": "lightning_skew.StaleEmbeddingSkipper"}]}}
    done = bench.complete_fragment(fragment, recipe)
    inner = done["data"]["init_args"]["datamodule"]
    assert inner["init_args"] == {"schedule": "fae", "datamodule": recipe["data"]}
    assert [c["class_path"] for c in done["trainer"]["callbacks"]] == ["lightning_skew.SamplesPerSecond",
                                                                        "lightning_skew.StaleEmbeddingSkipper"]
    plain = {"data": {"class_path": "lightning_skew.data.SyntheticDataModule", "init_args": {"seed": 1}}}
    assert bench.complete_fragment(plain, recipe) == plain  # a data class that wraps nothing replaces the data


def test_fragments_given_together_compose_in_order(tmp_path):
    from lightning_skew.bench.variants import completed_args

    recipe = {"data": {"class_path": "lightning_skew.data.SyntheticDataModule", "init_args": {"seed": 3}},
              "trainer": {"callbacks": [{"class_path": "lightning_skew.SamplesPerSecond"}]}}
    variant = parse_variant("x=stale_repack --config recipes/variants/fae.yaml --trainer.max_steps 3")
    args = completed_args(variant, recipe, tmp_path)
    assert args[-2:] == ["--trainer.max_steps", "3"] and args[0] == args[2] == "--config"
    last = yaml.safe_load(open(args[3]))
    chain, data = [], last["data"]
    while isinstance(data, dict):
        chain.append(data["class_path"].rsplit(".", 1)[-1])
        data = data.get("init_args", {}).get("datamodule")
    assert chain == ["PopularityDataModule", "RepackedDataModule", "SyntheticDataModule"]
    assert [c["class_path"] for c in yaml.safe_load(open(args[1]))["trainer"]["callbacks"]] == [
        "lightning_skew.SamplesPerSecond", "lightning_skew.StaleEmbeddingSkipper"]


def test_unknown_variants_fail_before_any_run():
    with pytest.raises(ValueError, match="unknown benchmark variant") as error:
        bench.main(["--variants", "handwritten,no_such_variant"])
    assert "no_such_variant" in str(error.value) and "presets: handwritten, " in str(error.value)
    assert "hotcold_fae" in str(error.value)
    with pytest.raises(ValueError, match="unknown benchmark variant or preset 'nope'"):
        bench.main(["--variant", "mine=nope --trainer.max_steps 3"])


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


def test_hot_cold_variants_train_the_baselines_model(tmp_path):
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
    budget = yaml.safe_load((bench.PRESETS_DIR / "hotcold.yaml").read_text())["trainer"]["strategy"]["init_args"]
    assert report["variants"]["hotcold"]["extras"]["hot_mb"] <= budget["budget_bytes"] / 1e6


def test_the_all_variant_composes_every_technique():
    argv = ["--config", "recipes/dlrm_synthetic.yaml", "--variants", "lightning,all", "--repeats", "1",
            "--train-samples", "4096", "--warmup-steps", "2", *TINY]
    report = bench.main(argv)
    extras = report["variants"]["all"]["extras"]
    assert 0.0 <= extras["drop_share"] < 1.0 and extras["cold_skipped_steps"] >= 0
    runs = {run["variant"]: run for run in report["runs"]}
    assert 0.0 < runs["all"]["auc"] < 1.0 and runs["all"]["steps"] <= runs["lightning"]["steps"]
    assert extras["hot_rows"] > 0 and 0.0 <= extras["hot_input_share"] <= 1.0


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
                    [parse_variant("lightning")], repeats=1, warmup_steps=2, progress=report.append)
    assert report[0] == "repeat 1/1 lightning: started" and report[-1].startswith("repeat 1/1 lightning: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_every_gpu_preset_parses_and_needs_cuda():
    gpu = [name for name in presets() if name.startswith("gpu_")]
    assert {"gpu_hbm", "gpu_host", "gpu_uvm_cache", "gpu_hotcold", "gpu_hotcold_plain", "gpu_hotcold_plain_lookahead",
            "gpu_lightning_pipeline", "gpu_all"} <= set(gpu)
    recipe_args = ["--config", "recipes/dlrm_synthetic.yaml", *TINY]
    recipe = bench.recipe_config(recipe_args)
    for name in gpu:  # each is parsed against the recipe (a bad key fails), then refused before any run
        with pytest.raises(RuntimeError, match="need CUDA"):
            bench.check_runnable(parse_variant(name), recipe_args, recipe)


def test_a_variant_given_as_overrides_trains_what_fit_would(tmp_path):
    argv = ["--config", "recipes/dlrm_synthetic.yaml", "--variants", "lightning", "--variant", "base=",
            "--variant", "short=--trainer.max_steps 5", "--variant", "fast=--model.init_args.embedding_lr 0.5",
            "--variant", "small_hot=hotcold --trainer.strategy.init_args.budget_bytes 2000",
            "--repeats", "1", "--train-samples", "1536", "--warmup-steps", "2", *TINY]
    report = bench.main(argv)
    runs = {run["variant"]: run for run in report["runs"]}
    assert report["settings"]["variant_args"]["short"] == ["--trainer.max_steps", "5"]
    # The recipe as it is (base=) is the lightning preset's run; a trainer override stops it early, a model
    # override trains another model, a preset with an override keeps fewer rows hot.
    assert runs["base"]["auc"] == pytest.approx(runs["lightning"]["auc"], abs=1e-6)
    assert (runs["base"]["steps"], runs["short"]["steps"]) == (12, 5)
    assert runs["fast"]["auc"] != pytest.approx(runs["base"]["auc"], abs=1e-4)
    assert 0 < runs["small_hot"]["extras"]["hot_mb"] <= 0.002


def test_the_remaining_cpu_presets_fit_at_tiny_size():
    argv = ["--config", "recipes/dlrm_synthetic.yaml", "--variants", "lightning,lightning_pipeline,stale,"
            "stale_repack,hotcold_rebalance", "--repeats", "1", "--train-samples", "2048", "--warmup-steps", "2", *TINY]
    report = bench.main(argv)
    runs = {run["variant"]: run for run in report["runs"]}
    assert runs["lightning_pipeline"]["auc"] == pytest.approx(runs["lightning"]["auc"], abs=1e-4)
    assert 0.0 <= report["variants"]["stale"]["extras"]["drop_share"] < 1.0
    assert runs["stale_repack"]["timed_samples"] == runs["stale"]["timed_samples"]  # inputs read, dropped or not
    assert runs["hotcold_rebalance"]["auc"] == pytest.approx(runs["lightning"]["auc"], abs=1e-4)
    sessions = ["--data.init_args.num_embeddings_per_feature", "[40, 300, 7]", "--data.init_args.num_dense", "4",
                "--data.init_args.batch_size", "128", "--data.init_args.num_val_samples", "1024",
                "--data.init_args.sessions.num_users", "200", "--data.init_args.sessions.num_items", "300",
                "--model.init_args.embedding_dim", "8", "--model.init_args.dense_arch_layer_sizes", "[16, 8]",
                "--model.init_args.over_arch_layer_sizes", "[16, 1]"]
    report = bench.main(["--config", "recipes/dlrm_synthetic_sessions.yaml", "--variants",
                         "lightning,lightning_shuffled,dedup", "--repeats", "1", "--train-samples", "1024",
                         "--warmup-steps", "2", *sessions])
    dedup = report["variants"]["dedup"]
    assert 0.0 < dedup["extras"]["dedup_factor"] < 1.0  # sessions repeat their user's bags
    assert dedup["auc"] == pytest.approx(report["variants"]["lightning"]["auc"], abs=1e-3)
    assert report["variants"]["lightning_shuffled"]["auc"] > 0


def test_every_cpu_preset_is_fitted_by_a_test():
    fitted = {"lightning", "lightning_pipeline", "fae", "interleave", "stitch", "hotcold", "hotcold_fae",
              "hotcold_plain", "hotcold_rebalance", "stale", "stale_repack", "all", "dedup", "lightning_shuffled"}
    assert {name for name in presets() if not name.startswith("gpu_")} - {"handwritten"} == fitted


def test_two_ranks_run_every_variant_side_by_side(tmp_path):
    output = tmp_path / "bench.json"
    argv = ["--config", "recipes/dlrm_synthetic.yaml", "--variants", "handwritten,lightning", "--repeats", "1",
            "--train-samples", "1536", "--warmup-steps", "2", "--trainer.devices", "2", "--output", str(output), *TINY]
    report = bench.main(argv)
    assert json.loads(output.read_text()) == report and report["settings"]["world_size"] == 2
    assert report["command"] == "lightning-skew bench " + " ".join(argv[:-len(TINY)]) + " " + \
        " ".join(f"'{w}'" if " " in w else w for w in TINY)
    runs = {run["variant"]: run for run in report["runs"]}
    for run in runs.values():
        assert run["steps"] == 6  # 1536 inputs, 128 per rank and step on 2 ranks
        assert run["timed_samples"] == 4 * 256  # global: both ranks' inputs
    # The hand-written loop on TorchRec's DMP over the same two ranks trains Lightning's model.
    assert runs["lightning"]["auc"] == pytest.approx(runs["handwritten"]["auc"], abs=1e-4)
