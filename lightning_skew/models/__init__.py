"""Recommendation models as LightningModules."""

from lightning_skew.models.dlrm import DLRMModule
from lightning_skew.models.sparse_dlrm import SparseDLRM

__all__ = ["DLRMModule", "SparseDLRM"]
