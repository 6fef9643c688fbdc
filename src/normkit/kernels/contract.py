"""The one contract every kernel backend satisfies.

Every normalization in normkit is computed on a 5-D view ``(Q, P, R1, B, R2)`` of a dense tensor's
elements in memory order. Statistics (mean, rstd) are taken per ``(q, p, b)`` over ``(r1, r2)`` and
have shape ``(Q, P, B)``. The affine parameters are read as ``(P, K1, B, K2)`` with ``K1`` in ``{1, R1}`` and
``K2`` in ``{1, R2}``, so ``weight[p, r1 % K1, b, r2 % K2]`` scales element ``x[q, p, r1, b, r2]``.
``P`` is the period with which the channel repeats along the statistics axis (InstanceNorm in
NCHW: ``A = N*C`` split as ``Q=N, P=C``).

The tensors arrive as they are, with the view beside them: ``shape`` is the 5-D view of ``x`` (and
``dy``), ``param_shape`` that of the parameters; either defaults to the tensor's own shape. ``x`` is
contiguous, or channels-last (4-D or 5-D, ``memory_format=torch.channels_last(_3d)``), and the view
describes its elements in memory order (a channels-last tensor is passed without its permuted view).
``dy`` may come in either layout: a backend brings it to that of ``x`` (``laid_like``). Outputs keep the
shape and layout of ``x``. Taking no views on the way is what keeps an eager call cheap: outside a
kernel's data a tensor view costs about 10 µs from a cold cache, and a view of a parameter that
requires grad adds an autograd node each way. Parameters may be broadcast views (stride 0, e.g.
LayerNorm2d): a backend that needs dense ones makes them contiguous.

Statistics are float32 for float32/bfloat16/float16 input and float64 for float64 input.
``mean`` is 0 for RMSNorm, whose ``var`` is the mean square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.autograd import forward_ad

REDUCED_DIMS = (2, 4)
# Activation epilogues the core offers after the affine transform (``activation=`` in the functional API).
ACTIVATIONS = ("relu", "silu", "gelu")


def check_activation(activation: str | None) -> None:
    """Reject a name outside ``ACTIVATIONS`` (None: no activation) with one message for every caller."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS} or None")


class Stats(NamedTuple):
    mean: Tensor
    rstd: Tensor
    var: Tensor


class Grads(NamedTuple):
    dx: Tensor | None
    dweight: Tensor | None
    dbias: Tensor | None


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_shape(x5: Tensor) -> tuple[int, int, int]:
    q, p, _, b, _ = x5.shape
    return (q, p, b)


def seen_through(t: Tensor) -> bool:
    """Whether ``t`` is seen by a functorch transform (it is wrapped by one), ``torch.jit.trace`` or
    forward-mode AD (a dual level is open): these follow torch ops only, so kernels that read raw
    memory would drop what they track, and vmap and forward-mode AD refuse ``out=`` and in-place
    updates of temporaries and Python branches on values."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor(t)
    return wrapped or torch._C._is_tracing() or forward_ad._current_level >= 0


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# The dims of a channels-last tensor in memory order (N, spatial..., C), and back, for the usual ranks:
# each call would otherwise build them again.
_ORDER = {d: (0, *range(2, d), 1) for d in range(3, 7)}
_UNORDER = {d: (0, d - 1, *range(1, d - 1)) for d in range(3, 7)}


def memory_order(dim: int) -> tuple[int, ...]:
    """The permutation that moves the channel dim of a ``dim``-D tensor last (channels-last memory order)."""
    return _ORDER.get(dim) or (0, *range(2, dim), 1)


def from_memory_order(dim: int) -> tuple[int, ...]:
    """The inverse of ``memory_order(dim)``."""
    return _UNORDER.get(dim) or (0, dim - 1, *range(1, dim - 1))


def channels_last(x: Tensor) -> bool:
    """Whether ``x`` is channels-last and not contiguous: its view is in the memory order (N, spatial, C)."""
    fmt = _CHANNELS_LAST.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _in_memory_order(x: Tensor) -> Tensor:
    """``x`` (contiguous or channels-last) as a contiguous view, its dims in memory order."""
    if x.is_contiguous():
        return x
    if not channels_last(x):
        raise ValueError(
            f"a tensor of strides {x.stride()} for shape {tuple(x.shape)}: expected contiguous or channels-last"
        )
    return x.permute(_ORDER[x.dim()])


def check_view(x: Tensor, shape: Sequence[int] | None) -> None:
    """Refuse a non-contiguous ``x`` without its view: its own shape is not its memory order."""
    if shape is None and not x.is_contiguous():
        raise ValueError(f"a {x.dim()}-D tensor that is not contiguous needs its 5-D view in memory order (shape=)")


def view5(x: Tensor, shape: Sequence[int] | None) -> Tensor:
    """``x`` as its 5-D view, for a backend that computes with tensor views."""
    if shape is None:
        check_view(x, shape)
        return x
    return _in_memory_order(x).view(*shape)


def shaped_like(t5: Tensor, x: Tensor) -> Tensor:
    """A result computed on ``view5(x, ...)`` in the shape and layout of ``x``."""
    if x.is_contiguous():
        return t5.reshape(x.shape)
    order = _ORDER[x.dim()]
    return t5.reshape([x.shape[d] for d in order]).permute(_UNORDER[x.dim()])


def laid_like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (of ``x``'s shape) in the layout of ``x`` (contiguous or channels-last): ``dy`` for a
    backward, which autograd hands over in whatever layout the layers after produced."""
    if x.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=_CHANNELS_LAST[x.dim()])


def view_param(p: Tensor | None, param_shape: Sequence[int] | None) -> Tensor | None:
    """A parameter as its ``(P, K1, B, K2)`` view, for a backend that computes with tensor views: its
    elements in that order, or broadcast to it (a parameter with fewer elements)."""
    if p is None or param_shape is None:
        return p
    return p.reshape(*param_shape) if p.numel() == math.prod(param_shape) else p.expand(*param_shape)


def params_shape(
    shape5: Sequence[int], weight: Tensor | None, bias: Tensor | None, given: Sequence[int] | None
) -> tuple[int, ...]:
    """The parameters' ``(P, K1, B, K2)`` view: ``given``, else their own (broadcast) shape, else one per
    channel of the view ``shape5``."""
    if given is not None:
        return tuple(given)
    if weight is not None and bias is not None and weight.shape != bias.shape:
        return tuple(torch.broadcast_shapes(weight.shape, bias.shape))
    t = weight if weight is not None else bias
    if t is not None:
        return tuple(t.shape)
    return (shape5[1], 1, shape5[3], 1)


def grad_shape(weight: Tensor | None, param_shape: Sequence[int], param_numel: int | None = None) -> tuple[int, ...]:
    """The shape of dweight and dbias: the weight's own where it holds the view's elements (a module's
    gradient then needs no view), the view's otherwise (autograd sums a broadcast parameter's)."""
    numel = math.prod(param_shape) if param_numel is None else param_numel
    return tuple(weight.shape) if weight is not None and weight.numel() == numel else tuple(param_shape)


def given_rstd(shape: tuple[int, int, int], rstd: Tensor, var_eps: float | None) -> Tensor:
    """The rstd of ``normalize``'s arguments, with torch ops (any device), in the statistics' ``shape``
    ``(Q, P, B)``."""
    return (rstd if var_eps is None else torch.rsqrt(rstd + var_eps)).reshape(shape)


def param_reduce_dims(param_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """Dims of the 5-D view summed for dweight/dbias: always q, and r1/r2 unless the params span them."""
    dims = [0]
    if param_shape[1] == 1:
        dims.append(2)
    if param_shape[3] == 1:
        dims.append(4)
    return tuple(dims)


def blend_running(running: Tensor, batch: Tensor, momentum: float, scale: float = 1.0) -> None:
    """running = (1 - momentum) * running + momentum * scale * batch: two in-place kernels when the
    dtypes agree (on a GPU each small kernel costs microseconds), else through batch's dtype. A
    ``with`` block, not the ``no_grad`` decorator: the decorator costs more than both kernels."""
    with torch.no_grad():
        if running.dtype == batch.dtype:
            running.mul_(1.0 - momentum).add_(batch, alpha=momentum * scale)
        else:
            running.copy_((batch * (momentum * scale) + running.to(batch.dtype) * (1.0 - momentum)).to(running.dtype))


def update_running(
    running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor, momentum: float,
    var_scale: float,
) -> None:
    """``Backend.update_running`` in torch ops, for any device and dtype: every backend may use it."""
    for running, stat, scale in ((running_mean, mean, 1.0), (running_var, var, var_scale)):
        if running is not None:
            per_q = stat.reshape(-1, running.numel())
            blend_running(running, per_q[0] if per_q.shape[0] == 1 else per_q.mean(0), momentum, scale)


class Backend(Protocol):
    """What the core calls. Tensors are contiguous or channels-last; ``shape`` / ``param_shape`` give
    their views (see module doc)."""

    name: str
    # Activations the kernels fuse. Only these are passed as ``activation=`` to forward, normalize
    # and backward (with ``bias=`` in backward, to recompute the activation input); the core
    # composes any other around the kernels.
    activations: tuple[str, ...]

    def supports(self, x5: Tensor, weight: Tensor | None) -> bool:
        """False makes the core use the reference backend for this call."""

    def forward(
        self, x5: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, *,
        shape: Sequence[int] | None = None, param_shape: Sequence[int] | None = None,
    ) -> tuple[Tensor, Stats]:
        """Batch statistics and the normalized, affine-transformed output in x5's dtype."""

    def normalize(
        self, x5: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
        var_eps: float | None = None, *, shape: Sequence[int] | None = None,
        param_shape: Sequence[int] | None = None,
    ) -> Tensor:
        """Apply given statistics (BatchNorm in eval mode): ``Q*P*B`` values each in ``(q, p, b)`` order,
        of any shape (BatchNorm's running buffers as they are). With ``var_eps`` the second is the
        variance and the backend takes ``rstd = 1 / sqrt(var + var_eps)``: in the kernel on the CPU,
        where two small torch ops cost more than the kernel on small inputs."""

    def update_running(
        self, running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
        momentum: float, var_scale: float,
    ) -> None:
        """Blend batch statistics ``(Q, P, B)``, averaged over ``Q``, into running buffers of ``P*B``
        elements in place: ``r = (1 - momentum) * r + momentum * s``, ``s = var * var_scale`` for the
        variance (torch's unbiasing factor). A None buffer is left out."""

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
        *,
        shape: Sequence[int] | None = None,
    ) -> Grads:
        """dx in x5's dtype and shape; dweight, dbias in the statistics dtype, ``param_shape``'s elements
        in ``grad_shape(weight, param_shape)``: a module's gradient needs no view.

        Each is None where ``output_mask`` is False.
        With ``batch_stats`` the statistics depend on x:
        ``dx = rstd * (g - mean_R(g) - xhat * mean_R(g * xhat))`` with ``g = dy * weight``
        (RMSNorm drops ``mean_R(g)``); otherwise ``dx = rstd * g``.
        """
