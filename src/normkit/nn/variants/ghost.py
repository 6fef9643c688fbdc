"""GhostBatchNorm (Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017).

Con answered: with large batches BatchNorm's statistics become too smooth (the regularizing noise of
small batches disappears) and generalization drops; data-parallel training also ties the statistics
to the per-device batch. Ghost BatchNorm normalizes each virtual ("ghost") sub-batch of
``ghost_batch_size`` samples with its own statistics, whatever the real batch size.

On the core it is a view: ``(N/g, 1, g, C, S)`` (channels_last ``(N/g, 1, g·S, C, 1)``) takes
statistics per (ghost batch, channel). A batch not divisible by ``g`` ends with a smaller ghost batch
(merged into the previous one when it would hold a single value per channel). Running statistics
move once per step towards the size-weighted average of the ghost batches' mean and unbiased
variance, so ``ghost_batch_size >= N`` is exactly BatchNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Proxy

from ...functional import _layout as L
from ...functional._core import normalize_batch
from ...functional.norms import check_floating
from ...kernels.contract import blend_running
from .._base import fx_node
from ..batchnorm import _BatchNorm
from ._checks import check_count


class GhostBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) inputs with statistics per ghost batch of ``ghost_batch_size`` samples."""

    _dims = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        ghost_batch_size: int = 32,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.ghost_batch_size = check_count(ghost_batch_size, "ghost_batch_size")

    def _sizes(self, n: int, per_sample: int) -> tuple[int, int]:
        """(number of full ghost batches, samples after them) — a single-value remainder joins the last batch."""
        g = self.ghost_batch_size
        k, rem = divmod(n, g)
        if rem and rem * per_sample == 1:
            return k - 1, g + rem
        return k, rem

    def forward(self, input: Tensor) -> Tensor:
        """Ghost-batch statistics in training; BatchNorm with the running statistics in evaluation."""
        if isinstance(input, Proxy):
            return fx_node(self, input)
        if not self.training or input.dim() < 2 or input.shape[0] <= self.ghost_batch_size or input.numel() == 0:
            return super().forward(input)
        self._check_input_dim(input)
        check_floating(input, "batch_norm")
        c, per_sample = input.shape[1], L.spatial(input)
        for t, name in ((self.running_mean, "running_mean"), (self.weight, "weight")):
            if t is not None and t.numel() != c:  # batch_norm's order and words
                raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        g = self.ghost_batch_size
        if g * per_sample == 1:
            raise ValueError(
                f"Expected more than 1 value per channel in each ghost batch of {g}, got input size {input.size()}"
            )
        n = input.shape[0]
        k, _ = self._sizes(n, per_sample)
        outputs, means, variances = [], [], []
        for chunk, batches in ((input[: k * g], k), (input[k * g :], 1)):
            if chunk.shape[0] == 0:
                continue
            xc, perm = L.dense(chunk)
            rows = chunk.shape[0] // batches
            shape = [batches, 1, rows * per_sample, c, 1] if perm is not None else [batches, 1, rows, c, per_sample]
            ps = L.param_shape(shape, False, False)
            y, st = normalize_batch(xc, shape, self.weight, self.bias, self.eps, param_shape=ps)
            count = rows * per_sample
            outputs.append(L.restore(y, perm))
            # each ghost batch's share of the batch (rows / n) applied first: a variance near 1e38 that fits
            # float32 overflowed when multiplied by its sample count before the division
            means.append(st.mean.detach().view(batches, c) * (rows / n))
            variances.append(st.var.detach().view(batches, c) * (rows * count / ((count - 1) * n)))
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            blend_running(self.running_mean, torch.cat(means).sum(0), factor)
            blend_running(self.running_var, torch.cat(variances).sum(0), factor)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


__all__ = ["GhostBatchNorm"]
