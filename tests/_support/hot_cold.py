"""A small three-table collection's inputs and a plain hot/cold copy of it, shared by the hot/cold and tier tests."""

from __future__ import annotations

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_skew.hotcold.collection import table_specs
from lightning_skew.hotcold.placement import plan_placement
from lightning_skew.hotcold.plain import PlainHotColdEmbeddingBagCollection
from lightning_skew.torchrec.optim import fuse_embedding_optimizer


def hot_cold_batch(weighted: bool = False, batch_size: int = 6, one_hot: bool = False) -> KeyedJaggedTensor:
    """Bags of 0-3 IDs with a feature the collection does not know, or (``one_hot``) one ID per bag of the
    collection's features only, as in Criteo."""
    generator = torch.Generator().manual_seed(1)
    keys, sizes = ["fa", "extra", "fb", "fc", "fa2"], [100, 1000, 3, 50, 100]
    if one_hot:
        keys, sizes = ["fa", "fb", "fc", "fa2"], [100, 3, 50, 100]
    lengths = torch.randint(0, 4, (len(keys) * batch_size,), generator=generator)
    if one_hot:
        lengths = torch.ones_like(lengths)
    per_key = lengths.view(len(keys), batch_size).sum(1)
    values = torch.cat([torch.randint(0, s, (int(n),), generator=generator) for s, n in zip(sizes, per_key, strict=True)])
    weights = torch.rand(values.numel(), generator=generator) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def hot_cold_pair(weighted: bool = False, optimizer: str = "rowwise_adagrad"
          ) -> tuple[EmbeddingBagCollection, PlainHotColdEmbeddingBagCollection]:
    """An original collection and a plain hot/cold copy of an identical one, both with ``optimizer`` fused."""
    collections = []
    for _ in range(2):
        torch.manual_seed(0)
        tables = [EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=100, feature_names=["fa", "fa2"]),
                  EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=3, feature_names=["fb"]),
                  EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=50, feature_names=["fc"])]
        ebc = EmbeddingBagCollection(tables, is_weighted=weighted)
        fuse_embedding_optimizer(ebc, optimizer, lr=0.1)
        collections.append(ebc)
    plan = plan_placement(table_specs(collections[1]), [torch.tensor([1, 5, 7]), torch.tensor([0]),
                                                        torch.zeros(0, dtype=torch.int64)],
                          budget_bytes=130, bytes_per_row=[20, 20, 36])
    return collections[0], PlainHotColdEmbeddingBagCollection(collections[1], plan)
