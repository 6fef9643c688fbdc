"""LayerNorm2d: LayerNorm over the channels of a channels-first tensor (ConvNeXt, timm, SAM).

Instead of permuting to channels-last and back (two copies for NCHW input), the core sees a 5-D view
in which each statistics group is one pixel's channels: ``(N, 1, C, S, 1)`` for NCHW (the channel
parameters broadcast over pixels) and ``(N·S, 1, C, 1, 1)`` for channels_last, which is plain
LayerNorm over the last dimension. Both layouts are served without a copy and keep their format.
"""

from __future__ import annotations

from torch import Tensor
from torch.fx import Proxy

from ..functional import _layout as L
from ..functional._core import normalize_batch
from ..functional.norms import check_floating
from ._base import fx_node
from .normalization import LayerNorm


def _channel_param(p: Tensor | None, shape: list[int]) -> Tensor | None:
    """View a (C,) parameter as (P, K1=C, B, K2=1) for either LayerNorm2d view."""
    if p is None:
        return None
    _, _, c, b, _ = shape
    return p.view(1, c, 1, 1).expand(1, c, b, 1)


class LayerNorm2d(LayerNorm):
    """LayerNorm over dim 1 of an (N, C, *) input; parameters and state_dict as ``LayerNorm(num_channels)``."""

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_channels, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):
            return fx_node(self, input)
        c = self.normalized_shape[0]
        if input.dim() < 2 or input.shape[1] != c:
            raise RuntimeError(
                f"Given normalized_shape=[{c}] over channels, expected input with shape [N, {c}, *], "
                f"but got input of size{list(input.shape)}"
            )
        check_floating(input, "LayerNormKernelImpl")
        if input.numel() == 0:
            return input.clone()
        xc, perm = L.dense(input)
        n, s = input.shape[0], L.spatial(input)
        shape = [n * s, 1, c, 1, 1] if perm is not None else [n, 1, c, s, 1]
        y, _ = normalize_batch(xc, shape, _channel_param(self.weight, shape), _channel_param(self.bias, shape), self.eps)
        return L.restore(y, perm)


__all__ = ["LayerNorm2d"]
