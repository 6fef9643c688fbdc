"""``torch.nn.functional``-compatible entry points. Each validates like torch, picks a view, calls the core.

Beyond torch's signatures: ``mask`` (statistics from valid positions only) and ``activation``
("relu", "silu", "gelu": applied to the output, fused into the kernels where the backend can).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels.contract import stats_dtype
from . import _layout as L
from . import activation as A
from . import masked as M
from ._core import normalize_batch, normalize_fixed, records_graph, update_running


def _scalar_name(dtype: torch.dtype) -> str:
    return torch.empty(0, dtype=dtype).type().split(".")[-1].removesuffix("Tensor")


def _not_float(x: Tensor, op: str) -> NotImplementedError:
    """torch's error for a non-floating input. The callers test ``is_floating_point`` themselves: on
    every call a function call costs more than the test."""
    return NotImplementedError(f'"{op}" not implemented for \'{_scalar_name(x.dtype)}\'')


def check_floating(input: Tensor, op: str) -> None:
    """torch's error for a non-floating input to ``op`` (the layers built of torch ops would otherwise
    compute in integers and truncate)."""
    if not input.is_floating_point():
        raise _not_float(input, op)


_REDUCED = (torch.bfloat16, torch.float16)


def _check_dtypes(input: Tensor, *params: Tensor | None) -> None:
    """torch's CPU rule for the parameters' and buffers' dtypes (ATen's ``check_mixed_data_type``), with its
    messages: when the first parameter given differs from the input, every parameter must be float32 and
    the input bfloat16 or float16 (mixed precision); otherwise any parameter of another dtype is refused.
    On other devices the kernels' own rules apply."""
    dtype = input.dtype
    for t in params:  # the common case first, as a loop: a generator costs half a microsecond more a call
        if t is not None and t.dtype != dtype:
            break
    else:
        return
    if input.device.type != "cpu":
        return
    present = [t.dtype for t in params if t is not None]
    first = present[0]
    if first != dtype:
        if any(d != torch.float32 for d in present):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if dtype not in _REDUCED:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        return
    other = next(d for d in present if d != first)
    raise RuntimeError(f"expected scalar type {_scalar_name(first)} but found {_scalar_name(other)}")


def _check_devices(input: Tensor, *tensors: Tensor | None) -> None:
    """torch's error for a parameter or buffer on another device than the input: the kernels read them
    by address (a meta or CUDA tensor's address read on the CPU is a crash, or silently unused)."""
    cpu = input.is_cpu
    for t in tensors:
        if t is not None and (not t.is_cpu if cpu else t.device != input.device):
            raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {input.device}!")


def _check_per_channel(
    input: Tensor, weight, bias, running_mean: Tensor | None, running_var: Tensor | None, buffer_dtypes: bool = True
) -> None:
    """torch's checks of BatchNorm's and InstanceNorm's tensors besides their sizes: the running buffers
    both or neither, neither one wanting a gradient (the update in place could not give it), and the
    dtypes (``_check_dtypes``; InstanceNorm's buffers may have any floating dtype: torch blends a copy
    into them). One call with the common case first: it runs on every call."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    _check_devices(input, weight, bias, running_mean, running_var)
    dtype = input.dtype
    checked = (weight, bias, running_mean, running_var) if buffer_dtypes else (weight, bias)
    for t in checked:
        if t is not None and t.dtype != dtype:
            _check_dtypes(input, *checked)
            break
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad) and torch.is_grad_enabled():
        name = "running_mean" if running_mean.requires_grad else "running_var"
        raise RuntimeError(
            f"The function 'native_batch_norm' is not differentiable with respect to argument '{name}'. "
            "This input cannot have requires_grad True."
        )


def _float_arg(value, op: str, name: str, position: int) -> float:
    """A float argument as torch's argument parser takes it (a number or a 0-dim tensor), with its error
    for anything else. The callers test ``type(value) is float`` first: that costs less than a call."""
    if isinstance(value, Tensor) and value.dim() == 0:
        return float(value)
    if isinstance(value, (int, float)) or hasattr(value, "__float__") and not isinstance(value, (str, Tensor)):
        return float(value)
    raise TypeError(f"{op}(): argument '{name}' (position {position}) must be float, not {type(value).__name__}")


def _verify_batch_size(size: Sequence[int]) -> None:
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _verify_spatial_size(size: torch.Size) -> None:
    if math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def _bessel(count: float) -> float:
    """The factor that makes a biased variance over ``count`` values unbiased (NaN for one value, as torch)."""
    return count / (count - 1) if count > 1 else float("nan")


def _per_channel_eval(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight, bias, eps: float, activation: str | None
) -> Tensor:
    """Normalize with the running statistics as they are: the core takes rstd from the variance
    (in the kernel on the CPU). When a backward may follow, the mean is a copy, as the backward uses
    the statistics of the forward and a training step in between updates the buffers in place
    (torch.nn allows it); the core takes rstd at once then. So is it under ``torch.jit.trace``, whose
    graph must not depend on whether the traced call recorded a backward."""
    xc, perm, cl = L.stored(x)
    shape = L.per_channel_view(x, cl)
    acc = stats_dtype(x.dtype)
    copy = records_graph(x, weight, bias) or running_mean.dtype != acc or torch.jit.is_tracing()
    mean = running_mean.to(acc, copy=True) if copy else running_mean
    var = running_var if running_var.dtype == acc else running_var.to(acc)
    ps = L.param_shape(shape, False, False)
    return L.restore(normalize_fixed(xc, shape, mean, var, weight, bias, activation, eps, ps), perm)


def _masked_eval(
    input: Tensor, mask: Tensor, running_mean: Tensor, running_var: Tensor, weight, bias, eps: float,
    activation: str | None,
) -> Tensor:
    """``_per_channel_eval`` where masked-out positions output the bias, as in training: what they hold
    (even NaN) reaches no output and no gradient, the parameters' included."""
    valid = M.laid_out_like(M.expand_mask(mask, input, True), input)
    y = _per_channel_eval(torch.where(valid, input, 0), running_mean, running_var, weight, bias, eps, activation)
    return M.bias_where_masked_out(y, valid, bias, lambda t: A.apply(activation, t))


def _per_channel(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight, bias, batch_stats: bool,
    momentum: float, eps: float, mask: Tensor | None, activation: str | None, view, masked, count: int,
) -> Tensor:
    """BatchNorm and InstanceNorm after their checks: with the running statistics, or with the statistics of
    the 5-D ``view`` (``masked``: the masked version) blended into the running ones, ``count`` values each."""
    if not batch_stats:
        if mask is None:
            return _per_channel_eval(input, running_mean, running_var, weight, bias, eps, activation)
        return _masked_eval(input, mask, running_mean, running_var, weight, bias, eps, activation)
    if input.numel() == 0:
        return _empty(input, weight, bias, activation)
    if mask is not None:
        return A.apply(activation, masked(input, mask, running_mean, running_var, weight, bias, momentum, eps))
    y, mean, var = _batch_view(input, lambda x, cl: (view(x, cl), False, False), weight, bias, eps, activation)
    if running_mean is not None or running_var is not None:
        update_running(running_mean, running_var, mean, var, momentum, _bessel(count))
    return y


def _batch_view(
    input: Tensor, view, weight: Tensor | None, bias: Tensor | None, eps: float, activation: str | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, mean, var) of statistics taken on ``view(input, channels_last)`` -> (shape5, span_r1,
    span_r2); the output keeps the input's memory format."""
    xc, perm, cl = L.stored(input)
    shape, span_r1, span_r2 = view(input, cl)
    ps = L.param_shape(shape, span_r1, span_r2)
    y, st = normalize_batch(xc, shape, weight, bias, eps, False, activation, ps)
    return L.restore(y, perm), st.mean, st.var


def _empty(input: Tensor, weight: Tensor | None, bias: Tensor | None, activation: str | None) -> Tensor:
    """The (empty) output of an empty input, joined to the parameters in the graph as torch's is: their
    gradients are zeros, not None (an optimizer step or a DDP rank with an empty batch expects them)."""
    A.check(activation)
    y = input.clone()
    for p in (weight, bias):
        if records_graph(p):
            y = y + p.sum() * 0
    return y


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Batch normalization with ``torch.nn.functional.batch_norm``'s signature and semantics.

    ``mask`` (bool, True = valid; shape broadcastable to the input, or the input's without the channel
    dim) restricts the training statistics and running-statistics updates to the valid positions.
    ``activation`` is applied to the output.
    """
    if type(training) is not bool:
        raise TypeError(f"batch_norm(): argument 'training' (position 6) must be bool, not {type(training).__name__}")
    if type(momentum) is not float:
        momentum = _float_arg(momentum, "batch_norm", "momentum", 7)
    if type(eps) is not float:
        eps = _float_arg(eps, "batch_norm", "eps", 8)
    if training:
        _verify_batch_size(input.shape)
    check_batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    return _per_channel(
        input, running_mean, running_var, weight, bias, training, momentum, eps, mask, activation,
        L.per_channel_view, M.batch_norm, input.numel() // max(1, input.shape[1]) if training else 0,
    )


def check_batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, training: bool, eps: float,
) -> None:
    """torch's checks of ``batch_norm``'s arguments, with its messages, but the batch size (a rank of
    SyncBatchNorm may hold one sample of a larger batch)."""
    size = input.shape
    if training:
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not input.is_floating_point():
        raise _not_float(input, "batch_norm")
    if len(size) < 2 and training:
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    c = size[1] if len(size) > 1 else 0
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
    if not training and (running_mean is None or running_var is None):
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{missing} must be defined in evaluation mode")
    _check_per_channel(input, weight, bias, running_mean, running_var)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Instance normalization with ``torch.nn.functional.instance_norm``'s signature; keeps channels-last.

    ``mask`` and ``activation`` as in ``batch_norm``.
    """
    if type(use_input_stats) is not bool:
        raise TypeError(
            f"instance_norm(): argument 'use_input_stats' (position 6) must be bool, not {type(use_input_stats).__name__}"
        )
    if type(momentum) is not float:
        momentum = _float_arg(momentum, "instance_norm", "momentum", 7)
    if type(eps) is not float:
        eps = _float_arg(eps, "instance_norm", "eps", 8)
    size = input.shape
    if use_input_stats:
        _verify_spatial_size(size)
    if not use_input_stats and (running_mean is None or running_var is None):
        raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
    per_channel = (running_mean, running_var, weight, bias)
    if any(t is not None and t.dim() > 1 for t in per_channel):  # torch repeats them over the batch first
        raise RuntimeError("Number of dimensions of repeat dims can not be smaller than number of dimensions of tensor")
    if not input.is_floating_point():
        raise _not_float(input, "batch_norm")
    n, c = size[0], size[1]
    for t, name in zip(per_channel, ("running_mean", "running_var", "weight", "bias")):
        if t is not None and t.numel() != c:  # torch counts them repeated over the batch
            raise RuntimeError(f"{name} should contain {n * c} elements not {t.numel() * n}")
    _check_per_channel(input, weight, bias, running_mean, running_var, buffer_dtypes=False)
    return _per_channel(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, mask, activation,
        L.per_instance_view, M.instance_norm, L.spatial(input),
    )


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Group normalization with ``torch.nn.functional.group_norm``'s signature; fast in both layouts.

    ``mask`` and ``activation`` as in ``batch_norm``.
    """
    if type(eps) is not float:
        eps = _float_arg(eps, "group_norm", "eps", 5)
    size = input.shape
    if len(size) < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    if isinstance(num_groups, (float, bool)) or isinstance(num_groups, Tensor) and num_groups.dim():
        raise TypeError(f"group_norm(): argument 'num_groups' (position 2) must be int, not {type(num_groups).__name__}")
    num_groups = operator.index(num_groups)  # a 0-dim integer tensor or numpy integer, as torch takes them
    c = size[1]
    if size[0] * c // num_groups * math.prod(size[2:]) == 1:  # the list only for the message
        _verify_batch_size([size[0] * c // num_groups, num_groups] + list(size[2:]))
    if num_groups <= 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    _check_devices(input, weight, bias)
    _check_dtypes(input, weight, bias)
    if not input.is_floating_point():
        raise _not_float(input, "GroupNormKernelImpl")
    if c % num_groups:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}"
        )
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None and (t.dim() != 1 or t.shape[0] != c):
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in input, but got "
                f"{name} of shape {list(t.shape)} and input of shape {list(size)}"
            )
    if input.numel() == 0:
        return _empty(input, weight, bias, activation)
    if mask is not None:
        return A.apply(activation, M.group_norm(input, mask, num_groups, weight, bias, eps))
    y, _, _ = _batch_view(input, lambda x, cl: (L.per_group_view(x, num_groups, cl), not cl, cl), weight, bias, eps, activation)
    return y


def _int_sizes(shape: tuple, op: str) -> tuple[int, ...]:
    """Sizes as torch's argument parser takes them (0-dim integer tensors, numpy integers), with its
    error for a float or bool."""
    for i, n in enumerate(shape):
        if isinstance(n, (float, bool)) or not hasattr(n, "__index__"):
            raise TypeError(
                f"{op}(): argument 'normalized_shape' (position 2) must be tuple of ints, but found element of "
                f"type {type(n).__name__} at pos {i}"
            )
    return tuple(operator.index(n) for n in shape)


def _check_normalized_shape(input: Tensor, normalized_shape: Sequence[int], weight, bias, op: str) -> int:
    """The number of normalized elements, after torch's checks (tuples compared as they come: a module
    holds its ``normalized_shape`` as one) for ``op``, ``layer_norm`` or ``rms_norm``."""
    if not isinstance(normalized_shape, (tuple, list, torch.Size)):
        raise TypeError(
            f"{op}(): argument 'normalized_shape' (position 2) must be tuple of ints, not {type(normalized_shape).__name__}"
        )
    shape = tuple(normalized_shape)
    for n in shape:
        if type(n) is not int and not isinstance(n, torch.SymInt):
            shape = _int_sizes(shape, op)
            break
    if not shape:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, "
            f"but got normalized_shape = {list(shape)}"
        )
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None and t.shape != shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{list(t.shape)} and normalized_shape = {list(shape)}"
            )
    size = input.shape
    if op == "rms_norm" and len(size) < len(shape):
        raise ValueError(f"Input tensor must have at least {len(shape)} dimensions, but got {len(size)}")
    if len(size) < len(shape) or size[len(size) - len(shape):] != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*{', ' if op == 'layer_norm' else ''}"
            f"{', '.join(map(str, shape))}], "
            f"but got input of size{list(size)}"
        )
    return shape[0] if len(shape) == 1 else math.prod(shape)


def _trailing_norm(input: Tensor, d: int, weight, bias, eps: float, rms: bool, activation: str | None) -> Tensor:
    if input.numel() == 0:
        return _empty(input, weight, bias, activation)
    xc = input.contiguous()
    shape = L.trailing_view(xc, d)
    return normalize_batch(xc, shape, weight, bias, eps, rms, activation, L.param_shape(shape, True, False))[0]


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Layer normalization with ``torch.nn.functional.layer_norm``'s signature.

    ``mask`` (bool, True = valid, broadcastable to the input) restricts each row's statistics to its
    valid positions; ``activation`` as in ``batch_norm``.
    """
    if type(eps) is not float:
        eps = _float_arg(eps, "layer_norm", "eps", 5)
    d = _check_normalized_shape(input, normalized_shape, weight, bias, "layer_norm")
    _check_devices(input, weight, bias)
    _check_dtypes(input, weight, bias)
    if not input.is_floating_point():
        raise _not_float(input, "LayerNormKernelImpl")
    if mask is not None and input.numel():
        return A.apply(activation, M.layer_norm(input, mask, d, weight, bias, eps))
    return _trailing_norm(input, d, weight, bias, eps, False, activation)


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    mask: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """RMS normalization with ``torch.nn.functional.rms_norm``'s signature (``eps=None``: the eps of the compute dtype).

    ``mask`` as in ``layer_norm``, ``activation`` as in ``batch_norm``. A channels-last input gives a
    channels-last output, as torch's RMSNorm (made of elementwise torch ops) does; other layouts give a
    contiguous one, as torch's do (and torch's LayerNorm for every layout).
    """
    d = _check_normalized_shape(input, normalized_shape, weight, None, "rms_norm")
    _check_devices(input, weight)
    if not input.is_floating_point():
        if input.is_complex() and mask is None and activation is None:  # torch's RMSNorm takes complex data
            return torch.rms_norm(input, normalized_shape, weight, eps)
        raise _not_float(input, "rms_norm")
    if eps is None:
        eps = torch.finfo(stats_dtype(input.dtype)).eps
    elif type(eps) is not float:
        eps = _float_arg(eps, "rms_norm", "eps", 4)
    if mask is not None and input.numel():
        y = A.apply(activation, M.layer_norm(input, mask, d, weight, None, eps, rms=True))
    else:
        y = _trailing_norm(input, d, weight, None, eps, True, activation)
    perm = L.channels_last_perm(input)  # permutes only: vmap cannot be asked about memory formats
    return y if perm is None else L.restore(y.permute(perm).contiguous(), perm)
