"""The batch-decision contract (core/decisions.py): every declared decision survives every batch operation as far as
it still holds, per-step decisions land on declared fields, and private upstream state stays behind its adapters."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.batch import concat_batches, select_inputs, slice_inputs
from lightning_skew.core.decisions import (
    BATCH_DECISIONS,
    MODEL_DECISIONS,
    RoutedSparse,
    SkewBatch,
    carry_decisions,
    replace_inputs,
    require_decisions,
    set_decisions,
)
from lightning_skew.core.deduped import DedupedLookups
from lightning_skew.core.rowsets import RowSet
from lightning_skew.dedup import dedup_batch
from lightning_skew.hotcold.routing import RoutedLookups
from lightning_skew.models.dlrm import DLRMModule
from lightning_skew.tiers.prefetch import lookahead_batches

KEYS = ["user", "item"]
# Routed lookups describe the very KeyedJaggedTensor they were routed from: any operation that builds new inputs
# voids them (the collections then route in the step), by contract.
VOIDED_WITH_NEW_INPUTS = {"routed_sparse"}


def kjt(bags: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(bags), values=torch.tensor([i for f in bags.values() for bag in f for i in bag]),
        lengths=torch.tensor([len(bag) for f in bags.values() for bag in f]))


def decided_batch(offset: int = 0, hot_rows: RowSet | None = None) -> SkewBatch:
    """Four inputs with every decision of the contract set to something other than its default."""
    plain = Batch(torch.arange(8, dtype=torch.float32).view(4, 2) + offset,
                  kjt({"user": [[1], [1], [2], [1, 3]], "item": [[5 + offset], [6], [7], [8]]}),
                  torch.tensor([0.0, 1.0, 1.0, 0.0]))
    deduped = dedup_batch(plain, ["user"])
    hot_rows = hot_rows or RowSet(KEYS, [10, 20], [torch.tensor([1, 2, 3]), torch.arange(20)])
    routed = RoutedSparse(deduped.sparse_features, {"model.sparse_arch.embedding_bag_collection": RoutedLookups(
        kjt({"user__hot": [[0], [0], [1], [0, 2]]}), kjt({"user__cold": [[], [], [], []]}), 0)})
    return dataclasses.replace(
        deduped, is_hot=True, num_hot=4, hot_rows=hot_rows, weights=torch.tensor([1.0, 2.0, 1.0, 3.0]) + offset,
        frozen_sparse=kjt({"user": [[], [3], [], []], "item": [[9], [], [], []]}), routed_sparse=routed)


def bags(sparse: KeyedJaggedTensor) -> dict[str, list[list[int]]]:
    return {key: [bag.tolist() for bag in jt.to_dense()] for key, jt in sparse.to_dict().items()}


def served(deduped: DedupedLookups) -> dict[str, list[list[int]]]:
    """The bags each input of the batch is served, read through the inverse indices (any layout of the bags)."""
    distinct = bags(deduped.bags)
    return {key: [distinct[key][u] for u in deduped.inverse.tolist()] for key in deduped.features}


def same(name: str, left: object, right: object, exact: bool) -> bool:
    if left is None or right is None:
        return left is right
    if isinstance(left, torch.Tensor):
        return torch.equal(left, right)
    if isinstance(left, KeyedJaggedTensor):
        return bags(left) == bags(right)
    if isinstance(left, DedupedLookups):
        forms = (left.merged is None) == (right.merged is None) and (
            left.merged is None or bags(left.merged) == bags(right.merged))
        return served(left) == served(right) and left.features == right.features and (forms or not exact)
    if isinstance(left, RoutedSparse):
        return left.parts.keys() == right.parts.keys() and all(
            bags(a.hot) == bags(b.hot) and bags(a.cold) == bags(b.cold) and a.version == b.version
            for a, b in zip(left.parts.values(), right.parts.values(), strict=True)) and right.valid_for(right.source)
    if isinstance(left, RowSet):
        return left is right  # the hot set is one object that consumers check by identity
    return left == right


def assert_keeps(before: SkewBatch, after: SkewBatch, new_inputs: bool, exact: bool = True) -> None:
    assert isinstance(after, SkewBatch)
    for name in BATCH_DECISIONS:
        if new_inputs and name in VOIDED_WITH_NEW_INPUTS:
            assert getattr(after, name) is None, name
        else:
            assert same(name, getattr(before, name), getattr(after, name), exact), name


def test_the_contract_declares_every_field_a_batch_carries_and_the_fixture_sets_each():
    own = [f for f in dataclasses.fields(SkewBatch) if f.name not in {"dense_features", "sparse_features", "labels"}]
    assert BATCH_DECISIONS == tuple(f.name for f in own)
    assert MODEL_DECISIONS <= set(BATCH_DECISIONS)
    batch = decided_batch()
    assert all(getattr(batch, f.name) != f.default if not isinstance(getattr(batch, f.name), torch.Tensor) else True
               for f in own)
    assert all(getattr(batch, f.name) is not None for f in own)
    # Documented where it is declared: who sets it and who honours it.
    import lightning_skew.core.decisions as decisions

    for name in BATCH_DECISIONS:
        assert re.search(rf"^``{name}``\s+\S", decisions.__doc__, re.MULTILINE), name
        assert f"{name}:" in SkewBatch.__doc__, name


def test_moving_a_batch_keeps_every_decision_routed_lookups_included():
    batch = decided_batch()
    assert_keeps(batch, batch.to("cpu"), new_inputs=False)
    assert_keeps(batch, move_data_to_device(batch, torch.device("cpu")), new_inputs=False)  # as Lightning moves it


def test_picking_slicing_and_joining_inputs_keep_the_decisions_that_still_hold():
    hot = RowSet(KEYS, [10, 20], [torch.tensor([1, 2, 3]), torch.arange(20)])
    first, second = decided_batch(0, hot), decided_batch(1, hot)
    assert_keeps(first, select_inputs(first, torch.arange(4)), new_inputs=True, exact=False)
    assert_keeps(first, slice_inputs(first, 0, 4), new_inputs=True, exact=False)
    joined = concat_batches([first, second])
    assert joined.is_hot and joined.num_hot == 8 and joined.hot_rows is hot
    assert_keeps(first, slice_inputs(joined, 0, 4), new_inputs=True, exact=False)
    assert_keeps(second, select_inputs(joined, torch.arange(4, 8)), new_inputs=True, exact=False)


def test_deduplicating_and_looking_ahead_keep_the_other_decisions():
    batch = decided_batch()
    plain_lookups = dataclasses.replace(batch, deduped=None, sparse_features=kjt(
        {"user": [[1], [1], [2], [1, 3]], "item": [[5], [6], [7], [8]]}))
    again = dedup_batch(plain_lookups, ["user"])
    assert_keeps(batch, again, new_inputs=True)
    (ahead,) = list(lookahead_batches([batch], window=1))
    assert_keeps(batch, ahead, new_inputs=False)


def test_a_callback_s_decisions_land_on_declared_fields_of_the_very_batch_the_step_gets():
    batch = Batch(torch.zeros(3, 1), kjt({"user": [[1], [2], [3]]}), torch.zeros(3))
    weights = torch.tensor([1.0, 4.0, 1.0])
    decided = set_decisions(batch, weights=weights)
    assert decided is batch and isinstance(batch, SkewBatch)  # the object Lightning hands training_step
    assert not batch.is_hot and batch.num_hot == 0 and batch.deduped is None and batch.routed_sparse is None
    # Declared, so every operation that rebuilds a batch keeps it (an undeclared attribute did not survive this).
    assert torch.equal(dataclasses.replace(batch, labels=torch.ones(3)).weights, weights)
    assert torch.equal(select_inputs(batch, torch.tensor([1])).weights, weights[1:2])
    assert carry_decisions(batch) is batch

    class OwnBatch(Batch):
        pass

    with pytest.raises(TypeError, match="OwnBatch cannot carry per-step decisions.*SkewBatch.of"):
        set_decisions(OwnBatch(torch.zeros(1, 1), kjt({"user": [[1]]}), torch.zeros(1)), weights=torch.ones(1))


def test_a_callback_that_drops_inputs_hands_the_step_the_kept_inputs_with_their_decisions():
    batch = dataclasses.replace(decided_batch(), is_hot=False, num_hot=2)  # a stitched batch: inputs 0, 1 hot
    step_gets = batch
    replace_inputs(batch, select_inputs(batch, torch.tensor([1, 2, 3])))
    assert step_gets.batch_size == 3 and step_gets.num_hot == 1  # the split point moves with the inputs
    assert torch.equal(step_gets.weights, torch.tensor([2.0, 1.0, 3.0]))
    assert bags(step_gets.frozen_sparse) == {"user": [[3], [], []], "item": [[], [], []]}
    assert step_gets.routed_sparse is None  # routed for inputs that are gone
    plain = Batch(torch.zeros(3, 1), kjt({"user": [[1], [2], [3]]}), torch.arange(3.0))
    replace_inputs(plain, select_inputs(plain, torch.tensor([2])))
    assert type(plain) is Batch and plain.labels.tolist() == [2.0]  # nothing decided: nothing added


def test_a_part_naming_a_decision_outside_the_contract_or_unhonoured_is_refused():
    model = DLRMModule([10, 20], KEYS, dense_in_features=2, embedding_dim=4, dense_arch_layer_sizes=[4])
    require_decisions(model, MODEL_DECISIONS, "a part")
    with pytest.raises(ValueError, match=r"a part names \['weight'\]"):
        require_decisions(model, ["weight"], "a part")
    with pytest.raises(ValueError, match="a part puts deduped on the batches, but Module does not honour it"):
        require_decisions(torch.nn.Module(), ["deduped"], "a part")


# Private names of torch, TorchRec and Lightning, each read only by its adapter.
PRIVATE = re.compile(r"(?<!\w)(_apply_optimizer_in_backward|_in_backward_optimizers|_optimizer_classes|_optimizer_kwargs|"
                     r"_pipelined_modules|_model_attached|_model_class|_datamodule_class)\b|\._trainer\b")
ADAPTERS = {"torchrec/upstream.py", "core/lightning_private.py"}
OWN_TRAINER = "hotcold/strategy.py"  # HotColdStrategy keeps a _trainer of its own (Lightning's Strategy has none)


def test_private_upstream_state_is_read_only_by_the_adapters():
    package = Path(__file__).parents[1] / "lightning_skew"
    found = []
    for path in package.rglob("*.py"):
        relative = path.relative_to(package).as_posix()
        if relative in ADAPTERS or relative.startswith("bench/") or relative.endswith("/bench.py"):
            continue
        found += [f"{relative}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                  if PRIVATE.search(line) and not (relative == OWN_TRAINER and "self._trainer" in line)]
    assert not found, "\n".join(found)
