"""Recommenders written the way Lightning + TorchRec users write them (not lightning-skew's DLRMModule), each taking
its tables from the DataModule in ``configure_model``: a DeepFM with first-order (dimension-1) tables, a two-tower
model, and a model with plain ``torch.nn.EmbeddingBag`` tables."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch

from lightning_skew import RecDataModule
from lightning_skew.core.id_ranges import check_table_ids
from lightning_skew.torchrec.optim import dense_parameters, fuse_embedding_optimizer

FEATURES = ("user", "item", "category")


class ClickModel(pl.LightningModule):
    """What the three share: tables sized from the DataModule at ``configure_model`` (or given), BCE on click
    logits, validation AUC, Adam on the dense part."""

    def __init__(self, sparse_feature_names: list[str] | None = None,
                 num_embeddings_per_feature: list[int] | None = None, dense_in_features: int | None = None,
                 embedding_dim: int = 8, embedding_lr: float = 0.05, meta_device: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.val_auc = BinaryAUROC()
        self.built = False
        if num_embeddings_per_feature is not None:
            self.build()

    def configure_model(self) -> None:
        """Tables from the DataModule, once (Lightning calls this before any strategy wraps or shards the model)."""
        if self.built:
            return
        data = self.trainer.datamodule
        self.hparams.sparse_feature_names = list(data.sparse_feature_names)
        self.hparams.num_embeddings_per_feature = list(data.num_embeddings_per_feature)
        self.hparams.dense_in_features = int(data.dense_in_features)
        self.build()

    def build(self) -> None:
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch.labels.float())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_auc.update(torch.sigmoid(self(batch)), batch.labels.long())
        self.log("val_auc", self.val_auc, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(dense_parameters(self), lr=1e-2)


class DeepFM(ClickModel):
    """DeepFM over TorchRec: per feature a first-order table (dimension 1) and an embedding table, one collection."""

    def build(self) -> None:
        names, sizes, dim = (self.hparams.sparse_feature_names, self.hparams.num_embeddings_per_feature,
                             self.hparams.embedding_dim)
        tables = [EmbeddingBagConfig(name=f"first_order_{n}", embedding_dim=1, num_embeddings=r, feature_names=[n])
                  for n, r in zip(names, sizes, strict=True)]
        tables += [EmbeddingBagConfig(name=f"embedding_{n}", embedding_dim=dim, num_embeddings=r, feature_names=[n])
                   for n, r in zip(names, sizes, strict=True)]
        device = torch.device("meta") if self.hparams.meta_device else torch.device("cpu")
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self.dense = nn.Linear(max(self.hparams.dense_in_features or 0, 1), dim)
        self.deep = nn.Sequential(nn.Linear(dim * (len(names) + 1), 16), nn.ReLU(), nn.Linear(16, 1))
        fuse_embedding_optimizer(self.ebc, "rowwise_adagrad", self.hparams.embedding_lr)
        self.built = True

    def forward(self, batch: Batch) -> torch.Tensor:
        names, dim = self.hparams.sparse_feature_names, self.hparams.embedding_dim
        pooled = self.ebc(batch.sparse_features).to_dict()  # a shared feature's keys: <feature>@<table>
        first = torch.cat([pooled[f"{n}@first_order_{n}"] for n in names], dim=1).sum(dim=1)
        dense = batch.dense_features if batch.dense_features.shape[1] else batch.dense_features.new_zeros(
            batch.labels.shape[0], 1)
        fields = torch.stack([pooled[f"{n}@embedding_{n}"] for n in names] + [self.dense(dense)], dim=1)
        fm = 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)
        return first + fm + self.deep(fields.reshape(-1, dim * (len(names) + 1))).squeeze(-1)


class TwoTower(ClickModel):
    """Two towers over TorchRec: the first feature is the query (user), the others the item; a dot product scores."""

    def build(self) -> None:
        names, sizes, dim = (self.hparams.sparse_feature_names, self.hparams.num_embeddings_per_feature,
                             self.hparams.embedding_dim)
        tables = [EmbeddingBagConfig(name=f"t_{n}", embedding_dim=dim, num_embeddings=r, feature_names=[n])
                  for n, r in zip(names, sizes, strict=True)]
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        self.query = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.item = nn.Sequential(nn.Linear(dim * (len(names) - 1), dim), nn.ReLU(), nn.Linear(dim, dim))
        fuse_embedding_optimizer(self.ebc, "rowwise_adagrad", self.hparams.embedding_lr)
        self.built = True

    def forward(self, batch: Batch) -> torch.Tensor:
        names = self.hparams.sparse_feature_names
        pooled = self.ebc(batch.sparse_features).to_dict()
        query = self.query(pooled[names[0]])
        item = self.item(torch.cat([pooled[n] for n in names[1:]], dim=1))
        return (query * item).sum(dim=1)


class PlainBags(ClickModel):
    """One plain ``torch.nn.EmbeddingBag`` per feature in an ``nn.ModuleDict`` keyed by the feature, and an MLP."""

    def build(self) -> None:
        names, sizes, dim = (self.hparams.sparse_feature_names, self.hparams.num_embeddings_per_feature,
                             self.hparams.embedding_dim)
        self.bags = nn.ModuleDict({n: nn.EmbeddingBag(r, dim, mode="sum", include_last_offset=True) for n, r in zip(names, sizes, strict=True)})
        self.top = nn.Sequential(nn.Linear(dim * len(names) + (self.hparams.dense_in_features or 0), 16), nn.ReLU(),
                                 nn.Linear(16, 1))
        self.built = True

    def forward(self, batch: Batch) -> torch.Tensor:
        sparse = batch.sparse_features.to_dict()
        pooled = [bag(sparse[n].values(), sparse[n].offsets()) for n, bag in self.bags.items()]
        return self.top(torch.cat([*pooled, batch.dense_features], dim=1)).squeeze(-1)

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # Under plain Lightning with a plain DataModule nothing of lightning-skew sees the batch: check it here.
        return check_table_ids(self, batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def click_batches(sizes: list[int], num_inputs: int, batch_size: int, seed: int) -> list[Batch]:
    """Skewed click data in memory: IDs drawn as ``size * u**3`` (a few rows take most lookups), two dense
    features, and labels drawn from a logistic model of the rows (so that a model can learn them)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    generator = torch.Generator().manual_seed(seed)
    ids = [(torch.rand(num_inputs, generator=generator) ** 3 * size).long() for size in sizes]
    effects = [torch.randn(size, generator=torch.Generator().manual_seed(100 + i)) for i, size in enumerate(sizes)]
    dense = torch.rand(num_inputs, 2, generator=generator)
    logit = sum(e[i] for e, i in zip(effects, ids, strict=True)) + dense[:, 0] - 0.5
    labels = (torch.rand(num_inputs, generator=generator) < torch.sigmoid(logit)).float()
    batches = []
    for start in range(0, num_inputs, batch_size):
        stop = min(start + batch_size, num_inputs)
        values = torch.cat([i[start:stop] for i in ids])
        sparse = KeyedJaggedTensor(keys=list(FEATURES), values=values,
                                   lengths=torch.ones(len(values), dtype=torch.int32))
        batches.append(Batch(dense_features=dense[start:stop], sparse_features=sparse, labels=labels[start:stop]))
    return batches


class PlainClicks(pl.LightningDataModule):
    """A user's plain LightningDataModule (not a lightning-skew one) yielding torchrec Batches."""

    SIZES = [60, 40, 20]

    def __init__(self, num_train: int = 1024, num_val: int = 256, batch_size: int = 128) -> None:
        super().__init__()
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(click_batches(self.SIZES, self.num_train, self.batch_size, 0),
                                           batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(click_batches(self.SIZES, self.num_val, self.batch_size, 1),
                                           batch_size=None)


class UserClicks(RecDataModule):
    """A user's own RecDataModule: the same clicks, with the feature names and table sizes it declares, so
    that models can size their tables from it and profiles can count it."""

    def __init__(self, num_train: int = 1024, num_val: int = 256, batch_size: int = 128) -> None:
        super().__init__()
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size

    @property
    def dense_in_features(self) -> int:
        return 2

    @property
    def sparse_feature_names(self) -> list[str]:
        return list(FEATURES)

    @property
    def num_embeddings_per_feature(self) -> list[int]:
        return list(PlainClicks.SIZES)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(click_batches(PlainClicks.SIZES, self.num_train, self.batch_size, 0),
                                           batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(click_batches(PlainClicks.SIZES, self.num_val, self.batch_size, 1),
                                           batch_size=None)
