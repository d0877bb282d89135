"""DLRM (and its DCN variant) from TorchRec as a LightningModule, sized from the DataModule."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRM_DCN

from lightning_skew.core.decisions import (
    deduped_lookups,
    frozen_lookups,
    input_weights,
    serving_deduped,
    serving_frozen,
)
from lightning_skew.core.id_ranges import check_table_ids
from lightning_skew.core.lightning_private import attached_trainer
from lightning_skew.core.tables import check_tables_fit_memory
from lightning_skew.models.decisions import lookups_to_pool, serve_deduped, serve_frozen, weighted_bce
from lightning_skew.models.interaction import DotInteraction
from lightning_skew.models.sparse_dlrm import SparseDLRM
from lightning_skew.torchrec.optim import dense_parameters, fuse_embedding_optimizer

__all__ = ["DLRMModule"]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def _default_dense_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class DLRMModule(pl.LightningModule):
    """Trains TorchRec's DLRM (``interaction="dot"``) or DLRM-DCN (``interaction="dcn"``) on click logs.

    One embedding table per sparse feature (``t_<feature>``), sized by ``num_embeddings_per_feature``. The
    recipes link ``dense_in_features``, ``sparse_feature_names`` and ``num_embeddings_per_feature`` from the
    DataModule, so table sizes are written once, in the data's configuration.

    With ``dense_in_features=0`` (data whose every feature is categorical, e.g. MovieLens) there is no dense arch:
    the embeddings interact alone and feed the top MLP (:class:`~lightning_skew.models.sparse_dlrm.SparseDLRM`);
    ``dense_arch_layer_sizes`` is then unused.

    Args:
        num_embeddings_per_feature: rows of each feature's table.
        sparse_feature_names: KeyedJaggedTensor keys, one per table (default ``cat_0``, ``cat_1``, ...).
        dense_in_features: number of dense features; ``0`` for data without any.
        embedding_dim: width of every embedding row.
        dense_arch_layer_sizes: bottom MLP; its last size must equal ``embedding_dim``.
        over_arch_layer_sizes: top MLP; its last size must be 1 (the click logit).
        interaction: ``"dot"`` (DLRM pairwise dot products) or ``"dcn"`` (low-rank cross network).
        dcn_num_layers: cross layers for ``interaction="dcn"``.
        dcn_low_rank_dim: rank of each cross layer for ``interaction="dcn"``.
        embedding_optimizer: ``sgd``, ``adagrad``, ``rowwise_adagrad`` or ``adam``; fused into TorchRec's
            embedding kernels when sharded by :class:`~lightning_skew.TorchRecStrategy`.
        embedding_lr: learning rate of the embedding optimizer; dense LR schedules scale it too.
        optimizer: builds the dense optimizer from the dense parameters (default Adam, lr 1e-3).
        lr_scheduler: builds an LR scheduler (stepped every optimizer step) from the dense optimizer.

    It honours the decisions a :class:`~lightning_skew.core.decisions.SkewBatch` carries (``honoured_batch_decisions``):
    per-input loss ``weights`` (the training loss is their weighted mean), ``frozen_sparse`` lookups, whose
    pooled embeddings are added without gradient (so those rows and their optimizer state stay as they are), and
    ``deduped`` lookups (:class:`~lightning_skew.dedup.DedupDataModule`): each distinct bag pooled once and
    expanded to the inputs it serves.

    Example::

        data = SyntheticDataModule(max_rows_per_table=10_000)
        model = DLRMModule(data.num_embeddings_per_feature, data.sparse_feature_names, data.dense_in_features)
        pl.Trainer(strategy=TorchRecStrategy(), max_epochs=1).fit(model, data)
    """

    honoured_batch_decisions = frozenset({"weights", "frozen_sparse", "deduped"})

    def __init__(
        self,
        num_embeddings_per_feature: list[int],
        sparse_feature_names: list[str] | None = None,
        dense_in_features: int = 13,
        embedding_dim: int = 16,
        dense_arch_layer_sizes: list[int] | None = None,
        over_arch_layer_sizes: list[int] | None = None,
        interaction: str = "dot",
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 16,
        embedding_optimizer: str = "rowwise_adagrad",
        embedding_lr: float = 0.05,
        optimizer: OptimizerFactory = _default_dense_optimizer,
        lr_scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        dense_arch_layer_sizes = dense_arch_layer_sizes or [64, embedding_dim]
        over_arch_layer_sizes = over_arch_layer_sizes or [64, 32, 1]
        names = sparse_feature_names or [f"cat_{i}" for i in range(len(num_embeddings_per_feature))]
        _validate(num_embeddings_per_feature, names, dense_in_features, embedding_dim,
                  dense_arch_layer_sizes, over_arch_layer_sizes, interaction)
        tables = [
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=embedding_dim, num_embeddings=rows,
                               feature_names=[name])
            for name, rows in zip(names, num_embeddings_per_feature, strict=True)
        ]
        check_tables_fit_memory([(t.name, t.num_embeddings, t.embedding_dim) for t in tables])
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        common = dict(embedding_bag_collection=ebc, dense_in_features=dense_in_features,
                      dense_arch_layer_sizes=dense_arch_layer_sizes, over_arch_layer_sizes=over_arch_layer_sizes)
        if dense_in_features == 0:
            self.model = SparseDLRM(ebc, over_arch_layer_sizes, interaction, dcn_num_layers, dcn_low_rank_dim)
        elif interaction == "dot":
            self.model = DLRM(**common)
            self.model.inter_arch = DotInteraction(len(self.model.sparse_arch.sparse_feature_names))
        else:
            self.model = DLRM_DCN(**common, dcn_num_layers=dcn_num_layers, dcn_low_rank_dim=dcn_low_rank_dim)
        serve_frozen(self.model.sparse_arch)
        serve_deduped(self.model.sparse_arch)
        fuse_embedding_optimizer(self.model, embedding_optimizer, embedding_lr)
        self.dense_optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_auc, self.test_auc = BinaryAUROC(), BinaryAUROC()
        self.val_logloss, self.test_logloss = MeanMetric(), MeanMetric()

    def forward(self, batch: Batch) -> torch.Tensor:
        """Click logits, shape ``[B]`` (the batch's frozen lookups, if any, pooled in without gradient; its
        deduplicated lookups, if any, pooled once per distinct bag and expanded)."""
        deduped = deduped_lookups(batch)
        with serving_frozen(frozen_lookups(batch)), serving_deduped(deduped):
            return self.model(batch.dense_features, lookups_to_pool(batch.sparse_features, deduped)).squeeze(-1)

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        """Refuse IDs outside the tables (on the host, before the copy; any DataModule, any strategy)."""
        return super().transfer_batch_to_device(check_table_ids(self, batch), device, dataloader_idx)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = weighted_bce(self(batch), batch.labels.float(), input_weights(batch))
        # self.log costs about 3% of a CPU step here; log as often as the Trainer writes logs.
        trainer = attached_trainer(self)
        if trainer is None or self.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self.log("train_loss", loss, prog_bar=True, batch_size=batch.labels.numel())
        return loss

    def _evaluate(self, batch: Batch, auc: BinaryAUROC, logloss: MeanMetric, stage: str) -> None:
        logits = self(batch)
        labels = batch.labels.float()
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        auc.update(torch.sigmoid(logits), labels.long())
        logloss.update(losses)
        self.log(f"{stage}_auc", auc, prog_bar=True, on_epoch=True, on_step=False)
        self.log(f"{stage}_logloss", logloss, prog_bar=True, on_epoch=True, on_step=False)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_auc, self.val_logloss, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_auc, self.test_logloss, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch))

    def configure_optimizers(self):
        optimizer = self.dense_optimizer_factory(dense_parameters(self))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _validate(rows: list[int], names: list[str], dense_in_features: int, embedding_dim: int,
              dense_sizes: list[int], over_sizes: list[int], interaction: str) -> None:
    if not rows:
        raise ValueError("num_embeddings_per_feature is empty: a DLRM needs at least one embedding table")
    if len(names) != len(rows):
        raise ValueError(f"sparse_feature_names has {len(names)} names but num_embeddings_per_feature has "
                         f"{len(rows)} tables; give one name per table")
    bad = [(n, r) for n, r in zip(names, rows, strict=True) if r < 1]
    if bad:
        raise ValueError(f"every table needs at least one row; got {bad}")
    if dense_in_features < 0 or embedding_dim < 1:
        raise ValueError(f"dense_in_features must be at least 0 and embedding_dim positive, got {dense_in_features}, "
                         f"{embedding_dim}")
    if dense_in_features > 0 and dense_sizes[-1] != embedding_dim:
        raise ValueError(f"the last dense_arch_layer_sizes entry ({dense_sizes[-1]}) must equal embedding_dim "
                         f"({embedding_dim}): DLRM projects dense features into the embedding space")
    if over_sizes[-1] != 1:
        raise ValueError(f"the last over_arch_layer_sizes entry must be 1 (the click logit), got {over_sizes[-1]}")
    if interaction not in ("dot", "dcn"):
        raise ValueError(f"interaction must be 'dot' or 'dcn', got {interaction!r}")
