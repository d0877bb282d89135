"""RowSet and lookups_in: which inputs touch only the rows of a set."""

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.rowsets import RowSet, lookups_in


def test_lookups_in_counts_member_hits_per_input_over_all_features():
    # 3 inputs; feature a is one-hot, feature b is multi-hot (lengths 2, 0, 1)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([0, 5, 9, 1, 2, 7]),
        lengths=torch.tensor([1, 1, 1, 2, 0, 1]))
    hot = RowSet(["a", "b"], [10, 10], [torch.tensor([0, 5]), torch.tensor([1, 2])])
    hits, lookups = lookups_in(sparse, hot)
    assert lookups.tolist() == [3, 1, 2]
    assert hits.tolist() == [3, 1, 0]  # input 0: a=0, b=1,2 all hot; input 1: a=5 hot; input 2: a=9, b=7 cold
    assert (hits == lookups).tolist() == [True, True, False]


def test_features_outside_the_set_count_as_cold():
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=["a", "c"], values=torch.tensor([0, 0]),
                                                 lengths=torch.tensor([1, 1]))
    hits, lookups = lookups_in(sparse, RowSet(["a"], [4], [torch.tensor([0])]))
    assert hits.tolist() == [1] and lookups.tolist() == [2]


def test_masks_round_trip_and_bad_rows_are_rejected():
    rowset = RowSet.from_masks(["a"], [torch.tensor([True, False, True])])
    assert rowset.rows[0].tolist() == [0, 2] and len(rowset) == 2
    with pytest.raises(ValueError, match="outside"):
        RowSet(["a"], [3], [torch.tensor([3])])
    with pytest.raises(ValueError, match="one entry per feature"):
        RowSet(["a", "b"], [3], [torch.tensor([0])])


def test_one_hot_inputs_take_the_grid_path_and_agree_with_the_jagged_path():
    # 4 inputs, 3 one-hot features (c unknown to the set); the same IDs plus one empty multi-hot feature d
    # force the general path, which must count the same hits.
    one_hot = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"],
                                                  values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]),
                                                  lengths=torch.ones(12, dtype=torch.long))
    jagged = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c", "d"],
                                                 values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]),
                                                 lengths=torch.tensor([1] * 12 + [0] * 4))
    rows = RowSet(["a", "b", "d"], [8, 8, 8], [torch.tensor([0, 3]), torch.tensor([5, 6, 7]), torch.tensor([1])])
    hits, lookups = lookups_in(one_hot, rows)
    assert hits.tolist() == [1, 1, 1, 2] and lookups.tolist() == [3, 3, 3, 3]
    assert torch.equal(hits, lookups_in(jagged, rows)[0])
