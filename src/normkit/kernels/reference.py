"""Reference backend: plain torch ops, differentiable, the oracle every fast backend is tested against.

Shifted two-pass statistics: each group is shifted by its first element (constant groups become
exactly zero and normalize to exactly ``b``), the variance is the norm of ``x - mean``; a group whose
variance overflows float32 is recomputed in float64. ``x - mean`` is computed once and reused for the output,
and per-group factors fold into few passes: ``y = (x - mean) * (rstd * w) + b``. Temporaries that
autograd does not track are updated in place: besides saving passes, a second full-size buffer makes
glibc return the heap top to the system on every free, and the page faults then cost more than the math.
The backward of LayerNorm, GroupNorm and BatchNorm views runs torch's fused kernels on ``x - mean``
(see ``_native_backward``); every other view takes the general closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .contract import (
    REDUCED_DIMS, Grads, Stats, given_rstd, grad_shape, param_reduce_dims, seen_through, stat_shape, stats_dtype,
    update_running, laid_like, shaped_like, view5, view_param,
)

_SLAB = 1 << 20  # elements of one slab's temporary: recycled from the heap, mostly in cache


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
        mean, centred = torch.zeros_like(_sum(view, dims)), view
    else:
        shift = view
        for d in dims:
            shift = shift.narrow(d, 0, 1)
        shifted = view - _spread(shift, view)
        mean_shifted = _sum(shifted, dims) / n
        mean, centred = shift + mean_shifted, _owned_sub(shifted, _spread(mean_shifted, view))
    var = _sum_squares(centred, dims) / n
    q, p, _, b, _ = xa.shape
    return mean.view(q, p, 1, b, 1), var.view(q, p, 1, b, 1), centred.view(xa.shape)


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Per-group sum with keepdim. Over (R1, R2) of the 5-D view, R1 is summed first: torch reduces
    an outer axis across contiguous inner ones several times faster than both axes at once."""
    if dims == REDUCED_DIMS:
        return t.sum(2, keepdim=True).sum(4, keepdim=True)
    return t.sum(dims, keepdim=True)


def _sum_squares(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Per-group sum of squares. torch's vector_norm is fastest over contiguous rows but several
    times slower than squaring and summing over strided axes; there the squares are taken a slab of
    rows at a time, since a full-size temporary costs more in page faults than the arithmetic."""
    if dims == (2,):
        return torch.linalg.vector_norm(t, 2, dim=dims, keepdim=True).square()
    row = max(1, t.numel() // max(1, t.shape[2]))  # elements of one r1 row across q, p, b, r2
    return sum(part.square().sum(2, keepdim=True) for part in t.split(max(1, _SLAB // row), dim=2)).sum(4, keepdim=True)


def _spread(stat: Tensor, like: Tensor) -> Tensor:
    """A per-group (…, B, 1) operand expanded over a short R2 (GroupNorm channels_last): broadcasting
    it along the innermost axis leaves torch an inner loop of R2 elements, far slower than a
    contiguous operand of B * R2."""
    if like.dim() == 5 and like.shape[3] > 1 and 1 < like.shape[4] <= 64 and stat.shape[4] == 1:
        return stat.expand(*stat.shape[:4], like.shape[4]).contiguous()
    return stat


def _varies_innermost(operand: Tensor, like: Tensor) -> bool:
    """Whether ``operand`` spans the innermost axis of ``like`` that is longer than 1."""
    inner = max((d for d in range(like.dim()) if like.shape[d] > 1), default=None)
    return inner is not None and operand.shape[inner] == like.shape[inner]


def _owned_sub(t: Tensor, other: Tensor) -> Tensor:
    """``t - other``, in place when autograd does not track ``t`` (a temporary of ours)
    and no transform sees it."""
    return t - other if t.requires_grad or seen_through(t) else t.sub_(other)


def centred_moments(x5: Tensor, eps: float, rms: bool) -> tuple[Stats, Tensor]:
    """Statistics with keepdim shape (Q, P, 1, B, 1) and ``x - mean`` in the stats dtype; differentiable.
    float32 statistics whose variance overflows are taken again in float64; where that test cannot
    branch (``seen_through``), they are taken in float64 at once. Meta tensors have no values to test."""
    acc = stats_dtype(x5.dtype)
    if acc == torch.float64 or not seen_through(x5):
        mean, var, centred = _centred_moments(x5.to(acc), rms)
        if acc == torch.float64 or x5.is_meta or not bool(torch.isinf(var).any()):
            return Stats(mean, torch.rsqrt(var + eps), var), centred
    mean, var, centred = _centred_moments(x5.to(torch.float64), rms)
    return Stats(mean.to(acc), torch.rsqrt(var + eps).to(acc), var.to(acc)), centred.to(acc)


def _bcast(t: Tensor) -> Tensor:
    q, p, b = t.shape
    return t.view(q, p, 1, b, 1)


def _param(w: Tensor | None, acc: torch.dtype) -> Tensor | None:
    return None if w is None else w.to(acc).unsqueeze(0)


def _folds(rstd: Tensor, w: Tensor | None, like: Tensor) -> bool:
    """Whether ``rstd * w`` is much smaller than the data (one value per sample and channel for
    BatchNorm, InstanceNorm, GroupNorm), so the two fold into one factor and save a full pass."""
    return w is None or 8 * math.prod(torch.broadcast_shapes(rstd.shape, w.shape)) <= like.numel()


def _weighted_sum(t: Tensor, w: Tensor | None) -> Tensor:
    """Per-group sum of ``t * w`` (keepdim), without a full-size product: the axis the (P, K1, B, K2)
    parameters are constant on is summed first, then the small partial sums are weighted."""
    if w is None:
        return _sum(t, REDUCED_DIMS)
    q, p, r1, b, r2 = t.shape
    spans_r1, spans_r2 = w.shape[2] > 1, w.shape[4] > 1
    if not spans_r1 and not spans_r2:
        return _sum(t, REDUCED_DIMS) * w
    if spans_r1 and not spans_r2 and r2 > 1:
        return (t.sum(4, keepdim=True) * w).sum(2, keepdim=True)
    if spans_r2 and not spans_r1 and r1 > 1:
        return (t.sum(2, keepdim=True) * w).sum(4, keepdim=True)
    if spans_r1 != spans_r2:  # the other reduced axis has length 1: a batched dot product
        run = r1 * r2
        dot = torch.einsum("qpbk,pbk->qpb", t.movedim(3, 2).reshape(q, p, b, run),
                           w[0].expand(p, r1, b, r2).movedim(2, 1).reshape(p, b, run))
        return dot.view(q, p, 1, b, 1)
    return _sum(t * w, REDUCED_DIMS)


def _affine(
    centred: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype, owned: bool
) -> Tensor:
    """``centred * rstd * w + b`` in few passes, ``rstd * w`` folded where it is small. Multiply and
    add fuse into one addcmul where the folded factor varies along the innermost axis; broadcast
    along it, addcmul is several times slower than a multiply and an add.

    ``owned``: ``centred`` is our temporary and may receive the result when autograd does not track it.
    """
    w, b = _param(weight, centred.dtype), _param(bias, centred.dtype)
    operands = [t for t in (centred, rstd, w, b) if t is not None]
    tracked = any(seen_through(t) for t in operands) or (
        torch.is_grad_enabled() and any(t.requires_grad for t in operands)
    )
    out = centred if owned and not tracked else None
    if _folds(rstd, w, centred):
        scale = _spread(rstd if w is None else rstd * w, centred)
        if b is not None and _varies_innermost(scale, centred):
            return torch.addcmul(b, centred, scale, out=out).to(dtype)
        y = torch.mul(centred, scale, out=out)
    else:
        y = torch.mul(centred, _spread(rstd, centred), out=out)
        y = y * w if tracked else y.mul_(w)
    if b is not None:
        y = y + b if tracked else y.add_(b)
    return y.to(dtype)


class ReferenceBackend:
    name = "reference"
    activations: tuple[str, ...] = ()
    update_running = staticmethod(update_running)

    def supports(self, x5: Tensor, weight: Tensor | None) -> bool:
        return True

    def forward(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, *,
        shape: Sequence[int] | None = None, param_shape: Sequence[int] | None = None,
    ) -> tuple[Tensor, Stats]:
        x5, weight, bias = view5(x, shape), view_param(weight, param_shape), view_param(bias, param_shape)
        st, centred = centred_moments(x5, eps, rms)
        y = _affine(centred, st.rstd, weight, bias, x5.dtype, owned=not rms)
        q, p, _, b, _ = x5.shape
        return shaped_like(y, x), Stats(*(t.reshape(q, p, b) for t in st))

    def normalize(
        self, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
        var_eps: float | None = None, *, shape: Sequence[int] | None = None,
        param_shape: Sequence[int] | None = None,
    ) -> Tensor:
        x5, weight, bias = view5(x, shape), view_param(weight, param_shape), view_param(bias, param_shape)
        centred = x5.to(stats_dtype(x5.dtype)) - _spread(_bcast(mean.reshape(stat_shape(x5))), x5)
        y = _affine(centred, _bcast(given_rstd(stat_shape(x5), rstd, var_eps)), weight, bias, x5.dtype, owned=True)
        return shaped_like(y, x)

    @torch.no_grad()
    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        rstd: Tensor,
        weight: Tensor | None,
        param_shape: tuple[int, int, int, int],
        rms: bool,
        batch_stats: bool,
        output_mask: tuple[bool, bool, bool],
        *,
        shape: Sequence[int] | None = None,
    ) -> Grads:
        dx, dw, db = self._backward(
            view5(laid_like(dy, x), shape), view5(x, shape), mean, rstd, view_param(weight, param_shape), param_shape, rms,
            batch_stats, output_mask,
        )
        gshape = grad_shape(weight, param_shape)
        return Grads(None if dx is None else shaped_like(dx, x), *(None if t is None else t.reshape(gshape) for t in (dw, db)))

    def _backward(self, dy5, x5, mean, rstd, weight, param_shape, rms, batch_stats, output_mask) -> Grads:
        """``backward`` on the 5-D views (weight viewed too); shapes as they come from the views."""
        acc = stats_dtype(x5.dtype)
        kind = _native_kind(x5, weight, param_shape, rms, batch_stats, output_mask)
        if kind is not None:
            return _native_backward(
                kind, dy5.to(acc), x5.to(acc), mean, rstd, _param(weight, acc), param_shape, output_mask, x5.dtype
            )
        mean, rstd = _spread(_bcast(mean), x5), _spread(_bcast(rstd), x5)
        dy = dy5.to(acc)
        xhat = (x5.to(acc) - mean).mul_(rstd)
        w = _param(weight, acc)
        dyx = dy * xhat if output_mask[1] or (output_mask[0] and batch_stats) else None
        dims = param_reduce_dims(param_shape)
        dw = dyx.sum(dims).reshape(param_shape) if output_mask[1] else None
        db = dy.sum(dims).reshape(param_shape) if output_mask[2] else None
        if not output_mask[0]:
            return Grads(None, dw, db)
        # dx = rstd * (g - mean_R(g) - xhat * mean_R(g * xhat)) with g = dy * w, never materialized
        # for the sums; the dx buffer reuses dy * xhat once its sums are taken.
        if batch_stats:
            n = math.prod(x5.shape[d] for d in REDUCED_DIMS)
            proj = _weighted_sum(dyx, w) * (-1.0 / n)
            shift = None if rms else _weighted_sum(dy, w) * (-1.0 / n)
        if _folds(rstd, w, x5):
            dx = torch.mul(dy, rstd if w is None else _spread(rstd * w, x5), out=dyx)
        else:
            dx = torch.mul(dy, w, out=dyx).mul_(rstd)
        if batch_stats:
            if shift is not None:
                dx = dx.add_(_spread(shift, x5) * rstd)
            dx = dx.add_(xhat.mul_(_spread(proj, x5) * rstd))
        return Grads(dx.to(x5.dtype), dw, db)


def _native_kind(
    x5: Tensor,
    weight: Tensor | None,
    param_shape: tuple[int, int, int, int],
    rms: bool,
    batch_stats: bool,
    output_mask: tuple[bool, bool, bool],
) -> str | None:
    """Which of torch's fused backward kernels takes this view: ``layer``, ``group``, ``batch`` or
    ``group_cl``; None for any other. CPU only: torch's CUDA GroupNorm backward takes no channels-last
    input, and on a GPU this backend only serves what the Triton kernels decline. Channels-last
    InstanceNorm stays on the general path, which is faster than torch's kernel for it."""
    if x5.device.type != "cpu" or rms or not batch_stats or (weight is None and any(output_mask[1:])):
        return None
    q, p, r1, b, r2 = x5.shape
    if p == 1 and b == 1 and r2 == 1 and param_shape == (1, r1, 1, 1):
        return "layer"
    if b == 1 and param_shape == (p, r1, 1, 1):
        return "group"
    if q == 1 and p == 1 and param_shape == (1, 1, b, 1):
        return "batch"
    if p == 1 and r2 > 1 and param_shape == (1, 1, b, r2) and output_mask[0]:
        return "group_cl"  # torch 2.13's kernel crashes on this layout when dx is not asked for
    return None


def _native_backward(
    kind: str,
    dy5: Tensor,
    x5: Tensor,
    mean: Tensor,
    rstd: Tensor,
    w: Tensor | None,
    param_shape: tuple[int, int, int, int],
    output_mask: tuple[bool, bool, bool],
    dtype: torch.dtype,
) -> Grads:
    """torch's fused backward of ``kind`` (see ``_native_kind``); ``dx`` comes back in ``dtype``.

    The kernels compute ``dx = a * dy * w + b * x + c``, whose last two terms cancel for offset data;
    given ``x - mean`` and a zero mean there is nothing to cancel, so the result is as exact as the
    general path, in two passes over the data instead of about ten.
    """
    q, p, r1, b, r2 = x5.shape
    mask = list(output_mask)
    weight = None if w is None else w.reshape(-1).contiguous()  # torch's kernels misread a broadcast (stride-0) one
    centred = x5 - _spread(_bcast(mean), x5)
    zero = torch.zeros_like(mean)
    if kind == "layer":  # the bias argument only sizes db: the weight stands in for it
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy5.reshape(q, r1), centred.view(q, r1), [r1], zero.view(q, 1), rstd.reshape(q, 1), weight, weight, mask
        )
    elif kind == "group":
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy5.reshape(q, p * r1, r2), centred.view(q, p * r1, r2), zero.view(q, p), rstd.reshape(q, p), weight,
            q, p * r1, r2, p, mask,
        )
    elif kind == "batch":
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy5.reshape(r1, b, r2), centred.view(r1, b, r2), weight, None, None, zero.view(b), rstd.reshape(b),
            True, 0.0, mask,
        )
    else:

        def nchw(t: Tensor) -> Tensor:
            return t.reshape(q, r1, 1, b * r2).permute(0, 3, 1, 2)

        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            nchw(dy5), nchw(centred), zero.view(q, b), rstd.reshape(q, b), weight, q, b * r2, r1, b, mask
        )
        dx = dx.permute(0, 2, 3, 1)
    return Grads(
        dx.view(x5.shape).to(dtype) if output_mask[0] else None,
        dw.view(param_shape) if output_mask[1] else None,
        db.view(param_shape) if output_mask[2] else None,
    )
