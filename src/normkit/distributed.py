"""SyncBatchNorm over ``torch.distributed``: BatchNorm statistics of the batch concatenated over all ranks.

Forward sends one all-reduce: a (world, 2·C + 1) float64 table where each rank fills its row with its
(count, mean, M2) and the others with zeros, so every rank receives all rows and merges them exactly
(Chan's parallel variance, no ``E[x²] − E[x]²`` cancellation). Counts travel with the statistics, so
uneven batches and ranks with an empty batch need nothing special; an empty batch on every rank gives
an empty output and leaves the running statistics, as BatchNorm does. Backward sends one all-reduce of
(Σ dy, Σ dy·x̂) per channel. The normalization itself is the core's ``normalize_fixed``, which also
applies SyncBatchNormAct2d's activation; backward recomputes the activation's input from x̂.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.fx import Proxy
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import _layout as L
from .functional import activation as act
from .functional import batch_norm
from .functional._core import normalize_fixed, unviewed
from .functional.norms import _bessel, check_batch_norm
from .kernels.contract import blend_running, stats_dtype
from .nn._base import NormBase, fx_node
from .nn.variants.norm_act import ActLayer, NormAct


def _local_moments(x5: Tensor) -> tuple[int, Tensor, Tensor]:
    """(count, mean, M2) per channel of a per-channel 5-D view, in float64 for the exchange."""
    count = x5.shape[2] * x5.shape[4]
    if count == 0:
        zeros = x5.new_zeros(x5.shape[3], dtype=torch.float64)
        return 0, zeros, zeros.clone()
    var, mean = torch.var_mean(x5.to(stats_dtype(x5.dtype)), dim=(0, 1, 2, 4), correction=0)
    return count, mean.double(), var.double() * count


def _global_moments(x5: Tensor, group: Any) -> tuple[float, Tensor, Tensor]:
    """Total count, mean and biased variance per channel over all ranks, with one all-reduce."""
    count, mean, m2 = _local_moments(x5)
    c = mean.numel()
    table = mean.new_zeros(dist.get_world_size(group), 2 * c + 1)
    table[dist.get_rank(group)] = torch.cat([mean.new_tensor([count]), mean, m2])
    dist.all_reduce(table, group=group)
    counts, means, m2s = table[:, :1], table[:, 1 : c + 1], table[:, c + 1 :]
    total = float(counts.sum())
    if total == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over all ranks")
    global_mean = (counts * means).sum(0) / total
    global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)
    return total, global_mean, global_m2 / total


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalization with statistics shared across ranks; backward all-reduces the two gradient sums."""

    @staticmethod
    def forward(ctx, x: Tensor, weight, bias, running_mean, running_var, eps: float, momentum: float, group, activation):
        xc, perm = L.dense(x)
        shape = L.per_channel_view(x, perm is not None)
        acc = stats_dtype(x.dtype)
        total, mean64, var64 = _global_moments(xc.view(shape), group)
        c = mean64.numel()
        mean = mean64.to(acc).view(1, 1, c)
        rstd = torch.rsqrt(var64 + eps).to(acc).view(1, 1, c)
        if running_mean is not None and total:
            blend_running(running_mean, mean64, momentum)
        if running_var is not None and total:
            blend_running(running_var, var64, momentum, _bessel(total))
        pshape = L.param_shape(shape, False, False)
        y = normalize_fixed(xc, shape, mean, rstd, weight, bias, activation, param_shape=pshape)
        ctx.save_for_backward(xc, mean, rstd, weight, bias)
        ctx.shape, ctx.perm, ctx.total, ctx.group, ctx.activation = shape, perm, total, group, activation
        ctx.bias_dtype = None if bias is None else bias.dtype
        return unviewed(L.restore(y, perm))  # a channels-last output is a permuted view: in-place ops follow

    @staticmethod
    def backward(ctx, dy: Tensor):
        xc, mean, rstd, weight, bias = ctx.saved_tensors
        shape, acc = ctx.shape, mean.dtype
        if ctx.perm is not None:
            dy = dy.permute(ctx.perm)
        dy5 = dy.contiguous().view(shape).to(acc)
        xhat = normalize_fixed(xc.to(acc), shape, mean, rstd, None, None).view(shape)
        if ctx.activation is not None:
            z = xhat if weight is None else xhat * weight.to(acc).view(1, 1, 1, -1, 1)
            z = z if bias is None else z + bias.to(acc).view(1, 1, 1, -1, 1)
            dy5 = act.backward(ctx.activation, z, dy5)
        sums = torch.stack([dy5.sum((0, 1, 2, 4)), (dy5 * xhat).sum((0, 1, 2, 4))])
        dbias, dweight = sums[0].clone(), sums[1].clone()
        dx = None
        if ctx.needs_input_grad[0]:
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xhat = (s.view(1, 1, 1, -1, 1) / ctx.total for s in sums)
            scale = rstd.view(1, 1, 1, -1, 1)
            if weight is not None:
                scale = scale * weight.to(acc).view(1, 1, 1, -1, 1)
            dx = L.restore(((dy5 - mean_dy - xhat * mean_dy_xhat) * scale).to(xc.dtype).view(xc.shape), ctx.perm)
        dw = dweight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = dbias.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None


class SyncBatchNorm(NormBase, _BatchNorm):
    """BatchNorm whose training statistics span every rank of ``process_group``, as ``torch.nn.SyncBatchNorm``.

    Unlike torch's, it runs on CPU (gloo) as well as GPU, and ranks may hold different batch sizes,
    including none. Eval mode and a world of one rank use ``normkit.functional.batch_norm`` locally.
    It is a torch BatchNorm (``_BatchNorm``) but not a ``torch.nn.SyncBatchNorm``, which
    DistributedDataParallel refuses on the CPU.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _group(self) -> Any | None:
        """The process group to synchronise over, or None when there is nothing to synchronise."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` as in ``normkit.functional.batch_norm``, where the statistics are local (eval mode,
        one rank); across ranks it is refused rather than ignored."""
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        return self._normalize_synced(input, mask, None)

    def _normalize_synced(self, input: Tensor, mask: Tensor | None, activation: str | None) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        group = self._group()
        if group is None:
            use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
            return batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps, mask,
                activation,
            )
        if mask is not None:
            raise NotImplementedError("SyncBatchNorm: mask= is not supported with statistics across ranks")
        check_batch_norm(input, running_mean, running_var, self.weight, self.bias, True, self.eps)
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group, activation
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any | None = None) -> torch.nn.Module:
        """Replace every BatchNorm*D layer of ``module`` by a SyncBatchNorm sharing its parameters and buffers."""
        from .convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)


class SyncBatchNormAct2d(NormAct, SyncBatchNorm):
    """SyncBatchNorm followed by an activation, for 4-D input: what ``normkit.convert.convert_sync_batchnorm``
    makes of a BatchNormAct2d (torch's converter turns it into a plain SyncBatchNorm, dropping the
    activation). Arguments of SyncBatchNorm plus ``act_layer`` as in BatchNormAct2d; same state_dict keys."""

    def __init__(self, num_features: int, *args, act_layer: ActLayer = "relu", **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self._set_act(act_layer)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        return self.act(self._normalize_synced(input, mask, self.activation))


__all__ = ["SyncBatchNorm", "SyncBatchNormAct2d"]
