"""Statistics computed with torch ops — from valid positions only when a mask is given — applied by the core.

Padded batches (sequences of different lengths, images with padding) pollute batch statistics: the
padding counts as data. Here the statistics of a 5-D view are taken over the positions a boolean
``mask`` marks valid, with plain torch ops, so autograd differentiates them. They are applied by the
core's ``normalize_fixed`` through ``normalize_with``, which routes the gradient through the
statistics as well. The variants whose statistics are not a plain batch statistic (SwitchableNorm,
EvoNorm, AdaIN) use the same two functions.

Masked-out positions come out as the bias (normalized value 0) and receive zero gradient: what
they hold, even NaN, reaches neither the statistics, nor the other outputs, nor any gradient. A group
without valid positions therefore outputs the bias everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.contract import REDUCED_DIMS, params_shape, seen_through, stats_dtype
from . import _layout as L
from ._core import normalize_fixed


def expand_mask(mask: Tensor, input: Tensor, channel_dim: bool) -> Tensor:
    """``mask`` broadcast to ``input``'s shape. With ``channel_dim``, a mask one dim short has no channel dim."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = valid position), got {mask.dtype}")
    if channel_dim and mask.dim() == input.dim() - 1:
        mask = mask.unsqueeze(1)
    try:
        return mask.expand(input.shape)
    except RuntimeError:
        short = " (a mask one dim short is the input's shape without the channel dim)" if channel_dim else ""
        raise RuntimeError(
            f"mask of shape {list(mask.shape)} does not broadcast to input of shape {list(input.shape)}{short}"
        ) from None


def bias_where_masked_out(y: Tensor, valid: Tensor, bias: Tensor | None, activation=None) -> Tensor:
    """``y`` with the masked-out positions of ``valid`` (bool, ``y``'s shape) set to the bias, after
    ``activation`` (a callable, or None): what normalized 0 outputs there."""
    shape = (1, -1) + (1,) * (y.dim() - 2)
    fill = y.new_zeros(()) if bias is None else bias.to(y.dtype).view(shape)
    return torch.where(laid_out_like(valid, y), y, fill if activation is None else activation(fill))


def laid_out_like(valid: Tensor, y: Tensor) -> Tensor:
    """The bool tensor ``valid`` (``y``'s shape) in ``y``'s memory layout: ``torch.where`` lays its result out
    like a strided operand, and a contiguous mask would turn a channels-last output into NCHW."""
    return valid if valid.stride() == y.stride() else torch.empty_like(y, dtype=torch.bool).copy_(valid)


def view_mask(mask: Tensor, input: Tensor, perm: tuple[int, ...] | None, shape: list[int], channel_dim: bool) -> Tensor:
    """``mask`` laid out like the 5-D view ``shape`` of ``input`` made dense by ``L.dense`` (permutation ``perm``)."""
    full = expand_mask(mask, input, channel_dim)
    return (full if perm is None else full.permute(perm)).reshape(shape)


def moments(x5: Tensor, mask5: Tensor | None = None, rms: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased variance, count) of each group of the 5-D view, shape (Q, P, B); differentiable.
    RMS: (0, mean square, count).

    Two passes in the statistics dtype with the mean accumulated in float64. A float32 variance that
    overflows (inputs of scale 1e20) is recomputed in float64 and the statistics stay in float64: cast
    back, the variance would be inf and every ``rsqrt(var + eps)`` 0. Where that test cannot branch on
    the values (torch.compile and export, a transform or a trace: ``seen_through``) float32 statistics
    are taken in float64 at once and come back in float64; meta tensors have no values to test.
    """
    acc = stats_dtype(x5.dtype)
    at_once = acc == torch.float32 and (torch.compiler.is_compiling() or seen_through(x5))
    mean, var, count = _moments(x5.to(torch.float64 if at_once else acc), mask5, rms)
    if not at_once and acc == torch.float32 and not x5.is_meta and bool(torch.isinf(var).any()):
        mean, var, count = _moments(x5.to(torch.float64), mask5, rms)
    q, p, _, b, _ = x5.shape
    return mean.view(q, p, b), var.view(q, p, b), count.view(q, p, b)


def _moments(xa: Tensor, mask5: Tensor | None, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    if mask5 is None:
        count = torch.full((), xa.shape[2] * xa.shape[4], dtype=xa.dtype, device=xa.device)
        valid = xa
    else:
        count = mask5.sum(REDUCED_DIMS, keepdim=True, dtype=xa.dtype)
        valid = torch.where(mask5, xa, 0)
    total = count.clamp(min=1)
    if rms:
        mean = xa.new_zeros(total.shape)
    else:
        mean = (valid.sum(REDUCED_DIMS, keepdim=True, dtype=torch.float64) / total).to(xa.dtype)
    centred = xa - mean if mask5 is None else torch.where(mask5, xa - mean, 0)
    var = centred.square().sum(REDUCED_DIMS, keepdim=True) / total
    return mean, var, count.expand_as(mean)


def normalize_with(
    xc: Tensor, shape: list[int], mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    mask5: Tensor | None = None, param_shape: tuple[int, ...] | None = None,
) -> Tensor:
    """``normalize_fixed`` with statistics (Q, P, B) that may depend on ``xc``: gradients reach them too.

    The core treats given statistics as constants. When they carry a graph, the core normalizes
    ``x' = mean₀ + (x − mean) · rstd / rstd₀`` (equal to ``x``; ``mean₀``, ``rstd₀`` the detached
    statistics) with ``mean₀`` and ``rstd₀``: the same function of ``x``, ``mean`` and ``rstd`` to every
    order, so autograd gives the exact backward. Positions where ``mask5`` is False are replaced by
    the mean first, so they normalize to 0 and pass no gradient; in bfloat16/float16, where the mean
    written there is rounded, they are set to the bias afterwards.
    """
    if mask5 is not None:
        mask5 = mask5.contiguous()  # a strided mask (channels-last input, a transposed view) would lay out the result
    graph = torch.is_grad_enabled() and (mean.requires_grad or rstd.requires_grad)
    dtype = xc.dtype
    if graph or mask5 is not None:
        q, p, _, b, _ = shape
        m0, r0 = mean.detach(), rstd.detach()
        m5 = mean.view(q, p, 1, b, 1)
        x5 = xc.view(shape).to(mean.dtype)
        if mask5 is not None:
            x5 = torch.where(mask5, x5, m5)
        if graph:
            x5 = torch.addcmul(m0.view(q, p, 1, b, 1), x5 - m5, (rstd / r0).view(q, p, 1, b, 1))
        xc = x5.to(dtype).view(xc.shape)
        mean, rstd = m0, r0
    y = normalize_fixed(xc, shape, mean, rstd, weight, bias, param_shape=param_shape)
    if mask5 is None or dtype not in (torch.bfloat16, torch.float16):
        return y
    fill = y.new_zeros(()) if bias is None else bias.to(dtype).view(1, *params_shape(shape, weight, bias, param_shape))
    return torch.where(mask5, y.view(shape), fill).view(y.shape)


def _normalize(
    input: Tensor, mask: Tensor, channel_dim: bool, view, weight: Tensor | None, bias: Tensor | None, eps: float,
    affine_r: tuple[bool, bool] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masked statistics of the view ``view(input, channels_last)`` applied by the core; returns (y, mean, var, count)."""
    xc, perm = L.dense(input)
    cl = perm is not None
    shape = view(input, cl)
    mask5 = view_mask(mask, input, perm, shape, channel_dim)
    mean, var, count = moments(xc.view(shape), mask5)
    r1, r2 = affine_r if affine_r is not None else (False, False)
    y = normalize_with(xc, shape, mean, torch.rsqrt(var + eps), weight, bias, mask5, L.param_shape(shape, r1, r2))
    return L.restore(y, perm), mean, var, count


@torch.no_grad()
def _update_running(
    running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor, count: Tensor, momentum: float
) -> None:
    """Fold per-(instance, channel) statistics (I, C) into running ones, as torch does: the average over
    instances of the mean and the unbiased variance. Only groups with 2+ valid values count; a channel
    without any keeps its running statistics."""
    ok = count > 1
    k = ok.sum(0).clamp(min=1)
    has = ok.any(0)
    unbiased = var * count / (count - 1).clamp(min=1)
    for running, batch in ((running_mean, mean), (running_var, unbiased)):
        if running is not None:
            value = torch.where(ok, batch, 0).sum(0) / k
            new = value * momentum + running.to(value.dtype) * (1.0 - momentum)
            running.copy_(torch.where(has, new, running.to(value.dtype)).to(running.dtype))


def batch_norm(
    input: Tensor, mask: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float,
) -> Tensor:
    """Training-mode batch norm with per-channel statistics over the valid positions only."""
    c = input.shape[1]
    y, mean, var, count = _normalize(input, mask, True, L.per_channel_view, weight, bias, eps)
    _update_running(running_mean, running_var, mean.view(1, c), var.view(1, c), count.view(1, c), momentum)
    return y


def instance_norm(
    input: Tensor, mask: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float,
) -> Tensor:
    """Instance norm with per-(sample, channel) statistics over the valid positions only."""
    n, c = input.shape[0], input.shape[1]
    y, mean, var, count = _normalize(input, mask, True, L.per_instance_view, weight, bias, eps)
    _update_running(running_mean, running_var, mean.view(n, c), var.view(n, c), count.view(n, c), momentum)
    return y


def group_norm(input: Tensor, mask: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Group norm with per-(sample, group) statistics over the valid positions only."""
    cl = L.channels_last_perm(input) is not None
    return _normalize(
        input, mask, True, lambda x, c: L.per_group_view(x, num_groups, c), weight, bias, eps, (not cl, cl)
    )[0]


def layer_norm(
    input: Tensor, mask: Tensor, d: int, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool = False
) -> Tensor:
    """Layer norm (RMS norm) with per-row statistics over the valid positions of the normalized dims only."""
    xc = input.contiguous()
    shape = L.trailing_view(xc, d)
    mask5 = expand_mask(mask, input, False).reshape(shape)
    mean, var, _ = moments(xc.view(shape), mask5, rms)
    return normalize_with(xc, shape, mean, torch.rsqrt(var + eps), weight, bias, mask5, L.param_shape(shape, True, False))
