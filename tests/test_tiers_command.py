"""``lightning-skew profile --tiers`` on real recipes: the stream as the DataModule emits it, the table, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_skew.hotcold.placement import TableSpec, plan_placement
from lightning_skew.profile.access import AccessProfile
from lightning_skew.profile.command import build_datamodule
from lightning_skew.profile.command import main as profile_main

from _support.launch import launch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.init_args.max_rows_per_table", "2000", "--data.init_args.num_train_samples", "16384",
        "--data.init_args.batch_size", "2048"]


def _distinct_rows_per_step(recipe_args: list[str]) -> list[set[tuple[str, int]]]:
    """Plainly: each training batch's distinct (feature, row) pairs."""
    datamodule, _ = build_datamodule(recipe_args)
    datamodule.setup("fit")
    steps = []
    for batch in datamodule.train_dataloader():
        features = batch.sparse_features.to_dict()
        steps.append({(name, int(v)) for name, jt in features.items() for v in jt.values()})
    return steps


def test_tiers_replays_the_training_stream_and_reports_every_policy(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = ["--config", str(ROOT / "recipes" / "dlrm_synthetic.yaml"), *TINY]
    output = tmp_path / "profile"
    profile_main([*recipe, "--budget", "60kB", "--sample-fraction", "1", "--output-dir", str(output),
                  "--no-progress", "--tiers", "--tiers-sample-rate", "1", "--tiers-budgets",
                  "20kB,60kB", "--tiers-rebalance-every", "4", "--tiers-windows", "2,8"])
    printed = capsys.readouterr().out
    for policy in ("all host", "all fast", "static hot set", "rebalanced every 4 steps", "FBGEMM UVM cache, LRU",
                   "FBGEMM UVM cache, LFU", "lookahead (Bagpipe-style), window 2", "window 8",
                   "static hot set + lookahead prefetch, window 2"):
        assert policy in printed, policy
    assert "ESTIMATE" in printed and "(prefetchable)" in printed
    assert (output / "tiers.png").stat().st_size > 1000
    assert list((output / "wandb").glob("offline-run-*/files/media/table/profile/tiers*.table.json"))
    tiers = json.loads((output / "summary.json").read_text())["tiers"]
    assert tiers["steps"] == 8 and tiers["sample_rate"] == 1.0
    results = {(r["policy"], r["budget_bytes"]): r for r in tiers["results"]}

    # Against a plain count of the same batches: all host reads every distinct row of a step ...
    steps = _distinct_rows_per_step(recipe)
    counted = steps[tiers["warmup_steps"]:]
    host = results[("all host", 0)]
    assert host["read_rows_per_step"] == pytest.approx(sum(len(s) for s in counted) / len(counted))
    # ... and the static hot set is the placement HotColdStrategy makes from the profile at that budget.
    profile = AccessProfile.load(output / "profile.pt")
    sizes = profile.bytes_per_row(16)
    specs = [TableSpec(n, (n,), r, 16) for n, r in zip(profile.feature_names, profile.num_rows, strict=True)]
    placement = plan_placement(specs, profile.hot_rows(60_000, 16).rows, 60_000, sizes)
    hot = {(t.spec.name, int(r)) for t in placement.tables for r in t.hot_rows}
    static = results[("static hot set", 60_000)]
    hits = sum(len(s & hot) for s in counted)
    assert static["hit_rate"] == pytest.approx(hits / sum(len(s) for s in counted))
    assert static["read_rows_per_step"] == pytest.approx(sum(len(s - hot) for s in counted) / len(counted))
    assert ("static hot set + lookahead prefetch, window 8", 60_000) in results  # at the chosen budget only
    assert ("static hot set + lookahead prefetch, window 8", 20_000) not in results
    # more fast memory, fewer bytes over the link, for every policy
    for policy in ("static hot set", "FBGEMM UVM cache, LRU", "FBGEMM UVM cache, LFU"):
        assert results[(policy, 20_000)]["read_bytes_per_step"] > results[(policy, 60_000)]["read_bytes_per_step"]


def test_tiers_replays_the_batches_a_popularity_wrapper_emits(tmp_path, capsys):
    inner = "--data.init_args.datamodule.init_args."
    recipe = ["--config", str(ROOT / "recipes" / "dlrm_synthetic_popularity.yaml"), f"{inner}max_rows_per_table",
              "500", f"{inner}num_train_samples", "8192", f"{inner}batch_size", "1024",
              "--data.init_args.hot_rows.init_args.budget_bytes", "400000"]
    profile_main([*recipe, "--budget", "400kB", "--output-dir", str(tmp_path), "--no-progress", "--no-wandb",
                  "--tiers", "--tiers-sample-rate", "1", "--tiers-steps", "0"])
    tiers = json.loads((tmp_path / "summary.json").read_text())["tiers"]
    wrapper, _ = build_datamodule(recipe)
    wrapper.setup("fit")
    emitted = list(wrapper.train_dataloader())
    assert tiers["steps"] == len(emitted)
    assert any(batch.is_hot for batch in emitted) and not all(batch.is_hot for batch in emitted)  # regrouped
    host = next(r for r in tiers["results"] if r["policy"] == "all host")
    counted = [len({(k, int(v)) for k, jt in b.sparse_features.to_dict().items() for v in jt.values()})
               for b in emitted[tiers["warmup_steps"]:]]
    assert host["needed_rows_per_step"] == pytest.approx(sum(counted) / len(counted))
    assert host["read_rows_per_step"] == pytest.approx(sum(counted) / len(counted))


WORKER = """
import json
import sys

import torch
import torch.distributed as dist

from lightning_skew.data.synthetic import SyntheticDataModule
from lightning_skew.tiers import fbgemm_cache, stream_from_batches
from lightning_skew.tiers.report import replay_policies

dist.init_process_group("gloo")
datamodule = SyntheticDataModule(num_embeddings_per_feature=[300, 5000], num_dense=2, num_train_samples=16384,
                                 batch_size=512, popularity_exponent=1.05)
datamodule.setup("fit")
stream = stream_from_batches(datamodule.train_dataloader(), datamodule.sparse_feature_names,
                             datamodule.num_embeddings_per_feature, [68, 68])
hot = {20_000: [torch.arange(50), torch.arange(200)]}
reduced = replay_policies(stream, [20_000], hot, skip_steps=2)
lru = fbgemm_cache(stream, 20_000, "lru")
local = lru.summary(lru.warm_from(2)[0])
out = {"reduced": {r.policy: r.summary for r in reduced}, "local_lru": local, "rows": stream.rows[:50].tolist()}
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as handle:
    json.dump(out, handle)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_each_gloo_rank_replays_its_own_batches_and_all_report_the_mean(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch(script, 2, [str(tmp_path)], timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["rows"] != ranks[1]["rows"]  # each rank's own share of the stream
    assert ranks[0]["reduced"] == ranks[1]["reduced"]  # every rank reports the same figures
    lru = ranks[0]["reduced"]["FBGEMM UVM cache, LRU"]
    for key in ("read_bytes_per_step", "written_rows_per_step"):
        assert lru[key] == pytest.approx((ranks[0]["local_lru"][key] + ranks[1]["local_lru"][key]) / 2)
