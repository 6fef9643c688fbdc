"""SwitchableNorm1d/2d/3d (Luo, Ren, Peng, Zhang & Li, "Differentiable Learning-to-Normalize via Switchable
Normalization", ICLR 2019).

Con answered: every norm is right for some layers and batch sizes and wrong for others, and
GroupNorm asks for a group count. Switchable normalization learns, per layer, a softmax mix of the
InstanceNorm, LayerNorm and BatchNorm statistics: ``μ = Σ_k softmax(mean_weight)_k μ_k`` and
``σ² = Σ_k softmax(var_weight)_k σ²_k``.

Statistics source only: the instance moments come from one pass of torch ops, LayerNorm's and
BatchNorm's are pooled from them (law of total variance, no E[x²] − E[x]²), and the core applies the
mix through ``normalize_with``. The BatchNorm branch keeps running statistics as BatchNorm2d does
and uses them in evaluation. The 1d/2d/3d classes differ only in the input rank they accept.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Proxy
from torch.nn import Parameter

from ...functional import _layout as L
from ...functional.masked import moments, normalize_with
from ...functional.norms import _bessel, _verify_batch_size, check_floating
from ...kernels.contract import blend_running
from .._base import NormBase, check_dims, fx_node


def _pool(mean: Tensor, var: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the union of equally sized groups from their moments."""
    pooled = mean.mean(dim, keepdim=True)
    return pooled, (var + (mean - pooled).square()).mean(dim, keepdim=True)


class _SwitchableNorm(NormBase):
    """Learned mix of IN/LN/BN statistics over an (N, C, *spatial) input; arguments of ``BatchNorm2d``.

    Extra parameters ``mean_weight`` and ``var_weight`` (3 logits each, order IN, LN, BN) start at
    equal weights.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.mean_weight = Parameter(torch.ones(3, device=device, dtype=dtype))
        self.var_weight = Parameter(torch.ones(3, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "mean_weight"):
            torch.nn.init.ones_(self.mean_weight)
            torch.nn.init.ones_(self.var_weight)

    _dims: tuple[int, ...] = ()

    def _check_input_dim(self, input: Tensor) -> None:
        check_dims(input, self._dims)

    def _batch_stats(self, mean_in: Tensor, var_in: Tensor, count: int) -> tuple[Tensor, Tensor]:
        if self.training or self.running_mean is None:
            mean_bn, var_bn = _pool(mean_in, var_in, 0)
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                if count:  # an empty batch leaves them, as BatchNorm's
                    blend_running(self.running_mean, mean_bn.detach().view(-1), factor)
                    blend_running(self.running_var, var_bn.detach().view(-1), factor, _bessel(count))
            return mean_bn, var_bn
        return self.running_mean.to(mean_in.dtype).view(1, -1), self.running_var.to(var_in.dtype).view(1, -1)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):
            return fx_node(self, input)
        self._check_input_dim(input)
        if self.training:
            _verify_batch_size(input.size())
        n, c = input.shape[0], input.shape[1]
        if c != self.num_features:
            raise RuntimeError(f"running_mean should contain {c} elements not {self.num_features}")
        check_floating(input, "batch_norm")
        xc, perm = L.dense(input)
        shape = L.per_instance_view(input, perm is not None)
        mean_in, var_in, _ = moments(xc.view(shape))
        mean_in, var_in = mean_in.view(n, c), var_in.view(n, c)
        mean_ln, var_ln = _pool(mean_in, var_in, 1)
        mean_bn, var_bn = self._batch_stats(mean_in, var_in, n * L.spatial(input))
        wm = torch.softmax(self.mean_weight, 0).to(mean_in.dtype)
        wv = torch.softmax(self.var_weight, 0).to(var_in.dtype)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        stat = (n, c, 1) if perm is None else (n, 1, c)
        y = normalize_with(
            xc, shape, mean.reshape(stat), torch.rsqrt(var + self.eps).reshape(stat), self.weight, self.bias,
            param_shape=L.param_shape(shape, False, False),
        )
        return L.restore(y, perm)


class SwitchableNorm1d(_SwitchableNorm):
    """SwitchableNorm over a 3D (N, C, L) input."""

    _dims = (3,)


class SwitchableNorm2d(_SwitchableNorm):
    """SwitchableNorm over a 4D (N, C, H, W) input."""

    _dims = (4,)


class SwitchableNorm3d(_SwitchableNorm):
    """SwitchableNorm over a 5D (N, C, D, H, W) input."""

    _dims = (5,)


__all__ = ["SwitchableNorm1d", "SwitchableNorm2d", "SwitchableNorm3d"]
