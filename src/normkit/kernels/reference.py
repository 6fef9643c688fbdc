"""Reference backend: plain torch ops, differentiable, the oracle every fast backend is tested against.

Shifted two-pass statistics: each group is shifted by its first element (constant groups become
exactly zero and normalize to exactly ``b``), the variance is the norm of ``x - mean``; a group whose
variance overflows float32 is recomputed in float64. ``x - mean`` is computed once and reused for the output,
and per-group factors fold into few passes: ``y = (x - mean) * (rstd * w) + b``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .contract import REDUCED_DIMS, Grads, Stats, param_reduce_dims, stats_dtype


def _rows(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """A view whose reduced axes are adjacent when B == 1 (LayerNorm, GroupNorm/InstanceNorm NCHW)."""
    q, p, r1, b, r2 = t.shape
    if b == 1 and t.is_contiguous():
        return t.view(q, p, r1 * r2), (2,)
    return t, REDUCED_DIMS


def _centred_moments(xa: Tensor, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased variance, x - mean) with keepdim; RMS: (0, mean square, x).

    Shifting by the first element of each group makes constant groups exactly zero before any
    rounding, so they normalize to exactly ``b``, and keeps the sums small for offset data.
    """
    view, dims = _rows(xa)
    n = max(math.prod(view.shape[d] for d in dims), 1)
    if rms:
        mean, centred = torch.zeros_like(view.sum(dims, keepdim=True)), view
    else:
        shift = view
        for d in dims:
            shift = shift.narrow(d, 0, 1)
        shifted = view - shift
        mean_shifted = shifted.mean(dims, keepdim=True)
        mean, centred = shift + mean_shifted, shifted - mean_shifted
    var = torch.linalg.vector_norm(centred, 2, dim=dims, keepdim=True).square() / n
    q, p, _, b, _ = xa.shape
    return mean.view(q, p, 1, b, 1), var.view(q, p, 1, b, 1), centred.view(xa.shape)


def centred_moments(x5: Tensor, eps: float, rms: bool) -> tuple[Stats, Tensor]:
    """Statistics with keepdim shape (Q, P, 1, B, 1) and ``x - mean`` in the stats dtype; differentiable."""
    acc = stats_dtype(x5.dtype)
    mean, var, centred = _centred_moments(x5.to(acc), rms)
    if acc == torch.float32 and bool(torch.isinf(var).any()):
        mean, var, centred = _centred_moments(x5.to(torch.float64), rms)
        return Stats(mean.to(acc), torch.rsqrt(var + eps).to(acc), var.to(acc)), centred.to(acc)
    return Stats(mean, torch.rsqrt(var + eps), var), centred


def _bcast(t: Tensor) -> Tensor:
    q, p, b = t.shape
    return t.view(q, p, 1, b, 1)


def _param(w: Tensor | None, acc: torch.dtype) -> Tensor | None:
    return None if w is None else w.to(acc).unsqueeze(0)


def _per_group(w: Tensor | None) -> bool:
    """Parameters constant over the reduced axes (BatchNorm, InstanceNorm) fold into per-group factors."""
    return w is None or (w.shape[1] == 1 and w.shape[3] == 1)


def _affine(centred: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``centred * rstd * w + b`` in few passes; ``rstd * w`` folds when w is constant per group."""
    w, b = _param(weight, centred.dtype), _param(bias, centred.dtype)
    if _per_group(weight):
        scale = rstd if w is None else rstd * w
        y = centred * scale if b is None else torch.addcmul(b, centred, scale)
    else:
        y = centred * rstd
        y = y * w if b is None else torch.addcmul(b, y, w)
    return y.to(dtype)


class ReferenceBackend:
    name = "reference"
    activations: tuple[str, ...] = ()

    def supports(self, x5: Tensor, weight: Tensor | None) -> bool:
        return True

    def forward(
        self, x5: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool
    ) -> tuple[Tensor, Stats]:
        st, centred = centred_moments(x5, eps, rms)
        y = _affine(centred, st.rstd, weight, bias, x5.dtype)
        q, p, _, b, _ = x5.shape
        return y, Stats(*(t.reshape(q, p, b) for t in st))

    def normalize(
        self, x5: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        centred = x5.to(stats_dtype(x5.dtype)) - _bcast(mean)
        return _affine(centred, _bcast(rstd), weight, bias, x5.dtype)

    def backward(
        self,
        dy5: Tensor,
        x5: Tensor,
        mean: Tensor,
        rstd: Tensor,
        weight: Tensor | None,
        param_shape: tuple[int, int, int, int],
        rms: bool,
        batch_stats: bool,
        output_mask: tuple[bool, bool, bool],
    ) -> Grads:
        acc = stats_dtype(x5.dtype)
        mean, rstd = _bcast(mean), _bcast(rstd)
        dy = dy5.to(acc)
        xhat = (x5.to(acc) - mean) * rstd
        w = _param(weight, acc)
        dims = param_reduce_dims(param_shape)
        dw = (dy * xhat).sum(dims).reshape(param_shape) if output_mask[1] else None
        db = dy.sum(dims).reshape(param_shape) if output_mask[2] else None
        if not output_mask[0]:
            return Grads(None, dw, db)
        # dx = rstd * (g - mean_R(g) - xhat * mean_R(g * xhat)), g = dy * w, as dy * A + xhat * B + C.
        per_group = _per_group(weight)
        g = dy if per_group or w is None else dy * w
        scale = rstd * w if per_group and w is not None else rstd
        if not batch_stats:
            return Grads((g * scale).to(x5.dtype), dw, db)
        n = math.prod(x5.shape[d] for d in REDUCED_DIMS)
        proj = (g * xhat).sum(REDUCED_DIMS, keepdim=True) * (-1.0 / n)
        shift = torch.zeros_like(proj) if rms else g.sum(REDUCED_DIMS, keepdim=True) * (-1.0 / n)
        dx = torch.addcmul(torch.addcmul(shift * scale, g, scale), xhat, proj * scale)
        return Grads(dx.to(x5.dtype), dw, db)
