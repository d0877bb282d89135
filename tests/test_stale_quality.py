"""Stale skipping that keeps quality: frozen lookups (skip the update, not the input) and weighted keeping.

Each mechanism on its own, on real TorchRec modules: a lookup served without gradient leaves its row and its
fused optimizer state as they were; a weighted input counts as that many copies of it; the skipper's draws are
deterministic, weight what they keep, and a model that cannot honour them is refused at setup.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.core.batch import concat_batches, select_inputs, split_lookups
from lightning_skew.core.decisions import SkewBatch
from lightning_skew.models.decisions import weighted_bce
from lightning_skew.models.dlrm import DLRMModule
from lightning_skew.stale.skipper import StaleEmbeddingSkipper
from lightning_skew.stale.staleness import sampled_inputs
from lightning_skew.torchrec.strategy import TorchRecStrategy

from _support.stale import fit, make_batches, make_model


def _tiny_model() -> DLRMModule:
    torch.manual_seed(0)
    return DLRMModule([10, 10], ["a", "b"], 3, embedding_dim=4, dense_arch_layer_sizes=[4, 4],
                      over_arch_layer_sizes=[4, 1])


def _local(tensor) -> torch.Tensor:
    return (tensor.local_shards()[0].tensor if hasattr(tensor, "local_shards") else tensor).detach().clone()


class _Snapshot(pl.Callback):
    """Table ``t_a``'s rows and row-wise Adagrad state before and after the one step, and the step's logits."""

    def __init__(self, unsplit: Batch) -> None:
        self.unsplit = unsplit

    def _read(self, trainer, pl_module):
        weight = pl_module.state_dict()["model.sparse_arch.embedding_bag_collection.embedding_bags.t_a.weight"]
        state = trainer.strategy.dmp.fused_optimizer.state_dict()["state"]
        momentum = state["model.sparse_arch.embedding_bag_collection.embedding_bags.t_a.weight"]["t_a.momentum1"]
        return _local(weight), _local(momentum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = self._read(trainer, pl_module)
        with torch.no_grad():
            self.split_logits, self.unsplit_logits = pl_module(batch), pl_module(self.unsplit)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after = self._read(trainer, pl_module)


def test_a_frozen_lookup_leaves_its_row_and_its_optimizer_state_untouched_while_the_input_trains():
    # Feature a: inputs look up rows 1 2 3 1 2 3 4 5; both lookups of row 1 are frozen.
    sparse = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 1, 2, 3, 4, 5] * 2),
                               lengths=torch.ones(16, dtype=torch.long))
    member = torch.zeros(16, dtype=torch.bool)
    member[[0, 3]] = True
    fresh, frozen = split_lookups(sparse, member)
    assert fresh.lengths()[:8].tolist() == [0, 1, 1, 0, 1, 1, 1, 1] and frozen.values().tolist() == [1, 1]
    generator = torch.Generator().manual_seed(0)
    dense, labels = torch.randn(8, 3, generator=generator), torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0])
    batch = SkewBatch(dense, fresh, labels, frozen_sparse=frozen)
    snapshot = _Snapshot(Batch(dense, sparse, labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(strategy=TorchRecStrategy(), accelerator="cpu", devices=1, max_steps=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[snapshot])
        trainer.fit(_tiny_model(), DataLoader([batch], batch_size=None))
    # Sum pooling is additive: the split batch computes what the whole one does.
    torch.testing.assert_close(snapshot.split_logits, snapshot.unsplit_logits)
    (weight_before, momentum_before), (weight_after, momentum_after) = snapshot.before, snapshot.after
    assert torch.equal(weight_after[1], weight_before[1]) and torch.equal(momentum_after[1], momentum_before[1])
    for row in (2, 3, 4, 5):  # looked up with gradient: moved, and their Adagrad state grew
        assert not torch.equal(weight_after[row], weight_before[row]) and momentum_after[row] > momentum_before[row]
    assert torch.equal(weight_after[[0, 6, 7, 8, 9]], weight_before[[0, 6, 7, 8, 9]])


def test_a_weighted_batch_has_the_loss_and_dense_gradient_of_its_inputs_repeated():
    model = _tiny_model()
    sparse = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4, 5, 6]),
                               lengths=torch.ones(6, dtype=torch.long))
    dense, labels = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([1.0, 0.0, 1.0])
    weighted = SkewBatch(dense, sparse, labels, weights=torch.tensor([1.0, 3.0, 2.0]))
    repeated = select_inputs(Batch(dense, sparse, labels), torch.tensor([0, 1, 1, 1, 2, 2]))
    dense_params = list(model.model.over_arch.parameters())

    def loss_and_grads(batch):
        loss = weighted_bce(model(batch), batch.labels, getattr(batch, "weights", None))
        return loss, torch.autograd.grad(loss, dense_params)

    (loss_w, grads_w), (loss_r, grads_r) = loss_and_grads(weighted), loss_and_grads(repeated)
    torch.testing.assert_close(loss_w, loss_r)
    for a, b in zip(grads_w, grads_r, strict=True):
        torch.testing.assert_close(a, b)
    # The weights follow their inputs through selection and joining.
    picked = select_inputs(weighted, torch.tensor([2, 1]))
    assert picked.weights.tolist() == [2.0, 3.0]
    assert concat_batches([picked, Batch(dense[:1], select_inputs(weighted, [0]).sparse_features,
                                         labels[:1])]).weights.tolist() == [2.0, 3.0, 1.0]


def test_the_kept_share_is_a_deterministic_draw_of_one_in_k():
    first, again = sampled_inputs(10_000, 4, seed=0, rank=0, position=256), sampled_inputs(10_000, 4, 0, 0, 256)
    assert torch.equal(first, again)
    assert abs(float(first.float().mean()) - 0.25) < 0.02
    assert not torch.equal(first, sampled_inputs(10_000, 4, seed=0, rank=1, position=256))


class _Weights(pl.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor | None] = []
        self.frozen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # after the skipper
        self.weights.append(getattr(batch, "weights", None))
        frozen = getattr(batch, "frozen_sparse", None)
        self.frozen.append(0 if frozen is None else int(frozen.lengths().sum()))


@pytest.mark.parametrize("repack", [False, True], ids=["in_step", "repack"])
def test_the_skipper_keeps_one_droppable_input_in_k_at_weight_k_and_freezes_the_rest(repack):
    model = make_model()
    skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=2, target_drop_fraction=0.5, tolerance=0.05,
                                    sample_batches=2, keep_one_in=4, freeze_stale_lookups=True, repack=repack)
    record = _Weights()
    fit(model, make_batches(8, [range(0, 60)]), [skipper, record])
    weighted = [w for w in record.weights if w is not None and bool((w != 1).any())]
    assert weighted, "no step kept a droppable input"
    assert all(set(w.unique().tolist()) <= {1.0, 4.0} for w in weighted)
    assert skipper.inputs_dropped > 0 and sum(record.frozen) > 0 and skipper.lookups_frozen == sum(record.frozen)
    kept_droppable = sum(int((w == 4).sum()) for w in weighted)
    droppable = kept_droppable + skipper.inputs_dropped
    assert 0.15 < kept_droppable / droppable < 0.35  # about one in four


class _Unweighted(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.inner = make_model()

    def training_step(self, batch, batch_idx):
        return self.inner.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.inner.configure_optimizers()


@pytest.mark.parametrize("options", [{"keep_one_in": 4}, {"freeze_stale_lookups": True}], ids=["weights", "frozen"])
def test_a_model_that_cannot_honour_the_decisions_is_refused_at_setup_naming_both(options):
    skipper = StaleEmbeddingSkipper(evaluate_every_n_steps=2, **options)
    with pytest.raises(ValueError, match=r"StaleEmbeddingSkipper.*_Unweighted does not honour"):
        fit(_Unweighted(), make_batches(2, [range(0, 60)]), [skipper])
