"""The activation epilogue of the core in torch ops: forward and derivative.

A backend that fuses an activation applies it inside its kernels; for every other backend the core
composes these around the kernels. Either way only the norm's input is kept for backward and the
activation input is recomputed there, so a norm + activation pair stores one tensor, not two.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as TF

from ..kernels.contract import check_activation as check


def apply(activation: str | None, z: Tensor, inplace: bool = False) -> Tensor:
    """``activation(z)`` with torch's own functions (GELU exact, not tanh)."""
    check(activation)
    if activation is None:
        return z
    if activation == "relu":
        return TF.relu(z, inplace=inplace)
    if activation == "silu":
        return TF.silu(z, inplace=inplace)
    return TF.gelu(z)


def backward(activation: str, z: Tensor, dy: Tensor) -> Tensor:
    """``dy * activation'(z)`` with torch's own backward kernels (float32 inside for low precision)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(dy, z, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(dy, z)
    return torch.ops.aten.gelu_backward(dy, z)
