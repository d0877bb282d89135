"""The access profile as TorchRec planner input: cache statistics that size UVM caches (planned on CPU for CUDA)."""

from __future__ import annotations

import pytest
import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.profile.access import AccessProfile
from lightning_skew.tiers import StreamBuilder, fbgemm_cache
from lightning_skew.tiers.planner import ProfileCacheStatistics, cache_statistics
from lightning_skew.torchrec.planning import build_constraints, build_planner, build_topology

ROWS = 20_000
BATCH = 512


def _skewed_profile(path=None) -> tuple[AccessProfile, StreamBuilder]:
    """Two tables: ``busy`` looked up 4 times per input (skewed), ``quiet`` once (skewed alike)."""
    generator = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, ROWS + 1, dtype=torch.float64) ** 1.05
    order = torch.randperm(ROWS, generator=generator)
    profile = AccessProfile(["busy", "quiet"], [ROWS, ROWS], sample_fraction=1.0)
    builder = StreamBuilder(["busy"], [ROWS], [68])
    for _ in range(200):
        busy = order[torch.multinomial(weights, BATCH * 4, replacement=True, generator=generator)]
        quiet = order[torch.multinomial(weights, BATCH, replacement=True, generator=generator)]
        lengths = torch.cat([torch.full((BATCH,), 4), torch.ones(BATCH, dtype=torch.int64)])
        batch = KeyedJaggedTensor.from_lengths_sync(["busy", "quiet"], torch.cat([busy, quiet]), lengths)
        profile.update(batch)
        builder.add(KeyedJaggedTensor.from_lengths_sync(["busy"], busy, torch.full((BATCH,), 4)))
    return profile, builder


def test_profile_statistics_predict_the_simulated_lru_miss_rate():
    profile, builder = _skewed_profile()
    stream = builder.build()
    stats = cache_statistics(profile, "busy", BATCH)
    assert stats.expected_lookups == pytest.approx(float(stream.offsets.diff().float().mean()), rel=0.02)
    assert stats.expected_miss_rate(0.0) == 1.0 and stats.expected_miss_rate(1.0) == 0.0
    for load_factor in (0.02, 0.05, 0.1):
        simulated = 1 - fbgemm_cache(stream, load_factor=load_factor).summary(skip_steps=100)["hit_rate"]
        assert stats.expected_miss_rate(load_factor) == pytest.approx(simulated, abs=0.04), load_factor
    quiet = cache_statistics(profile, "quiet", BATCH)
    assert quiet.expected_lookups < stats.expected_lookups
    assert 0 < stats.cacheability < 1


def _plan(constraints_per_table):
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=64, num_embeddings=ROWS, feature_names=[f])
              for f in ("busy", "quiet")]
    module = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    names = [t.name for t in tables]
    constraints = build_constraints(names, {n: "fused_uvm_caching" for n in names}, ["table_wise"], 0.02,
                                    constraints_per_table)
    topology = build_topology(1, 1, torch.device("cuda"), {"hbm_cap": 12 * 2**20})
    planner = build_planner({"init_args": {"proposer": {
        "class_path": "torchrec.distributed.planner.proposers.EmbeddingOffloadScaleupProposer"}}}, topology,
        constraints)
    plan = planner.plan(module, [EmbeddingBagCollectionSharder()])
    return {name: option for name, option in plan.plan[""].items()}


def test_planner_sizes_uvm_caches_by_the_profile_statistics(tmp_path):
    profile, _ = _skewed_profile()
    path = tmp_path / "profile.pt"
    profile.save(path)
    without = _plan(None)
    assert {o.compute_kernel for o in without.values()} == {"fused_uvm_caching"}
    assert [o.cache_params.load_factor for o in without.values()] == [0.02, 0.02]  # nothing says to grow them

    spec = {f"t_{f}": {"cache_statistics": {"class_path": "lightning_skew.tiers.ProfileCacheStatistics",
                                            "init_args": {"profile_path": str(path), "feature": f,
                                                          "batch_size": BATCH}}}
            for f in ("busy", "quiet")}
    with_stats = _plan(spec)
    busy, quiet = with_stats["t_busy"], with_stats["t_quiet"]
    assert isinstance(busy.cache_params.stats, ProfileCacheStatistics)
    factors = {n: (o.cache_params.load_factor if o.compute_kernel == "fused_uvm_caching" else 1.0)
               for n, o in with_stats.items()}
    # The caches grow into the free GPU memory, the busier table's most (more distinct rows per batch to fetch).
    assert factors["t_busy"] > 0.02 and factors["t_quiet"] > 0.02
    assert factors["t_busy"] > factors["t_quiet"]
    assert quiet.cache_params.stats.expected_lookups < busy.cache_params.stats.expected_lookups


def test_cache_statistics_that_are_not_statistics_are_refused():
    with pytest.raises(ValueError, match="cache_statistics must be a torchrec CacheStatistics"):
        build_constraints(["t"], {"t": "fused_uvm_caching"}, ["table_wise"], 0.1,
                          {"t": {"cache_statistics": {"class_path": "argparse.Namespace"}}})
