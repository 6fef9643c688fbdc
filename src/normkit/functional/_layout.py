"""Memory-format handling and the 5-D views of each norm (see ``normkit.kernels.contract``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels.contract import channels_last, from_memory_order, memory_order
from ._core import traced


def channels_last_perm(x: Tensor) -> tuple[int, ...] | None:
    """The permutation that makes a channels-last 4-D/5-D tensor contiguous, or None for any other
    layout. A 3-D (N, L, C)-ordered tensor (a transposed sequence) has no memory format of torch's,
    whose layers return it contiguous: so does normkit (a ``view`` of the output may follow)."""
    if x.dim() not in (4, 5) or x.is_contiguous():
        return None
    perm = memory_order(x.dim())
    return perm if x.permute(perm).is_contiguous() else None


def restore(y: Tensor, perm: tuple[int, ...] | None) -> Tensor:
    """Undo the permutation of ``dense`` (or ``channels_last_perm``) on an output computed in the
    permuted (contiguous) layout."""
    return y if perm is None else y.permute(from_memory_order(len(perm)))


def dense(x: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    """A contiguous tensor to normalize, and the permutation to undo afterwards (channels-last). One
    permuted view, tested and kept: each view costs microseconds from a cold cache."""
    if x.is_contiguous():  # the common case without a torch call
        return x, None
    if x.dim() in (4, 5):  # channels-last (see ``channels_last_perm``)
        perm = memory_order(x.dim())
        xp = x.permute(perm)
        if xp.is_contiguous():
            return xp, perm
    return x.contiguous(), None


def stored(x: Tensor) -> tuple[Tensor, tuple[int, ...] | None, bool]:
    """``x`` as the core takes it, the permutation ``restore`` undoes, and whether the view is
    channels-last. In eager mode a channels-last 4-D/5-D tensor goes as it is, its view in memory
    order: the permuted view and its undoing cost microseconds each from a cold cache, and an autograd
    node each in backward. Under torch.compile (where views are free) the permuted view, so that the
    custom ops only ever see contiguous tensors, and under a functorch transform or a trace (which
    the kernels do not see) the same, where vmap cannot be asked about channels-last at all."""
    if x.is_contiguous():
        return x, None, False
    if not torch.compiler.is_compiling() and not traced(x) and channels_last(x):
        return x, None, True
    xc, perm = dense(x)
    return xc, perm, perm is not None


def spatial(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def per_channel_view(x: Tensor, channels_last: bool) -> list[int]:
    """Statistics per channel over batch and space (BatchNorm, fixed-statistics InstanceNorm)."""
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    return [1, 1, n * s, c, 1] if channels_last else [1, 1, n, c, s]


def per_instance_view(x: Tensor, channels_last: bool) -> list[int]:
    """Statistics per (sample, channel) over space (InstanceNorm)."""
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    return [n, 1, s, c, 1] if channels_last else [n, c, s, 1, 1]


def per_group_view(x: Tensor, groups: int, channels_last: bool) -> list[int]:
    """Statistics per (sample, group) over the group's channels and space (GroupNorm)."""
    n, c, s = x.shape[0], x.shape[1], spatial(x)
    return [n, 1, s, groups, c // groups] if channels_last else [n, groups, c // groups, 1, s]


def trailing_view(x: Tensor, d: int) -> list[int]:
    """Statistics per row over the last ``d`` elements (LayerNorm, RMSNorm)."""
    return [x.numel() // d if d else 0, 1, d, 1, 1]


def param_shape(shape: list[int], affine_r1: bool, affine_r2: bool) -> tuple[int, int, int, int]:
    """The (P, K1, B, K2) view of a per-channel parameter for the 5-D view ``shape``: the core reads the
    parameter as it is, without a view of its own (which would add an autograd node each way)."""
    _, pp, r1, b, r2 = shape
    return (pp, r1 if affine_r1 else 1, b, r2 if affine_r2 else 1)


def is_float(x: Tensor) -> bool:
    return torch.is_floating_point(x)
