"""The plain-PyTorch hot/cold path: sparse row-wise Adagrad, the collection that pins its cold shard to host memory,
and a Lightning fit of a DLRM placed with it (CPU here; the CUDA test runs wherever CUDA is present)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew import PlainHotColdPlacement
from lightning_skew.hotcold.collection import table_specs
from lightning_skew.hotcold.placement import plan_placement
from lightning_skew.hotcold.plain import PlainHotColdEmbeddingBagCollection, place_hot_cold
from lightning_skew.hotcold.state import hot_cold_collections
from lightning_skew.profile import AccessProfile
from lightning_skew.torchrec.optim import SparseRowWiseAdagrad, fuse_embedding_optimizer
from lightning_skew.torchrec.strategy import TorchRecStrategy

from _support.hot_cold import hot_cold_batch, hot_cold_pair
from _support.small import RecordLosses, make_data, make_model


def test_sparse_rowwise_adagrad_updates_the_looked_up_rows_as_rowwise_adagrad_does():
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(10, 4))
    sparse = torch.nn.Parameter(dense.detach().clone())
    reference, optimizer = RowWiseAdagrad([dense], lr=0.1), SparseRowWiseAdagrad([sparse], lr=0.1)
    for rows in ([1, 3, 3], [3, 7], [0, 1, 9, 9, 9]):
        ids = torch.tensor(rows)
        grad_out = torch.randn(len(rows), 4)
        torch.nn.functional.embedding(ids, dense).mul(grad_out).sum().backward()
        torch.nn.functional.embedding(ids, sparse, sparse=True).mul(grad_out).sum().backward()
        assert sparse.grad.is_sparse
        reference.step(), optimizer.step()
        reference.zero_grad(), optimizer.zero_grad()
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(optimizer.state[sparse]["sum"], reference.state[dense]["sum"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="weight_decay"):
        SparseRowWiseAdagrad([sparse], lr=0.1, weight_decay=0.01)


@pytest.mark.parametrize(("weighted", "one_hot", "optimizer"),
                         [(False, False, "rowwise_adagrad"), (True, False, "rowwise_adagrad"),
                          (False, True, "rowwise_adagrad"), (True, True, "rowwise_adagrad"),
                          (False, False, "adagrad"), (False, True, "sgd")])
def test_plain_split_pools_and_trains_exactly_as_the_original(weighted, one_hot, optimizer):
    ebc, split = hot_cold_pair(weighted, optimizer)
    for step in range(3):
        batch = hot_cold_batch(weighted, batch_size=32, one_hot=one_hot)
        expected, actual = ebc(batch), split(batch)
        assert actual.keys() == expected.keys()
        torch.testing.assert_close(actual.values(), expected.values(), atol=1e-6, rtol=0)
        grad_out = torch.randn_like(expected.values(), generator=torch.Generator().manual_seed(step))
        (expected.values() * grad_out).sum().backward()  # the fused optimizers step in backward
        (actual.values() * grad_out).sum().backward()
    merged = split.state_dict()  # whole tables by row ID, as the original collection names them
    assert sorted(merged) == sorted(ebc.state_dict())
    for name in ("a", "b", "c"):
        torch.testing.assert_close(merged[f"embedding_bags.{name}.weight"], ebc.embedding_bags[name].weight,
                                   atol=1e-6, rtol=0)
    assert split.hot.embedding_bags["a__hot"].weight.grad is None  # applied in backward, nothing left behind


def test_a_batch_of_hot_rows_only_never_touches_the_cold_shard():
    ebc, split = hot_cold_pair()
    cold_before = {k: v.detach().clone() for k, v in split.cold.state_dict().items()}
    hot_rows = {"fa": [1, 5, 7], "fa2": [5], "fb": [0], "fc": []}  # table c has no hot rows: fc's bags stay empty
    lengths, values = [], []
    for key in ("fa", "fb", "fc", "fa2"):
        for i in range(4):
            bag = hot_rows[key][: i % (len(hot_rows[key]) + 1)]
            lengths.append(len(bag))
            values += bag
    batch = KeyedJaggedTensor(keys=["fa", "fb", "fc", "fa2"], values=torch.tensor(values),
                              lengths=torch.tensor(lengths))
    expected, actual = ebc(batch), split(batch)
    torch.testing.assert_close(actual.values(), expected.values(), atol=1e-6, rtol=0)
    actual.values().sum().backward()
    assert split.skipped_cold == 1
    for key, value in split.cold.state_dict().items():
        assert torch.equal(value, cold_before[key]), key  # no lookup, no update, no optimizer state
    split(hot_cold_batch())  # a batch with cold lookups runs the cold shard again
    assert split.skipped_cold == 1


def test_moving_the_module_moves_the_hot_shard_and_leaves_the_cold_one_in_host_memory():
    _, split = hot_cold_pair()
    split(hot_cold_batch()).values().sum().backward()  # optimizer state exists now
    split.to("meta")
    assert split.hot.embedding_bags["a__hot"].weight.device.type == "meta"
    assert split.cold.embedding_bags["a__cold"].weight.device.type == "cpu"
    optimizers = split.hot.embedding_bags["a__hot"].weight._in_backward_optimizers
    assert optimizers[0].state[split.hot.embedding_bags["a__hot"].weight]["sum"].device.type == "meta"


def test_an_embedding_optimizer_without_sparse_updates_is_a_clear_error():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=10,
                                                     feature_names=["fa"])])
    fuse_embedding_optimizer(ebc, "adam", lr=0.01)
    plan = plan_placement(table_specs(ebc), [torch.tensor([1])], budget_bytes=100, bytes_per_row=[48])
    with pytest.raises(ValueError, match="Adam does not take sparse gradients"):
        PlainHotColdEmbeddingBagCollection(ebc, plan)


# -- a DLRM placed with place_hot_cold, trained by a plain Lightning Trainer --------------------------------


def _fit(model: pl.LightningModule, data, epochs: int, root: Path, ckpt_path: str | None = None,
         callbacks: list[pl.Callback] | None = None, strategy: Any = "auto") -> tuple[pl.Trainer, list[float]]:
    losses = RecordLosses()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=root, enable_checkpointing=False, callbacks=[losses, *(callbacks or [])],
                         strategy=strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, losses.losses


def _placed(data, budget_bytes: int = 200 * 36):
    model = make_model(data, "rowwise_adagrad")
    profile = AccessProfile.for_datamodule(data)
    for batch in data.train_dataloader():
        profile.update(batch.sparse_features)
    placements = place_hot_cold(model, profile.hot_rows(budget_bytes=budget_bytes, embedding_dim=8), budget_bytes)
    return model, placements


def _tables(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "embedding_bags" in k}


def test_a_placed_dlrm_trains_as_the_plain_one_with_its_state_in_the_datasets_ids(tmp_path):
    data = make_data(1)
    reference = make_model(data, "rowwise_adagrad")
    _, expected = _fit(reference, data, 2, tmp_path / "reference")
    model, placements = _placed(data)
    kinds = {row[1] for placement in placements.values() for row in placement.rows()}
    assert "split" in kinds and "hot" in kinds  # small tables whole, larger ones split
    with pytest.raises(ValueError, match="placed already"):
        place_hot_cold(model, AccessProfile.for_datamodule(data).hot_rows(budget_bytes=36, embedding_dim=8), 36)
    _, losses = _fit(model, data, 2, tmp_path / "placed")
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=0)
    # The state dict is the unsplit module's, keys and whole tables: it loads strictly both ways.
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    for key, value in _tables(reference).items():
        torch.testing.assert_close(_tables(model)[key], value, atol=1e-5, rtol=0, msg=key)
    unsplit = make_model(data, "rowwise_adagrad")
    unsplit.load_state_dict(model.state_dict())
    smaller, _ = _placed(data, budget_bytes=50 * 36)  # another placement takes the tables too
    smaller.load_state_dict(unsplit.state_dict())
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(smaller(batch), model(batch), atol=1e-6, rtol=0)
        torch.testing.assert_close(unsplit(batch), model(batch), atol=1e-6, rtol=0)


def test_optimizer_state_moves_between_placements_in_the_datasets_ids():
    bigger, smaller = hot_cold_pair(), hot_cold_pair()
    ebc, split = bigger
    plan = plan_placement(table_specs(ebc), [torch.tensor([9, 2]), torch.tensor([1, 2]), torch.tensor([4])],
                          budget_bytes=130, bytes_per_row=[20, 20, 36])
    other = PlainHotColdEmbeddingBagCollection(smaller[0], plan)  # the original of the second pair, re-placed
    for _ in range(2):
        split(hot_cold_batch(batch_size=32)).values().sum().backward()
    other.load_state_dict(split.state_dict())
    other.load_optimizer_state(split.optimizer_state())
    assert split.optimizer_state()["a"]["sum"].shape == (100, 1)
    for module in (split, other):
        module(hot_cold_batch(batch_size=32, one_hot=True)).values().sum().backward()
    for key, value in split.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    for table, state in split.optimizer_state().items():
        torch.testing.assert_close(other.optimizer_state()[table]["sum"], state["sum"], atol=1e-6, rtol=0)


def test_the_placement_callback_places_at_fit_and_resumes_exactly_from_a_checkpoint(tmp_path):
    data = make_data(1)
    reference = make_model(data, "rowwise_adagrad")
    _, expected = _fit(reference, data, 2, tmp_path / "reference")
    first = make_model(data, "rowwise_adagrad")
    placement = PlainHotColdPlacement(budget_bytes=200 * 36, sample_fraction=0.5)
    trainer, first_losses = _fit(first, data, 1, tmp_path / "first", callbacks=[placement])
    assert placement.placements and sorted(placement.placements) == sorted(hot_cold_collections(first))
    assert sum(t.num_hot for p in placement.placements.values() for t in p.tables) > 0
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = make_model(data, "rowwise_adagrad")  # under another budget: the checkpoint is in the dataset's IDs
    _, resumed_losses = _fit(resumed, data, 2, tmp_path / "resumed", ckpt_path=str(tmp_path / "epoch1.ckpt"),
                             callbacks=[PlainHotColdPlacement(budget_bytes=80 * 36, sample_fraction=0.5)])
    torch.testing.assert_close(first_losses + resumed_losses, expected, atol=1e-5, rtol=0)
    for key, value in _tables(reference).items():
        torch.testing.assert_close(_tables(resumed)[key], value, atol=1e-5, rtol=0, msg=key)
    with pytest.raises(MisconfigurationException, match="HotColdStrategy"):
        _fit(make_model(data, "rowwise_adagrad"), data, 1, tmp_path / "torchrec", strategy=TorchRecStrategy(),
             callbacks=[PlainHotColdPlacement(budget_bytes=200 * 36)])
    with pytest.raises(ValueError, match="budget_bytes"):
        PlainHotColdPlacement(budget_bytes=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_hot_shards_train_on_the_gpu_and_cold_shards_in_host_memory():
    ebc, split = hot_cold_pair()
    split.cuda()
    assert split.hot.embedding_bags["a__hot"].weight.is_cuda
    assert not split.cold.embedding_bags["a__cold"].weight.is_cuda
    for step in range(3):
        batch = hot_cold_batch(batch_size=32, one_hot=bool(step % 2))
        expected, actual = ebc(batch), split(batch.to(torch.device("cuda")))
        assert actual.values().is_cuda
        torch.testing.assert_close(actual.values().cpu(), expected.values(), atol=1e-5, rtol=0)
        grad_out = torch.randn_like(expected.values())
        (expected.values() * grad_out).sum().backward()
        (actual.values() * grad_out.cuda()).sum().backward()
    merged = split.state_dict()
    for name in ("a", "b", "c"):
        torch.testing.assert_close(merged[f"embedding_bags.{name}.weight"], ebc.embedding_bags[name].weight,
                                   atol=1e-5, rtol=0)
