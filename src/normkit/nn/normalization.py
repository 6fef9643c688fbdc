"""LayerNorm, GroupNorm and RMSNorm: torch.nn's modules on normkit's core."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn import Module, init

from .. import functional as F
from ._base import fx_node, register_affine

_shape_t = int | Sequence[int] | torch.Size


def _as_shape(normalized_shape: _shape_t) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(normalized_shape)


class _AffineNorm(Module):
    """Parameter reset shared by the layers whose ``weight`` starts at 1 and ``bias`` at 0."""

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if getattr(self, "bias", None) is not None:
            init.zeros_(self.bias)


class LayerNorm(_AffineNorm, nn.LayerNorm):
    """Layer normalization over the trailing ``normalized_shape``, as ``torch.nn.LayerNorm``."""

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        Module.__init__(self)  # not the torch.nn twin's __init__ (see nn._base)
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        register_affine(
            self, self.normalized_shape, elementwise_affine, elementwise_affine and bias,
            {"device": device, "dtype": dtype},
        )
        self.reset_parameters()

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (bool, True = valid) keeps padding out of each row's statistics."""
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, mask)

    def extra_repr(self) -> str:
        return (
            "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, "
            "bias={use_bias}".format(**self.__dict__, use_bias=self.bias is not None)
        )


class GroupNorm(_AffineNorm, nn.GroupNorm):
    """Group normalization, as ``torch.nn.GroupNorm``; fast and layout-preserving on channels_last."""

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        Module.__init__(self)  # not the torch.nn twin's __init__ (see nn._base)
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        register_affine(self, (num_channels,), affine, affine and bias, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (bool, True = valid) keeps padding out of the group statistics."""
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, mask)

    def extra_repr(self) -> str:
        return (
            "{num_groups}, {num_channels}, eps={eps}, affine={affine}, "
            "bias={use_bias}".format(**self.__dict__, use_bias=self.bias is not None)
        )


class RMSNorm(_AffineNorm, nn.RMSNorm):
    """Root-mean-square normalization, as ``torch.nn.RMSNorm`` (``eps=None``: the compute dtype's eps)."""

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(
        self,
        normalized_shape: _shape_t,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        Module.__init__(self)  # not the torch.nn twin's __init__ (see nn._base)
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        register_affine(self, self.normalized_shape, elementwise_affine, None, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (bool, True = valid) keeps padding out of each row's statistics."""
        if isinstance(x, Proxy):
            return fx_node(self, x, mask)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, mask)

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(**self.__dict__)
