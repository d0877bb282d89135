"""Recommendation models as LightningModules."""

from lightning_skew.models.dlrm import DLRMModule

__all__ = ["DLRMModule"]
