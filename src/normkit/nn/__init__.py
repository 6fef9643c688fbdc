"""Drop-in replacements for torch.nn's normalization layers (same arguments, buffers, state_dict, errors)."""

from ..distributed import SyncBatchNorm
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm2d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layernorm2d import LayerNorm2d
from .normalization import GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "SyncBatchNorm",
]


def __getattr__(name: str):
    """Everything else comes from torch.nn, so ``import normkit.nn as nn`` works for whole models."""
    import torch.nn

    return getattr(torch.nn, name)
