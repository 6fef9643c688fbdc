"""Drop-in replacements for torch.nn's normalization layers (same arguments, buffers, state_dict, errors)."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .normalization import GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
]


def __getattr__(name: str):
    """Everything else comes from torch.nn, so ``import normkit.nn as nn`` works for whole models."""
    import torch.nn

    return getattr(torch.nn, name)
