"""The one normalization core: two forward ops and one backward op, registered with torch.library.

Every functional entry point reduces its norm to a 5-D view (see ``normkit.kernels.contract``) and
calls ``normalize_batch`` (statistics from the input) or ``normalize_fixed`` (given statistics,
BatchNorm in eval mode). Either may end in an activation epilogue: fused by backends that list it
in ``activations``, composed around the kernels (``activation.py``) for the others. Backward saves
only the input, mean and rstd (and the parameters). When a graph of the backward is requested
(double backward), it is differentiated through the reference backend's torch ops.

torch.compile sees the custom ops. Eager calls skip the custom-op dispatch, which costs more than
the kernels on small tensors: the same implementation runs bare when no gradient is wanted and under
an autograd.Function with the same context and backward when one is. Under functorch transforms
(``torch.func.vmap``, ``grad``, ``jvp``, ...) and ``torch.jit.trace`` the reference backend's torch ops
run without a Function, so that the transform or the tracer sees (and differentiates) every op.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..selection import resolve
from ..kernels import contract, load
from ..kernels.contract import (
    Grads, Stats, given_rstd, grad_shape, params_shape, seen_through, stat_shape, stats_dtype,
)
from . import activation as act

Shape5 = list[int]


class _Spec(NamedTuple):
    """What backward needs besides the saved tensors (one attribute of the context: each costs)."""

    shape: Shape5
    param_shape: Optional[Sequence[int]]  # None: the parameters' own shape
    rms: bool
    activation: Optional[str]
    eps: Optional[float]  # batch statistics: to differentiate the forward again (double backward)
    param_index: int  # of the weight among the op's inputs
    eager: bool


def _stats_like(x: Tensor, shape: Shape5) -> Tensor:
    q, p, _, b, _ = shape
    return x.new_empty((q, p, b), dtype=stats_dtype(x.dtype))


def _forward_batch(
    x: Tensor, shape: Shape5, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool,
    activation: Optional[str], param_shape: Optional[list[int]],
) -> tuple[Tensor, Stats]:
    backend = resolve(x, weight)
    if activation is None:
        return backend.forward(x, weight, bias, eps, rms, shape=shape, param_shape=param_shape)
    if activation in backend.activations:
        return backend.forward(x, weight, bias, eps, rms, activation=activation, shape=shape, param_shape=param_shape)
    y, st = backend.forward(x, weight, bias, eps, rms, shape=shape, param_shape=param_shape)
    return act.apply(activation, y, inplace=True), st


def _batch(
    x: Tensor, shape: Shape5, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool,
    activation: Optional[str], param_shape: Optional[list[int]],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, st = _forward_batch(x, shape, weight, bias, eps, rms, activation, param_shape)
    return y, st.mean, st.rstd, st.var


_norm_batch = torch.library.custom_op("normkit::norm_batch", _batch, mutates_args=())


@_norm_batch.register_fake
def _(x, shape, weight, bias, eps, rms, activation, param_shape):
    return torch.empty_like(x), _stats_like(x, shape), _stats_like(x, shape), _stats_like(x, shape)


def _fixed(
    x: Tensor, shape: Shape5, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    activation: Optional[str], var_eps: Optional[float], param_shape: Optional[list[int]],
) -> Tensor:
    backend = resolve(x, weight)
    if activation is not None and activation in backend.activations:
        return backend.normalize(
            x, mean, rstd, weight, bias, activation=activation, var_eps=var_eps, shape=shape, param_shape=param_shape
        )
    y = backend.normalize(x, mean, rstd, weight, bias, var_eps=var_eps, shape=shape, param_shape=param_shape)
    return y if activation is None else act.apply(activation, y, inplace=True)


_norm_fixed = torch.library.custom_op("normkit::norm_fixed", _fixed, mutates_args=())


@_norm_fixed.register_fake
def _(x, shape, mean, rstd, weight, bias, activation, var_eps, param_shape):
    return torch.empty_like(x)


def _backward(
    dy: Tensor,
    x: Tensor,
    shape: Shape5,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    param_shape: Sequence[int],
    rms: bool,
    batch_stats: bool,
    output_mask: Sequence[bool],
    activation: Optional[str],
) -> Grads:
    backend = resolve(x, weight)
    args = (x, mean, rstd, weight, param_shape, rms, batch_stats, output_mask)
    if activation is not None and activation in backend.activations:
        return backend.backward(dy, *args, bias=bias, activation=activation, shape=shape)
    if activation is not None:
        y = backend.normalize(x, mean, rstd, weight, bias, shape=shape, param_shape=param_shape)
        dy = act.backward(activation, y, dy)
    return backend.backward(dy, *args, shape=shape)


def _backward_op(*args) -> tuple[Tensor, Tensor, Tensor]:
    """``_backward`` as an op's outputs, which may be neither None nor share storage: an unrequested
    gradient is a fresh empty tensor, and dweight and dbias, which a backend may return as two rows of
    one buffer (finished by one reduction), are copied apart. Its schema is ``_backward``'s arguments."""
    x = args[1]
    dx, dw, db = (x.new_empty(0) if t is None else t for t in _backward(*args))
    if dw.numel() and db.numel() and dw.untyped_storage().data_ptr() == db.untyped_storage().data_ptr():
        db = db.clone()
    return dx, dw, db


_backward_op.__signature__ = inspect.signature(_backward).replace(return_annotation="tuple[Tensor, Tensor, Tensor]")
_norm_backward = torch.library.custom_op("normkit::norm_backward", _backward_op, mutates_args=())


@_norm_backward.register_fake
def _(dy, x, shape, mean, rstd, weight, bias, param_shape, rms, batch_stats, output_mask, activation):
    acc = stats_dtype(x.dtype)
    gshape = grad_shape(weight, param_shape)  # the backends' (see Backend.backward)
    return (
        torch.empty_like(x) if output_mask[0] else x.new_empty(0),
        x.new_empty(gshape, dtype=acc) if output_mask[1] else x.new_empty(0),
        x.new_empty(gshape, dtype=acc) if output_mask[2] else x.new_empty(0),
    )


def _param_grad(g: Tensor, p: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    """A parameter's gradient in its dtype and shape (see ``grad_shape``; a broadcast parameter's stays
    in the view's shape, which autograd sums to the parameter's)."""
    if not needed or p is None:
        return None
    if g.dtype != p.dtype:
        g = g.to(p.dtype)
    return g if g.shape == p.shape or g.numel() != p.numel() else g.view(p.shape)


def _needs(ctx) -> tuple[bool, bool, bool]:
    """Whether x, weight and bias want a gradient."""
    need, i = ctx.needs_input_grad, ctx.spec.param_index
    return need[0], need[i], need[i + 1]


def _grads_via_op(ctx, dy: Tensor, batch_stats: bool) -> tuple[Optional[Tensor], ...]:
    """The kernels' backward: called bare in eager mode, as the op under torch.compile."""
    x, mean, rstd, weight, bias = ctx.saved_tensors
    spec = ctx.spec
    need_x, need_w, need_b = _needs(ctx)
    mask = (need_x, need_w and weight is not None, need_b and bias is not None)
    pshape = params_shape(spec.shape, weight, bias, spec.param_shape)
    if spec.eager:
        dx, dw, db = _backward(
            dy, x, spec.shape, mean, rstd, weight, bias, pshape, spec.rms, batch_stats, mask, spec.activation
        )
    else:
        dx, dw, db = _norm_backward(
            dy, x, spec.shape, mean, rstd, weight, bias, list(pshape), spec.rms, batch_stats, list(mask),
            spec.activation,
        )
    return (dx if need_x else None), _param_grad(dw, weight, need_w), _param_grad(db, bias, need_b)


def _grads_via_reference(ctx, dy: Tensor, forward) -> tuple[Optional[Tensor], ...]:
    """Differentiable backward for double backward: autograd over the reference forward."""
    x, mean, rstd, weight, bias = ctx.saved_tensors
    inputs = (x, weight, bias)
    wanted = [t is not None and need for t, need in zip(inputs, _needs(ctx))]
    live = [t for t, w in zip(inputs, wanted) if w]
    if not live:
        return None, None, None
    y = act.apply(ctx.spec.activation, forward(x, mean, rstd, weight, bias))
    grads = iter(torch.autograd.grad(y, live, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if w else None for w in wanted)


def _reference_batch(spec: _Spec):
    ref = load("reference")

    def forward(x, mean, rstd, weight, bias):
        y, _ = ref.forward(x, weight, bias, spec.eps, spec.rms, shape=spec.shape, param_shape=spec.param_shape)
        return y

    return forward


def _save_batch(ctx, inputs: tuple, mean: Tensor, rstd: Tensor, eager: bool) -> None:
    x, shape, weight, bias, eps, rms, activation, param_shape = inputs
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.spec = _Spec(shape, param_shape, rms, activation, eps, 2, eager)


def _setup_batch(ctx, inputs, output) -> None:
    _save_batch(ctx, inputs, output[1], output[2], False)


def _backward_batch(ctx, dy, *_stats):
    """The statistics carry no gradient: the op's three outputs, or the eager Function's one object."""
    if dy is None:  # only the statistics were used
        return None, None, None, None, None, None, None, None
    if torch.is_grad_enabled():
        dx, dw, db = _grads_via_reference(ctx, dy, _reference_batch(ctx.spec))
    else:
        dx, dw, db = _grads_via_op(ctx, dy, batch_stats=True)
    return dx, None, dw, db, None, None, None, None


def _save_fixed(ctx, inputs: tuple, eager: bool) -> None:
    x, shape, mean, rstd, weight, bias, activation, var_eps, param_shape = inputs
    q, p, _, b, _ = shape
    rstd = given_rstd((q, p, b), rstd, var_eps)  # taken now: the variance may change before backward
    ctx.save_for_backward(x, mean.reshape(q, p, b), rstd, weight, bias)
    ctx.spec = _Spec(shape, param_shape, False, activation, None, 4, eager)


def _setup_fixed(ctx, inputs, output) -> None:
    _save_fixed(ctx, inputs, False)


def _backward_fixed(ctx, dy):
    if dy is None:
        return None, None, None, None, None, None, None, None, None
    if torch.is_grad_enabled():
        ref, spec = load("reference"), ctx.spec

        def forward(x, mean, rstd, weight, bias):
            return ref.normalize(x, mean, rstd, weight, bias, shape=spec.shape, param_shape=spec.param_shape)

        dx, dw, db = _grads_via_reference(ctx, dy, forward)
    else:
        dx, dw, db = _grads_via_op(ctx, dy, batch_stats=False)
    return dx, None, None, None, dw, db, None, None, None


_norm_batch.register_autograd(_backward_batch, setup_context=_setup_batch)
_norm_fixed.register_autograd(_backward_fixed, setup_context=_setup_fixed)


def unviewed(y: Tensor) -> Tensor:
    """``y`` as a tensor of its own where a backend returned a view of its temporaries (the reference
    backend's reshaped 5-D result): autograd forbids in-place changes to a Function's view outputs,
    and a layer such as ``ReLU(inplace=True)`` follows a norm. The same memory, no copy."""
    if y._base is None:
        return y
    return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), y.shape, y.stride())


class _EagerBatch(torch.autograd.Function):
    """``norm_batch`` without the custom-op dispatch (tens of microseconds a call), with the op's
    backward. Its forward takes ``ctx`` itself: a separate ``setup_context`` makes every call bind the
    forward's signature. The statistics come out as one plain object, not as three outputs: autograd
    wraps no tensor it cannot differentiate, and no unused output's gradient is materialized as zeros."""

    @staticmethod
    def forward(ctx, *inputs) -> tuple[Tensor, Stats]:
        y, st = _forward_batch(*inputs)
        _save_batch(ctx, inputs, st.mean, st.rstd, True)
        return unviewed(y), st

    backward = staticmethod(_backward_batch)


class _EagerFixed(torch.autograd.Function):
    """``norm_fixed`` without the custom-op dispatch, as ``_EagerBatch``."""

    @staticmethod
    def forward(ctx, *inputs) -> Tensor:
        y = _fixed(*inputs)
        _save_fixed(ctx, inputs, True)
        return unviewed(y)

    backward = staticmethod(_backward_fixed)


# Function.apply's C++ implementation, bound to each Function (what its Python ``apply`` ends in).
_raw_apply = {f: super(torch.autograd.Function, f).apply for f in (_EagerBatch, _EagerFixed)}
_functorch_active = torch._C._are_functorch_transforms_active
_batched = torch._C._functorch.is_batchedtensor
_UNBATCHED_RUNNING = (  # torch's words
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in "
    "place, were not batched.\nIf you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False.If you are using a prebuilt module and do not need eval mode, please see "
    "the functorch website for resources on how to patch your module to work with vmap"
)


def records_graph(*inputs: Optional[Tensor]) -> bool:
    """Whether autograd records a call on ``inputs``, so that a backward may follow. A loop, not
    ``any`` over a generator, which costs a microsecond more on every call."""
    if not torch.is_grad_enabled():
        return False
    for t in inputs:
        if t is not None and t.requires_grad:
            return True
    return False


def _listed(shape: Optional[Sequence[int]]) -> Optional[list[int]]:
    return None if shape is None else list(shape)


def traced(x: Tensor) -> bool:
    """Whether a functorch transform (``x`` wrapped by one, or one active over other inputs),
    ``torch.jit.trace`` or forward-mode AD sees the call (``contract.seen_through``). Not for code
    torch.compile traces, which cannot follow these queries (and sees the custom ops instead)."""
    return _functorch_active() or seen_through(x)


def _plain_batch(
    x: Tensor, shape: Shape5, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool,
    activation: Optional[str], param_shape: Optional[Sequence[int]],
) -> tuple[Tensor, Stats]:
    y, st = load("reference").forward(x, weight, bias, eps, rms, shape=shape, param_shape=param_shape)
    return act.apply(activation, y), st


def _plain_fixed(
    x: Tensor, shape: Shape5, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    activation: Optional[str], var_eps: Optional[float], param_shape: Optional[Sequence[int]],
) -> Tensor:
    y = load("reference").normalize(x, mean, rstd, weight, bias, var_eps=var_eps, shape=shape, param_shape=param_shape)
    return act.apply(activation, y)


def _eager(function: type[torch.autograd.Function], impl, plain, x: Tensor, weight: Optional[Tensor],
           bias: Optional[Tensor]):
    """In eager mode: the autograd.Function when a gradient is wanted, the bare implementation when
    none is (each layer of dispatch costs microseconds), ``plain`` torch ops where a transform or a
    tracer sees the call. The Function is entered below its Python ``apply``, whose argument binding
    and unwrapping of functorch tensors cost about 16 µs from a cold cache."""
    if traced(x):
        return plain
    if not records_graph(x, weight, bias):
        return impl
    return _raw_apply[function]


def normalize_batch(
    x: Tensor,
    shape: Shape5,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool = False,
    activation: Optional[str] = None,
    param_shape: Optional[Sequence[int]] = None,
) -> tuple[Tensor, Stats]:
    """Normalize ``x`` (contiguous, or channels-last in eager mode) with statistics of its 5-D view
    ``shape`` (in memory order); returns the output and the statistics. The parameters are read as
    ``param_shape`` (P, K1, B, K2), by default their own shape. Under torch.compile the custom op
    runs, in eager mode the same implementation without it."""
    if activation is not None:
        act.check(activation)
    if torch.compiler.is_compiling():
        y, mean, rstd, var = _norm_batch(
            x, list(shape), weight, bias, float(eps), rms, activation, _listed(param_shape)
        )
        return y, Stats(mean, rstd, var)
    run = _eager(_EagerBatch, _forward_batch, _plain_batch, x, weight, bias)
    return run(x, shape, weight, bias, float(eps), rms, activation, param_shape)


def normalize_fixed(
    x: Tensor,
    shape: Shape5,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    activation: Optional[str] = None,
    var_eps: Optional[float] = None,
    param_shape: Optional[Sequence[int]] = None,
) -> Tensor:
    """Normalize ``x`` (as in ``normalize_batch``) with given statistics, Q*P*B values each (see
    ``Backend.normalize``; with ``var_eps`` the second is the variance); parameters as in
    ``normalize_batch``."""
    if activation is not None:
        act.check(activation)
    var_eps = None if var_eps is None else float(var_eps)
    if torch.compiler.is_compiling():
        return _norm_fixed(x, list(shape), mean, rstd, weight, bias, activation, var_eps, _listed(param_shape))
    run = _eager(_EagerFixed, _fixed, _plain_fixed, x, weight, bias)
    return run(x, shape, mean, rstd, weight, bias, activation, var_eps, param_shape)


def update_running(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    momentum: float,
    var_scale: float,
) -> None:
    """Blend batch statistics (Q, P, B), averaged over Q, into per-channel running buffers in place
    (see ``Backend.update_running``). The backend of the statistics does it: on the CPU one kernel
    instead of four small torch ops, which cost more than the kernels' gap to torch on mid-size
    tensors. Under torch.compile, torch ops that the compiler can trace."""
    if torch.compiler.is_compiling() or traced(mean):
        if _batched(mean) and not all(_batched(t) for t in (running_mean, running_var) if t is not None):
            raise RuntimeError(_UNBATCHED_RUNNING)
        blend = contract.update_running
    else:
        blend = resolve(mean, None).update_running
    blend(running_mean, running_var, mean, var, momentum, var_scale)


__all__ = ["normalize_batch", "normalize_fixed", "records_graph", "stat_shape", "traced", "unviewed", "update_running"]
