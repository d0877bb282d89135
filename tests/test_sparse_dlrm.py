"""DLRMModule without dense features (dense_in_features=0): trains under TorchRecStrategy, exports, loads."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew import ColumnarDataModule, DLRMModule, TorchRecStrategy
from lightning_skew.models import SparseDLRM

from _support.columnar_files import AVAZU_CATEGORICAL, avazu_rows, write_avazu


@pytest.fixture(scope="module")
def avazu(tmp_path_factory) -> ColumnarDataModule:
    folder = tmp_path_factory.mktemp("avazu")
    # The clicks follow site_id (each site has its own click rate): learnable from the embeddings alone.
    train = write_avazu(folder / "train.csv", avazu_rows(12_000, seed=0))
    val = write_avazu(folder / "val.csv", avazu_rows(3_000, seed=1))
    return ColumnarDataModule(train_paths=str(train), val_paths=str(val), label="click",
                              sparse_features=AVAZU_CATEGORICAL, encoding="hash", num_embeddings=2000,
                              missing_values=["-1"], batch_size=500)


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_a_dlrm_without_dense_features_learns_under_the_torchrec_strategy(avazu, interaction, tmp_path):
    assert avazu.dense_in_features == 0
    pl.seed_everything(0)
    model = DLRMModule(avazu.num_embeddings_per_feature, avazu.sparse_feature_names, avazu.dense_in_features,
                       embedding_dim=8, over_arch_layer_sizes=[32, 1], interaction=interaction, embedding_lr=0.1)
    assert isinstance(model.model, SparseDLRM)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=TorchRecStrategy(), max_epochs=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, avazu)
        metrics = trainer.validate(model, avazu, verbose=False)[0]
    # The site's click rate alone gives about 0.75; a model that learned nothing gives 0.5.
    assert metrics["val_auc"] > 0.65, metrics
    export = tmp_path / "plain.ckpt"
    trainer.strategy.export_unsharded_checkpoint(str(export))
    plain = DLRMModule.load_from_checkpoint(str(export))
    batch = next(iter(avazu.val_dataloader()))
    with torch.no_grad():
        logits = plain(batch)
    assert logits.shape == (500,) and torch.isfinite(logits).all()


def test_the_sparse_interaction_reads_the_embeddings_alone():
    model = DLRMModule([10, 20, 30], ["a", "b", "c"], dense_in_features=0, embedding_dim=4,
                       over_arch_layer_sizes=[8, 1])
    # 3 embeddings of 4 and their 3 pairwise dot products feed the top MLP.
    assert model.model.over_arch.model[0]._mlp[0]._linear.in_features == 3 * 4 + 3
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.tensor([1, 2, 3, 4, 5, 6, 7]),
                            lengths=torch.tensor([1, 1, 1, 2, 0, 2], dtype=torch.int32))
    logits = model(Batch(dense_features=torch.zeros(2, 0), sparse_features=kjt, labels=torch.zeros(2)))
    assert logits.shape == (2,)
    with pytest.raises(ValueError, match="dense_in_features must be at least 0"):
        DLRMModule([10], dense_in_features=-1)
