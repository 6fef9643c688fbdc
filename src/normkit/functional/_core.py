"""The one normalization core: two forward ops and one backward op, registered with torch.library.

Every functional entry point reduces its norm to a 5-D view (see ``normkit.kernels.contract``) and
calls ``normalize_batch`` (statistics from the input) or ``normalize_fixed`` (given statistics,
BatchNorm in eval mode). Backward saves only the input, mean and rstd. When a graph of the backward
is requested (double backward), it is differentiated through the reference backend's torch ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..selection import resolve
from ..kernels import load
from ..kernels.contract import stat_shape, stats_dtype

Shape5 = list[int]


def _param_shape(shape: Shape5, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple[int, ...]:
    p = weight if weight is not None else bias
    if p is not None:
        return tuple(p.shape)
    return (shape[1], 1, shape[3], 1)


def _stats_like(x: Tensor, shape: Shape5) -> Tensor:
    q, p, _, b, _ = shape
    return x.new_empty((q, p, b), dtype=stats_dtype(x.dtype))


@torch.library.custom_op("normkit::norm_batch", mutates_args=())
def _norm_batch(
    x: Tensor, shape: Shape5, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x5 = x.view(shape)
    y, st = resolve(x5, weight).forward(x5, weight, bias, eps, rms)
    return y.view(x.shape), st.mean, st.rstd, st.var


@_norm_batch.register_fake
def _(x, shape, weight, bias, eps, rms):
    return torch.empty_like(x), _stats_like(x, shape), _stats_like(x, shape), _stats_like(x, shape)


@torch.library.custom_op("normkit::norm_fixed", mutates_args=())
def _norm_fixed(
    x: Tensor, shape: Shape5, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    x5 = x.view(shape)
    return resolve(x5, weight).normalize(x5, mean, rstd, weight, bias).view(x.shape)


@_norm_fixed.register_fake
def _(x, shape, mean, rstd, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("normkit::norm_backward", mutates_args=())
def _norm_backward(
    dy: Tensor,
    x: Tensor,
    shape: Shape5,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    param_shape: list[int],
    rms: bool,
    batch_stats: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    x5 = x.view(shape)
    grads = resolve(x5, weight).backward(
        dy.contiguous().view(shape), x5, mean, rstd, weight, tuple(param_shape), rms, batch_stats,
        tuple(output_mask),
    )
    dx = x.new_empty(0) if grads.dx is None else grads.dx.view(x.shape)
    return dx, _or_empty(grads.dweight, x), _or_empty(grads.dbias, x)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None or one tensor twice: an unrequested gradient is a fresh empty tensor."""
    return like.new_empty(0) if t is None else t


@_norm_backward.register_fake
def _(dy, x, shape, mean, rstd, weight, param_shape, rms, batch_stats, output_mask):
    acc = stats_dtype(x.dtype)
    return (
        torch.empty_like(x) if output_mask[0] else x.new_empty(0),
        x.new_empty(param_shape, dtype=acc) if output_mask[1] else x.new_empty(0),
        x.new_empty(param_shape, dtype=acc) if output_mask[2] else x.new_empty(0),
    )


def _param_grad(g: Tensor, p: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    return g.to(p.dtype) if needed and p is not None else None


def _grads_via_op(ctx, dy: Tensor, batch_stats: bool) -> tuple[Optional[Tensor], ...]:
    x, mean, rstd, weight, bias = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[ctx.param_index], ctx.needs_input_grad[ctx.param_index + 1]
    dx, dw, db = _norm_backward(
        dy, x, ctx.shape, mean, rstd, weight, list(_param_shape(ctx.shape, weight, bias)), ctx.rms,
        batch_stats, [need_x, need_w and weight is not None, need_b and bias is not None],
    )
    return (dx if need_x else None), _param_grad(dw, weight, need_w), _param_grad(db, bias, need_b)


def _grads_via_reference(ctx, dy: Tensor, forward) -> tuple[Optional[Tensor], ...]:
    """Differentiable backward for double backward: autograd over the reference forward."""
    x, mean, rstd, weight, bias = ctx.saved_tensors
    inputs = (x, weight, bias)
    wanted = [
        t is not None and need
        for t, need in zip(inputs, (ctx.needs_input_grad[0], ctx.needs_input_grad[ctx.param_index], ctx.needs_input_grad[ctx.param_index + 1]))
    ]
    live = [t for t, w in zip(inputs, wanted) if w]
    if not live:
        return None, None, None
    y = forward(x, mean, rstd, weight, bias)
    grads = iter(torch.autograd.grad(y, live, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if w else None for w in wanted)


def _reference_batch(ctx):
    ref = load("reference")

    def forward(x, mean, rstd, weight, bias):
        y, _ = ref.forward(x.view(ctx.shape), weight, bias, ctx.eps, ctx.rms)
        return y.view(x.shape)

    return forward


def _setup_batch(ctx, inputs, output):
    x, shape, weight, bias, eps, rms = inputs
    _, mean, rstd, _ = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.shape, ctx.eps, ctx.rms, ctx.param_index = shape, eps, rms, 2


def _backward_batch(ctx, dy, _dmean, _drstd, _dvar):
    if torch.is_grad_enabled():
        dx, dw, db = _grads_via_reference(ctx, dy, _reference_batch(ctx))
    else:
        dx, dw, db = _grads_via_op(ctx, dy, batch_stats=True)
    return dx, None, dw, db, None, None


def _setup_fixed(ctx, inputs, output):
    x, shape, mean, rstd, weight, bias = inputs
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.shape, ctx.rms, ctx.param_index = shape, False, 4


def _backward_fixed(ctx, dy):
    if torch.is_grad_enabled():
        ref = load("reference")

        def forward(x, mean, rstd, weight, bias):
            return ref.normalize(x.view(ctx.shape), mean, rstd, weight, bias).view(x.shape)

        dx, dw, db = _grads_via_reference(ctx, dy, forward)
    else:
        dx, dw, db = _grads_via_op(ctx, dy, batch_stats=False)
    return dx, None, None, None, dw, db


_norm_batch.register_autograd(_backward_batch, setup_context=_setup_batch)
_norm_fixed.register_autograd(_backward_fixed, setup_context=_setup_fixed)


def normalize_batch(
    x: Tensor, shape: Shape5, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``x`` (contiguous) with statistics of its 5-D view; returns (y, mean, rstd, var)."""
    return _norm_batch(x, list(shape), weight, bias, float(eps), rms)


def normalize_fixed(
    x: Tensor, shape: Shape5, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    """Normalize ``x`` (contiguous) with given statistics of shape (Q, P, B)."""
    return _norm_fixed(x, list(shape), mean, rstd, weight, bias)


__all__ = ["normalize_batch", "normalize_fixed", "stat_shape"]
