"""AdaptiveInstanceNorm / AdaIN (Huang & Belongie, "Arbitrary Style Transfer in Real-time with
Adaptive Instance Normalization", ICCV 2017).

Con answered: InstanceNorm throws away each image's channel statistics — which is what carries
style. AdaIN puts another image's back: ``AdaIN(x, s) = σ(s) · (x − μ(x)) / σ(x) + μ(s)``, with
μ, σ = sqrt(var + ε) per (sample, channel) over space.

Statistics source only: both inputs' instance moments come from torch ops, and the core applies
them in one pass as ``(x − μ')·r'`` with ``r' = σ(s)/σ(x)``, ``μ' = μ(x) − μ(s)/r'``. With ``eps = 0`` a
constant style channel has ``r' = 0``, where μ(s) cannot fold into μ': that case is computed as written,
in torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Proxy
from torch.nn import Module

from ...functional import _layout as L
from ...functional.masked import moments, normalize_with
from ...functional.norms import check_floating
from .._base import fx_node


def instance_moments(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and sqrt(var + eps) over space, shape (N, C); differentiable."""
    xc, perm = L.dense(x)
    n, c = x.shape[0], x.shape[1]
    mean, var, _ = moments(xc.view(L.per_instance_view(x, perm is not None)))
    return mean.view(n, c), torch.sqrt(var.view(n, c) + eps)


class AdaptiveInstanceNorm(Module):
    """AdaIN of (N, C, *) content features with the statistics of (N or 1, C, *) style features.

    ``forward(content, style)``; the style's spatial size may differ. No parameters.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        if isinstance(content, Proxy) or isinstance(style, Proxy):
            return fx_node(self, content, style)
        if content.dim() < 3 or style.dim() < 3:
            raise ValueError(f"expected (N, C, *) inputs with spatial dims, got {content.dim()}D and {style.dim()}D")
        check_floating(content, "batch_norm")
        check_floating(style, "batch_norm")
        n, c = content.shape[0], content.shape[1]
        if style.shape[1] != c or style.shape[0] not in (1, n):
            raise ValueError(
                f"style of shape {list(style.shape)} does not match content of shape {list(content.shape)}"
            )
        mean_x, std_x = instance_moments(content, self.eps)
        mean_s, std_s = (t.expand(n, c) for t in instance_moments(style, self.eps))
        rstd = std_s / std_x
        if self.eps == 0.0:
            per = (n, c, *(1,) * (content.dim() - 2))
            return ((content - mean_x.view(per)) * rstd.reshape(per) + mean_s.reshape(per)).to(content.dtype)
        mean = mean_x - mean_s / rstd
        xc, perm = L.dense(content)
        shape = L.per_instance_view(content, perm is not None)
        stat = (n, c, 1) if perm is None else (n, 1, c)
        return L.restore(normalize_with(xc, shape, mean.reshape(stat), rstd.reshape(stat), None, None), perm)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


__all__ = ["AdaptiveInstanceNorm", "instance_moments"]
