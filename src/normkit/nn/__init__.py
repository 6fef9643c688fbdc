"""Drop-in replacements for torch.nn's normalization layers (same arguments, buffers, state_dict, errors)."""

from ..distributed import SyncBatchNorm, SyncBatchNormAct2d
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm2d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layernorm2d import LayerNorm2d
from .normalization import GroupNorm, LayerNorm, RMSNorm
from .variants import (
    AdaptiveInstanceNorm,
    BatchNormAct2d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    EvoNormB0,
    EvoNormS0,
    GhostBatchNorm,
    GroupNormAct,
    SwitchableNorm1d,
    SwitchableNorm2d,
    SwitchableNorm3d,
    WSConv2d,
)

__all__ = [
    "AdaptiveInstanceNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "EvoNormB0",
    "EvoNormS0",
    "FrozenBatchNorm2d",
    "GhostBatchNorm",
    "GroupNorm",
    "GroupNormAct",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "SwitchableNorm3d",
    "SyncBatchNorm",
    "SyncBatchNormAct2d",
    "WSConv2d",
]


def __getattr__(name: str):
    """Everything else comes from torch.nn, so ``import normkit.nn as nn`` works for whole models."""
    import torch.nn

    try:
        return getattr(torch.nn, name)
    except AttributeError:
        from . import variants

        where = " (it is in normkit.nn.variants)" if hasattr(variants, name) else ""
        raise AttributeError(f"module 'normkit.nn' has no attribute {name!r}, nor has torch.nn{where}") from None
