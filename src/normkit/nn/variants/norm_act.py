"""BatchNormAct2d and GroupNormAct: a norm and its activation as one layer (timm's norm_act pattern).

Con answered: BatchNorm and LayerNorm cost compute, and a separate activation layer is one more
pass over the activations, one more tensor kept for backward and one more module to wire. A named
activation ("relu", "silu", "gelu") goes through the core's epilogue: fused into the kernels where
the backend can, and in every case backward keeps only the norm's input. A module class (or an
instance) is composed after the norm. State_dict keys are those of BatchNorm2d / GroupNorm, so checkpoints load
unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.fx import Proxy

from ... import functional as F
from ...kernels.contract import ACTIVATIONS
from .._base import fx_node
from ..batchnorm import _BatchNorm
from ..normalization import GroupNorm
from ._checks import check_count

ActLayer = str | type[nn.Module] | nn.Module | None


class NormAct:
    """A norm followed by its activation (the converters leave such layers whole). Splits ``act_layer``
    into the core's epilogue (a name) or a module applied afterwards."""

    def _set_act(self, act_layer: ActLayer) -> None:
        if isinstance(act_layer, nn.Module):
            self.activation, self.act, self.act_name = None, act_layer, type(act_layer).__name__
            return
        if act_layer is not None and not isinstance(act_layer, str):
            self.activation, self.act, self.act_name = None, act_layer(), act_layer.__name__
            return
        name = None if act_layer is None or act_layer.lower() == "identity" else act_layer.lower()
        if name is not None and name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act_layer!r}; valid: {', '.join(ACTIVATIONS)}, identity, None, a module class or instance")
        self.activation, self.act, self.act_name = name, nn.Identity(), name or "identity"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_layer={self.act_name}"


class BatchNormAct2d(NormAct, _BatchNorm):
    """BatchNorm2d followed by an activation (default ReLU); arguments of BatchNorm2d plus ``act_layer``.

    A BatchNorm to ``isinstance``: torch's ``SyncBatchNorm.convert_sync_batchnorm`` turns it into a plain
    SyncBatchNorm and so drops the activation; ``normkit.convert.convert_sync_batchnorm`` turns it into
    ``normkit.nn.SyncBatchNormAct2d``, which keeps it.
    """

    _dims = (4,)

    def __init__(self, num_features: int, *args, act_layer: ActLayer = "relu", **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self._set_act(act_layer)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        return self.act(self._normalize(input, mask, self.activation))


class GroupNormAct(NormAct, GroupNorm):
    """GroupNorm followed by an activation (default ReLU); arguments of GroupNorm plus ``act_layer``."""

    def __init__(self, num_groups: int, num_channels: int, *args, act_layer: ActLayer = "relu", **kwargs) -> None:
        super().__init__(check_count(num_groups, "num_groups"), num_channels, *args, **kwargs)
        self._set_act(act_layer)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        y = F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, mask, self.activation)
        return self.act(y)


__all__ = ["BatchNormAct2d", "GroupNormAct"]
