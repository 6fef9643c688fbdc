"""BatchNorm1d/2d/3d: torch.nn's modules on normkit's core."""

from __future__ import annotations

from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.modules import batchnorm as torch_batchnorm

from .. import functional as F
from ._base import NormBase, check_dims, fx_node


class _BatchNorm(NormBase, torch_batchnorm._BatchNorm):
    _dims: tuple[int, ...] = ()

    def _check_input_dim(self, input: Tensor) -> None:
        check_dims(input, self._dims)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (bool, True = valid) keeps padding out of the batch and running statistics."""
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        return self._normalize(input, mask, None)

    def _normalize(self, input: Tensor, mask: Tensor | None, activation: str | None) -> Tensor:
        """torch's BatchNorm forward (running-stat bookkeeping included), ending in ``activation``. Each
        buffer and parameter is read once: every read goes through ``Module.__getattr__``."""
        self._check_input_dim(input)
        training, momentum = self.training, self.momentum
        factor = 0.0 if momentum is None else momentum
        if training and self.track_running_stats:
            tracked = self.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
                factor = 1.0 / float(tracked) if momentum is None else momentum
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = training or (running_mean is None and running_var is None)
        track = not training or self.track_running_stats
        return F.batch_norm(
            input,
            running_mean if track else None,
            running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            mask,
            activation,
        )


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch normalization over a 2D or 3D input, as ``torch.nn.BatchNorm1d``."""

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch normalization over a 4D input, as ``torch.nn.BatchNorm2d``; keeps channels_last."""

    _dims = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch normalization over a 5D input, as ``torch.nn.BatchNorm3d``; keeps channels_last_3d."""

    _dims = (5,)
