"""DLRMModule: learns the synthetic teacher under TorchRecStrategy, and rejects shapes it cannot build."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest

from lightning_skew import DLRMModule, SyntheticDataModule, TorchRecStrategy


def _fit(interaction: str) -> tuple[dict, float]:
    data = SyntheticDataModule(max_rows_per_table=2000, num_train_samples=120_000, num_val_samples=16_384,
                               num_test_samples=1024, batch_size=1024, seed=1)
    pl.seed_everything(0)
    model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features,
                       embedding_dim=8, dense_arch_layer_sizes=[32, 8], over_arch_layer_sizes=[32, 1],
                       interaction=interaction, embedding_lr=0.1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
        metrics = trainer.validate(model, data, verbose=False)[0]
    return metrics, data.best_attainable_auc("val")


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_short_fit_learns_but_stays_below_the_best_attainable_auc(interaction):
    metrics, best = _fit(interaction)
    assert 0.70 < best < 0.9
    assert metrics["val_auc"] > 0.65, metrics
    assert metrics["val_auc"] < best
    # A model that learned nothing predicts the base rate: log-loss of Bernoulli(0.25) is about 0.562.
    assert metrics["val_logloss"] < 0.55, metrics


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_embeddings_per_feature=[]), "at least one embedding table"),
        (dict(num_embeddings_per_feature=[10, 0]), "at least one row"),
        (dict(num_embeddings_per_feature=[10], sparse_feature_names=["a", "b"]), "one name per table"),
        (dict(num_embeddings_per_feature=[10], embedding_dim=8, dense_arch_layer_sizes=[16, 4]), "must equal"),
        (dict(num_embeddings_per_feature=[10], over_arch_layer_sizes=[8, 2]), "must be 1"),
        (dict(num_embeddings_per_feature=[10], interaction="cross"), "'dot' or 'dcn'"),
        (dict(num_embeddings_per_feature=[10], embedding_optimizer="lamb"), "Unknown embedding optimizer"),
    ],
)
def test_bad_shapes_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DLRMModule(**kwargs)


def test_dot_interaction_is_torchrecs_with_the_same_gradients():
    # DLRMModule swaps TorchRec's InteractionArch for DotInteraction (a cheaper backward): a user's checkpoints
    # and results must not notice.
    import torch
    from torchrec.models.dlrm import InteractionArch

    from lightning_skew.models.interaction import DotInteraction

    torch.manual_seed(0)
    dense = torch.randn(64, 8, requires_grad=True)
    sparse = torch.randn(64, 5, 8, requires_grad=True)
    grad = torch.randn(64, 8 + 6 * 5 // 2)
    outputs = []
    for arch in (InteractionArch(5), DotInteraction(5)):
        dense.grad = sparse.grad = None
        out = arch(dense, sparse)
        out.backward(grad)
        outputs.append((out.detach(), dense.grad.clone(), sparse.grad.clone()))
        assert arch.state_dict() == {} or set(arch.state_dict()) == set(InteractionArch(5).state_dict())
    for theirs, ours in zip(*outputs, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    model = DLRMModule([10] * 5, [f"f{i}" for i in range(5)], 13, embedding_dim=8, dense_arch_layer_sizes=[8])
    assert isinstance(model.model.inter_arch, DotInteraction)
