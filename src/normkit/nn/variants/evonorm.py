"""EvoNormS0 and EvoNormB0 (Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers",
NeurIPS 2020): normalization and activation as one layer, found by search.

Con answered: BatchNorm + ReLU depends on the batch (small batches hurt) and costs separate passes;
GroupNorm + ReLU is batch-independent but trails BatchNorm at large batches.

- ``EvoNormS0`` (batch-independent): ``y = x·σ(v·x) / group_std(x) · γ + β``, group_std over
  (C/G, H, W) per sample as in GroupNorm. On the core: group statistics from torch ops, applied by
  ``normalize_with`` with mean 0 to the numerator ``x·σ(v·x)``.
- ``EvoNormB0`` (batch-dependent): ``y = x / max(sqrt(s²_B + ε), v·x + instance_std(x)) · γ + β``,
  with s²_B the batch variance (a running average in evaluation). The per-element denominator is
  torch ops; the affine goes through the core's ``normalize_fixed``.

Parameter and buffer names (``weight``, ``bias``, ``v``, ``running_var``) follow timm's EvoNorm2dS0/B0.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.fx import Proxy
from torch.nn import Module, Parameter, init

from ...functional import _layout as L
from ...functional._core import normalize_fixed
from ...functional.masked import moments, normalize_with
from ...functional.norms import _bessel, _verify_batch_size, check_floating
from ...kernels.contract import blend_running, stats_dtype
from .._base import check_dims, fx_node
from ._checks import check_count
from .groups import auto_groups


def _check_channels(input: Tensor, num_features: int) -> None:
    check_dims(input, (4,))
    if input.shape[1] != num_features:
        raise RuntimeError(f"weight should contain {input.shape[1]} elements not {num_features}")


class _EvoNorm(Module):
    def __init__(self, num_features: int, eps: float, device, dtype) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.weight = Parameter(torch.empty(num_features, **kw))
        self.bias = Parameter(torch.empty(num_features, **kw))
        self.v = Parameter(torch.empty(num_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.ones_(self.weight)
        init.zeros_(self.bias)
        init.ones_(self.v)

    def _affine(self, ratio: Tensor) -> Tensor:
        """``ratio · γ + β`` on the core (mean 0, rstd 1), keeping the memory format."""
        xc, perm = L.dense(ratio)
        shape = L.per_channel_view(ratio, perm is not None)
        zero = torch.zeros(1, 1, self.num_features, dtype=stats_dtype(ratio.dtype), device=ratio.device)
        y = normalize_fixed(
            xc, shape, zero, torch.ones_like(zero), self.weight, self.bias,
            param_shape=L.param_shape(shape, False, False),
        )
        return L.restore(y, perm)


class EvoNormS0(_EvoNorm):
    """Batch-independent EvoNorm over a 4D input; ``num_groups=None`` picks ``auto_groups(num_features)``."""

    def __init__(
        self, num_features: int, num_groups: int | None = None, eps: float = 1e-5, device=None, dtype=None
    ) -> None:
        groups = auto_groups(num_features) if num_groups is None else check_count(num_groups, "num_groups")
        if num_features % groups:
            raise ValueError(f"num_channels ({num_features}) must be divisible by num_groups ({groups})")
        self.num_groups = groups
        super().__init__(num_features, eps, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):
            return fx_node(self, input)
        _check_channels(input, self.num_features)
        check_floating(input, "GroupNormKernelImpl")
        v = self.v.to(input.dtype).view(1, -1, 1, 1)  # the input's dtype out, as GroupNorm's
        numerator = input * torch.sigmoid(v * input)
        xc, perm = L.dense(input)
        cl = perm is not None
        shape = L.per_group_view(input, self.num_groups, cl)
        _, var, _ = moments(xc.view(shape))
        nc, _ = L.dense(numerator)
        y = normalize_with(
            nc, shape, torch.zeros_like(var), torch.rsqrt(var + self.eps), self.weight, self.bias,
            param_shape=L.param_shape(shape, not cl, cl),
        )
        return L.restore(y, perm)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"


class EvoNormB0(_EvoNorm):
    """Batch-dependent EvoNorm over a 4D input; ``running_var`` tracks the batch variance (unbiased)."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None
    ) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise TypeError(f"EvoNormB0 needs a float momentum (it keeps no batch count to average by), got {momentum!r}")
        super().__init__(num_features, eps, device, dtype)
        self.momentum = momentum
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1)

    def _batch_var(self, xc: Tensor, input: Tensor, cl: bool) -> Tensor:
        if not self.training:
            return self.running_var
        _verify_batch_size(input.size())
        _, var, _ = moments(xc.view(L.per_channel_view(input, cl)))
        var = var.view(-1)
        if input.numel():  # an empty batch leaves it, as BatchNorm's
            blend_running(self.running_var, var.detach(), self.momentum, _bessel(input.numel() // self.num_features))
        return var

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):
            return fx_node(self, input)
        _check_channels(input, self.num_features)
        check_floating(input, "batch_norm")
        xc, perm = L.dense(input)
        cl = perm is not None
        n, c = input.shape[0], input.shape[1]
        batch_var = self._batch_var(xc, input, cl)
        _, inst_var, _ = moments(xc.view(L.per_instance_view(input, cl)))
        inst_std = torch.sqrt(inst_var.view(n, c, 1, 1) + self.eps)
        batch_std = torch.sqrt(batch_var.view(1, c, 1, 1) + self.eps)
        den = torch.maximum(batch_std, self.v.view(1, c, 1, 1) * input + inst_std)
        return self._affine((input / den).to(input.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


__all__ = ["EvoNormB0", "EvoNormS0"]
