"""BatchNormAct2d and GroupNormAct: a norm and its activation as one layer (timm's norm_act pattern).

Con answered: BatchNorm and LayerNorm cost compute, and a separate activation layer is one more
pass over the activations and one more module to wire. Here the activation is applied to the
norm's output, composed rather than fused: the core has no epilogue hook, and its outputs cannot be
modified in place under autograd. State_dict keys are those of BatchNorm2d / GroupNorm, so checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as TF

from ..batchnorm import _BatchNorm
from ..normalization import GroupNorm


def _identity(y: Tensor) -> Tensor:
    return y


_ACTS: dict[str, Callable[[Tensor], Tensor]] = {"relu": TF.relu, "silu": TF.silu, "gelu": TF.gelu, "identity": _identity}
ActLayer = str | type[nn.Module] | None


def make_act(act_layer: ActLayer) -> Callable[[Tensor], Tensor]:
    """The activation named by ``act_layer`` ("relu", "silu", "gelu", "identity"/None, or a module class)."""
    if act_layer is None:
        return _ACTS["identity"]
    if isinstance(act_layer, str):
        key = act_layer.lower()
        if key not in _ACTS:
            raise ValueError(f"unknown activation {act_layer!r}; valid: {', '.join(_ACTS)}, None or a module class")
        return _ACTS[key]
    return act_layer()


class BatchNormAct2d(_BatchNorm):
    """BatchNorm2d followed by an activation (default ReLU); arguments of BatchNorm2d plus ``act_layer``."""

    _dims = (4,)

    def __init__(self, num_features: int, *args, act_layer: ActLayer = "relu", **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.act_name = act_layer if isinstance(act_layer, str) or act_layer is None else act_layer.__name__
        self.act = make_act(act_layer)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.act(super().forward(input, mask))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_layer={self.act_name}"


class GroupNormAct(GroupNorm):
    """GroupNorm followed by an activation (default ReLU); arguments of GroupNorm plus ``act_layer``."""

    def __init__(self, num_groups: int, num_channels: int, *args, act_layer: ActLayer = "relu", **kwargs) -> None:
        super().__init__(num_groups, num_channels, *args, **kwargs)
        self.act_name = act_layer if isinstance(act_layer, str) or act_layer is None else act_layer.__name__
        self.act = make_act(act_layer)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.act(super().forward(input, mask))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_layer={self.act_name}"


__all__ = ["BatchNormAct2d", "GroupNormAct", "make_act"]
