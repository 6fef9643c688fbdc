"""BatchRenorm1d/2d/3d (Ioffe, "Batch Renormalization", NeurIPS 2017).

Con answered: BatchNorm fails at small batches, because training normalizes with noisy batch
statistics while inference uses the running ones. Batch renormalization corrects the batch-normalized
value towards the running statistics, ``x̂ = (x − μ_B)/σ_B · r + d`` with
``r = clip(σ_B/σ, 1/rmax, rmax)`` and ``d = clip((μ_B − μ)/σ, −dmax, dmax)`` held constant in the
backward pass, so training and inference compute the same function once the clips are loose.

On the core it is BatchNorm with a per-step affine: ``γ·(x̂_B·r + d) + β`` is BatchNorm with weight
``γ·r`` and bias ``β + γ·d``. Parameters, buffers and state_dict are those of BatchNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Proxy

from ... import functional as F
from ...functional import _layout as L
from ...functional.masked import bias_where_masked_out, expand_mask, moments, view_mask
from .._base import fx_node
from ..batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from ._checks import check_count


class _BatchRenorm(_BatchNorm):
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
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5000,
        ramp_steps: int = 20000,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        if not (rmax >= 1.0 and dmax >= 0.0):  # NaN fails both
            raise ValueError(f"BatchRenorm needs rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps = check_count(warmup_steps, "warmup_steps", allow_zero=True)
        self.ramp_steps = check_count(ramp_steps, "ramp_steps", allow_zero=True)

    def limits(self, step: int) -> tuple[float, float]:
        """(rmax, dmax) at training step ``step`` (the steps done before it): (1, 0) for the first
        ``warmup_steps`` steps, then a linear ramp to the final values over ``ramp_steps``."""
        if step < self.warmup_steps:
            return 1.0, 0.0
        t = 1.0 if self.ramp_steps <= 0 else min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        return 1.0 + t * (self.rmax - 1.0), t * self.dmax

    def _correction(self, input: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """r and d for this batch (no gradient; valid positions only with ``mask``), or None when they are the identity."""
        rmax, dmax = self.limits(int(self.num_batches_tracked))
        if rmax == 1.0 and dmax == 0.0:
            return None
        with torch.no_grad():
            xc, perm = L.dense(input)
            shape = L.per_channel_view(input, perm is not None)
            mask5 = None if mask is None else view_mask(mask, input, perm, shape, True)
            mean, var, _ = moments(xc.view(shape), mask5)
            mean, var = mean.view(-1), var.view(-1)
            running_std = torch.sqrt(self.running_var.to(var.dtype) + self.eps)
            r = (torch.sqrt(var + self.eps) / running_std).clamp(1.0 / rmax, rmax)
            d = ((mean - self.running_mean.to(mean.dtype)) / running_std).clamp(-dmax, dmax)
        return r, d

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Train with r/d corrections after warm-up; evaluate as BatchNorm with the running statistics."""
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        if not (self.training and self.track_running_stats):
            return super().forward(input, mask)
        self._check_input_dim(input)
        correction = self._correction(input, mask)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        weight, bias = self.weight, self.bias
        if correction is not None:
            r, d = correction
            w = torch.ones_like(r) if weight is None else weight
            weight = w * r.to(w.dtype)
            bias = w * d.to(w.dtype) + (0.0 if bias is None else bias)
        y = F.batch_norm(input, self.running_mean, self.running_var, weight, bias, True, factor, self.eps, mask)
        if correction is None or mask is None:
            return y
        # masked-out positions output the bias, as BatchNorm's: not the bias with d folded in
        return bias_where_masked_out(y, expand_mask(mask, input, True), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, "
            f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}"
        )


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    """Batch renormalization over a 2D or 3D input; arguments of ``BatchNorm1d`` plus the r/d schedule."""


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    """Batch renormalization over a 4D input; arguments of ``BatchNorm2d`` plus the r/d schedule."""


class BatchRenorm3d(_BatchRenorm, BatchNorm3d):
    """Batch renormalization over a 5D input; arguments of ``BatchNorm3d`` plus the r/d schedule."""


__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]
