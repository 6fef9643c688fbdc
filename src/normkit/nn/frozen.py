"""FrozenBatchNorm2d: BatchNorm with fixed statistics and affine, as torchvision and detectron2 define it.

Fine-tuning detectors and segmenters at a few images per GPU makes batch statistics useless, so the
pretrained ones are frozen. Everything is a buffer (``weight``, ``bias``, ``running_mean``,
``running_var``), so checkpoints of torchvision's and detectron2's ``FrozenBatchNorm2d`` load with
``strict=True``, and BatchNorm checkpoints too (their ``num_batches_tracked`` is dropped).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Proxy
from torch.nn import Module

from .. import functional as F
from ._base import fx_node


class FrozenBatchNorm2d(Module):
    """BatchNorm2d in permanent eval mode: ``y = (x − running_mean) / sqrt(running_var + eps) · weight + bias``.

    ``eps`` defaults to 1e-5 and is added inside the square root, as in torchvision since it stopped
    ignoring ``eps``, so a converted BatchNorm2d gives the same outputs as the original in eval mode.
    Keeps the input's memory format (channels_last stays channels_last).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory_kwargs))
        self.register_buffer("bias", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Proxy):
            return fx_node(self, x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


__all__ = ["FrozenBatchNorm2d"]
