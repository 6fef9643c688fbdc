"""Reference backend: plain torch ops, differentiable, the oracle every fast backend is tested against.

Statistics are two-pass and shifted by the first element of each group, so constant groups give
exactly zero variance and their exact value as mean; a group whose squared deviations overflow the
accumulation dtype is recomputed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import REDUCED_DIMS, Grads, Stats, param_reduce_dims, stats_dtype


def _moments(xa: Tensor, rms: bool) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (RMS: zero and mean square) with keepdim over the reduced dims."""
    if rms:
        return torch.zeros_like(xa[:, :, :1, :, :1]), xa.square().mean(REDUCED_DIMS, keepdim=True)
    shift = xa[:, :, :1, :, :1]
    d = xa - shift
    mean_d = d.mean(REDUCED_DIMS, keepdim=True)
    var = (d - mean_d).square().mean(REDUCED_DIMS, keepdim=True)
    return shift + mean_d, var


def moments(x5: Tensor, eps: float, rms: bool) -> Stats:
    """Statistics with keepdim shape (Q, P, 1, B, 1); differentiable."""
    acc = stats_dtype(x5.dtype)
    mean, var = _moments(x5.to(acc), rms)
    rstd = torch.rsqrt(var + eps)
    if acc == torch.float32 and bool(torch.isinf(var).any()):
        mean64, var64 = _moments(x5.to(torch.float64), rms)
        mean, rstd = mean64.to(acc), torch.rsqrt(var64 + eps).to(acc)
        var = var64.to(acc)
    return Stats(mean, rstd, var)


def _bcast(t: Tensor) -> Tensor:
    q, p, b = t.shape
    return t.view(q, p, 1, b, 1)


def _param(w: Tensor | None, acc: torch.dtype) -> Tensor | None:
    return None if w is None else w.to(acc).unsqueeze(0)


def normalize_keepdim(
    x5: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    acc = stats_dtype(x5.dtype)
    y = (x5.to(acc) - mean) * rstd
    w, b = _param(weight, acc), _param(bias, acc)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.to(x5.dtype)


class ReferenceBackend:
    name = "reference"

    def supports(self, x5: Tensor, weight: Tensor | None) -> bool:
        return True

    def forward(
        self, x5: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool
    ) -> tuple[Tensor, Stats]:
        st = moments(x5, eps, rms)
        y = normalize_keepdim(x5, st.mean, st.rstd, weight, bias)
        q, p, _, b, _ = x5.shape
        return y, Stats(*(t.reshape(q, p, b) for t in st))

    def normalize(
        self, x5: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        return normalize_keepdim(x5, _bcast(mean), _bcast(rstd), weight, bias)

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
        dx = dw = db = None
        if output_mask[0]:
            w = _param(weight, acc)
            g = dy if w is None else dy * w
            if batch_stats:
                proj = (g * xhat).mean(REDUCED_DIMS, keepdim=True)
                centred = g if rms else g - g.mean(REDUCED_DIMS, keepdim=True)
                g = centred - xhat * proj
            dx = (g * rstd).to(x5.dtype)
        dims = param_reduce_dims(param_shape)
        if output_mask[1]:
            dw = (dy * xhat).sum(dims).reshape(param_shape)
        if output_mask[2]:
            db = dy.sum(dims).reshape(param_shape)
        return Grads(dx, dw, db)
