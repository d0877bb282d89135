"""Planner settings from a recipe: per-table constraints, topology, planner stages by class path, saved plans."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from torchrec.distributed.planner.types import PlannerError

from lightning_skew import TorchRecStrategy
from lightning_skew.torchrec.sharding import plan_rows

from _support.small import make_data, make_model, quiet_trainer


def _fit(strategy: TorchRecStrategy, tmp_path: Path) -> dict[str, list[str]]:
    data = make_data(1)
    trainer = quiet_trainer(strategy=strategy, max_steps=1, limit_val_batches=0, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_model(data, "rowwise_adagrad"), data)
    return {row[1]: row for row in plan_rows(strategy.dmp.plan)}


def test_per_table_constraints_decide_that_tables_sharding(tmp_path):
    rows = _fit(TorchRecStrategy(sharding_types=["column_wise"],
                                 table_constraints={"t_cat_1": {"sharding_types": ["table_wise"]}}), tmp_path)
    assert rows["t_cat_1"][2] == "table_wise"
    assert {row[2] for name, row in rows.items() if name != "t_cat_1"} == {"column_wise"}


def test_a_constraint_for_a_table_the_model_lacks_or_an_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not have: \\['t_nope'\\]"):
        _fit(TorchRecStrategy(table_constraints={"t_nope": {"sharding_types": ["table_wise"]}}), tmp_path)
    with pytest.raises(ValueError, match="unknown keys \\['sharding'\\]"):
        _fit(TorchRecStrategy(table_constraints={"t_cat_0": {"sharding": ["table_wise"]}}), tmp_path)


def test_the_topology_and_a_planner_stage_come_from_the_recipe(tmp_path):
    # Host memory too small for the tables: TorchRec's planner must refuse, so the setting reached it.
    with pytest.raises(PlannerError, match="insufficient storage"):
        _fit(TorchRecStrategy(topology={"ddr_cap": 1000, "hbm_cap": 1000}), tmp_path)
    stage = {"class_path": "torchrec.distributed.planner.EmbeddingShardingPlanner",
             "init_args": {"storage_reservation": {
                 "class_path": "torchrec.distributed.planner.storage_reservations.HeuristicalStorageReservation",
                 "init_args": {"percentage": 0.3}}}}
    rows = _fit(TorchRecStrategy(planner=stage, topology={"ddr_cap": 10**9}), tmp_path)
    assert len(rows) == 5


def test_a_saved_plan_is_reused_unchanged_and_checked(tmp_path):
    plan_path = tmp_path / "plan.pt"
    first = _fit(TorchRecStrategy(sharding_types=["table_wise"], plan_path=str(plan_path)), tmp_path)
    assert plan_path.is_file()
    # Reused as saved, although this strategy would plan column-wise by itself.
    again = _fit(TorchRecStrategy(sharding_types=["column_wise"], plan_path=str(plan_path)), tmp_path)
    assert again == first and {row[2] for row in again.values()} == {"table_wise"}
    plan_path.write_bytes(b"not a plan")
    with pytest.raises(ValueError, match="plan.pt is not a sharding plan"):
        _fit(TorchRecStrategy(plan_path=str(plan_path)), tmp_path)


def test_a_cache_budget_in_bytes_is_the_load_factor_of_the_models_rows():
    from lightning_skew.torchrec.sharding import cache_load_factor_for

    data = make_data(1)
    model = make_model(data, "rowwise_adagrad")
    rows, dim = sum(data.num_embeddings_per_feature), 8
    # 4-byte weights plus row-wise Adagrad's one state element per row, as a hot/cold budget counts them.
    assert cache_load_factor_for(model, 1000) == pytest.approx(1000 / (rows * 4 * (dim + 1)))
    assert cache_load_factor_for(model, 10**12) == 1.0
    with pytest.raises(ValueError, match="give one of them"):
        TorchRecStrategy(cache_budget_bytes=1000, cache_load_factor=0.5)

