"""WSConv2d: weight standardization (Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization", 2019).

Con answered: GroupNorm is batch-independent but trails large-batch BatchNorm. Standardizing each
output filter's weights, ``Ŵ = (W − mean(W)) / sqrt(var(W) + ε)`` over (in, kh, kw), smooths the
loss landscape; GroupNorm + WS closes the gap to large-batch BatchNorm at one or two images per device.

On the core: ``Ŵ`` is ``layer_norm`` of the weight viewed as (out, in·kh·kw), differentiable, so
the filters train through it. ``weight_standardize`` turns a model's Conv2d layers into WSConv2d.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.fx import Proxy

from ... import functional as F
from .._base import fx_node


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with standardized weights; same arguments plus ``eps``, same state_dict."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        w = self.weight.reshape(self.weight.shape[0], -1)
        return F.layer_norm(w, (w.shape[1],), eps=self.eps).view_as(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):  # else the standardized weight would enter the graph as a constant
            return fx_node(self, input)
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


def weight_standardize(model: nn.Module, eps: float = 1e-5) -> nn.Module:
    """Turn every plain ``nn.Conv2d`` of ``model`` into ``WSConv2d``, in place, sharing its parameters.

    Pair it with ``replace_norm(model, "gn")`` for GroupNorm + WS. Returns the model (or the new
    layer when the model itself is a Conv2d).
    """
    from ...convert import _twin, _walk

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        return _twin(module, WSConv2d, eps=eps) if type(module) is nn.Conv2d else None

    return _walk(model, swap)


__all__ = ["WSConv2d", "weight_standardize"]
