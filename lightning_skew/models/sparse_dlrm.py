"""DLRM for data without dense features: TorchRec's sparse arch, an interaction of the embeddings alone, the top MLP."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import OverArch, SparseArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.models.interaction import pairwise_dots, upper_triangle_index

__all__ = ["SparseDLRM"]


class SparseDLRM(nn.Module):
    """DLRM without a dense arch, for data whose every feature is categorical (MovieLens: user, item, genres).

    TorchRec's :class:`~torchrec.models.dlrm.DLRM` projects the dense features into the embedding space and lets
    that vector interact with the embeddings; with no dense feature there is nothing to project. Here the ``F``
    pooled embeddings (``[B, F, D]``) interact alone:

    * ``interaction="dot"``: the ``F (F - 1) / 2`` pairwise dot products (DLRM's interaction; with a user and an
      item this is matrix factorization's score) next to the embeddings themselves (the first-order terms that
      the dense vector carries in DLRM), ``F D + F (F - 1) / 2`` inputs to the top MLP;
    * ``interaction="dcn"``: TorchRec's low-rank cross network over the ``F D`` concatenated embeddings
      (DLRM-DCN's interaction), ``F D`` inputs to the top MLP.

    The modules keep TorchRec's names (``sparse_arch.embedding_bag_collection``, ``over_arch``), so the tables
    shard, checkpoint and export as DLRM's do. ``forward`` takes ``dense_features`` (``[B, 0]``) and ignores it.

    Args:
        embedding_bag_collection: The tables, all of one embedding dimension.
        over_arch_layer_sizes: The top MLP; its last size is the logit's (1).
        interaction: ``"dot"`` or ``"dcn"``.
        dcn_num_layers: Cross layers for ``"dcn"``.
        dcn_low_rank_dim: Rank of each cross layer for ``"dcn"``.

    Example::

        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_user", embedding_dim=8,
                                                                num_embeddings=100, feature_names=["user"])])
        model = SparseDLRM(ebc, over_arch_layer_sizes=[16, 1])
        logits = model(torch.zeros(4, 0), kjt)  # [4, 1]
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, over_arch_layer_sizes: list[int],
                 interaction: str = "dot", dcn_num_layers: int = 3, dcn_low_rank_dim: int = 16) -> None:
        super().__init__()
        configs = embedding_bag_collection.embedding_bag_configs()
        dims = {config.embedding_dim for config in configs}
        if len(dims) != 1:
            raise ValueError(f"every table needs one embedding dimension, got {sorted(dims)}")
        if interaction not in ("dot", "dcn"):
            raise ValueError(f"interaction must be 'dot' or 'dcn', got {interaction!r}")
        self.sparse_arch = SparseArch(embedding_bag_collection)
        num_features = sum(len(config.feature_names) for config in configs)
        dim = dims.pop()
        self.interaction = interaction
        if interaction == "dot":
            self.register_buffer("flat_triu_index", upper_triangle_index(num_features), persistent=False)
            over_in = num_features * dim + num_features * (num_features - 1) // 2
        else:
            self.crossnet = LowRankCrossNet(in_features=num_features * dim, num_layers=dcn_num_layers,
                                            low_rank=dcn_low_rank_dim)
            over_in = num_features * dim
        self.over_arch = OverArch(in_features=over_in, layer_sizes=over_arch_layer_sizes)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Click logits, ``[B, 1]``."""
        embedded = self.sparse_arch(sparse_features)  # [B, F, D]
        flat = embedded.flatten(1)
        if self.interaction == "dcn":
            return self.over_arch(self.crossnet(flat))
        dots = pairwise_dots(embedded, self.flat_triu_index)
        return self.over_arch(torch.cat((flat, dots), dim=1))
