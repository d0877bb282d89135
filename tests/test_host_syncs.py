"""No technique adds a host sync to the training step: every steady-state step of each technique (and of them all
together) makes at most the host syncs of the plain TorchRecStrategy step, counted by a TorchDispatchMode on CPU."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_skew.core.host_sync import HostSyncCounter, StepHostSyncs

from _support.composition import fit_cell


def _syncs_per_step(cell: tuple, root: Path) -> tuple[list[int], dict]:
    counter = StepHostSyncs(skip_steps=2)
    result = fit_cell(cell, root, epochs=1, first_callbacks=(counter,))
    assert counter.per_step, "no step was counted"
    return [sum(step.values()) for step in counter.per_step], result


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    """The most host syncs a plain TorchRecStrategy step makes (its embedding kernels' and the dense Adam's)."""
    counts, _ = _syncs_per_step(("torchrec", None, None), tmp_path_factory.mktemp("baseline"))
    assert len(set(counts)) == 1, f"the plain step's syncs vary: {counts}"
    return counts[0]


def test_the_counter_sees_what_would_stall_a_gpu():
    with HostSyncCounter() as counter:
        ids = torch.tensor([3, 0, 7, 7])
        _ = ids[ids > 2], int(ids.max()), torch.nonzero(ids), torch.repeat_interleave(ids)
        _ = torch.repeat_interleave(torch.arange(4), ids, output_size=17), ids.index_select(0, ids.clamp(max=3))
    assert counter.counts == Counter({"index with a boolean mask": 1, "_local_scalar_dense": 1, "nonzero": 1,
                                      "repeat_interleave without output_size": 1})


@pytest.mark.parametrize("cell", [("torchrec", "fae", None), ("torchrec", "interleave", None),
                                  ("torchrec", "stitch", None), ("hotcold", None, None), ("hotcold", "fae", None)],
                         ids=lambda cell: "-".join(part or "none" for part in cell))
def test_popularity_batching_and_hot_cold_placement_add_no_host_sync_to_a_step(cell, baseline, tmp_path):
    counts, result = _syncs_per_step(cell, tmp_path)
    assert max(counts) <= baseline, f"{cell}: {counts} host syncs per step against {baseline} without the technique"
    if cell[0] == "hotcold":
        assert result["routed_forwards"][0] > 0  # the lookups arrived routed: the step split nothing itself
    if cell == ("hotcold", "fae", None):
        assert result["skipped_cold"][0] > 0  # hot-only steps ran, and they too stayed within the baseline


def test_all_techniques_together_add_host_syncs_only_when_the_skipper_evaluates(baseline, tmp_path):
    # Hot/cold placement, interleaved popularity batches, and the skipper dropping inputs in the data pipeline.
    # The skipper reads the tables every `evaluate_every_n_steps` (2 here); the steps between add nothing.
    counts, result = _syncs_per_step(("hotcold", "interleave", "repack"), tmp_path)
    assert result["dropped"] > 0
    evaluating = [count for count in counts if count > baseline]
    assert counts.count(baseline) >= len(counts) // 2 - 1
    assert len(evaluating) <= (len(counts) + 1) // 2


def test_the_skipper_in_the_step_does_add_host_syncs(baseline, tmp_path):
    # Dropping inside the step needs the drop mask on the host: the data-pipeline mode (repack) is the GPU-clean one.
    counts, result = _syncs_per_step(("torchrec", None, "instep"), tmp_path)
    assert result["dropped"] > 0
    assert counts[-1] > baseline  # once a stale set is in force, every step decides on the host
