"""Adversarial inputs for normalization and the error bound normkit guarantees on them.

Each case is float32 input; the truth is the same layer computed in float64 from that input. The
bound on the max abs error of the normalized output is ``1e-5 + 4 * eps32 * |mean| / std``, the
best a float32-stored mean allows (RMSNorm: ``1e-5``); constant groups must give exactly beta (0 here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Case:
    name: str
    mean: float
    std: float  # 0 marks a constant input
    long: bool = False  # one long reduction instead of a batch of groups

    def make(self, shape: tuple[int, ...], seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        return (self.mean + self.std * noise).to(torch.float32)

    def bound(self, layer: str) -> float:
        """Allowed max abs error; RMSNorm does not centre, so an offset costs it no precision."""
        if layer == "RMSNorm":
            return 1e-5
        return 0.0 if self.std == 0 else 1e-5 + 4 * EPS32 * abs(self.mean) / self.std


CASES = [
    Case("offset mean 1e4, std 1", 1e4, 1.0),
    *(Case(f"constant {c:g}", c, 0.0) for c in (1.0, 1e4, 1e7, 1e8, -3e12, 1e30)),
    *(Case(f"scale {s:g}", 0.0, s) for s in (1e10, 1e20, 1e30)),
    Case("long reduction 2^24 of 1+1e-3 noise", 1.0, 1e-3, long=True),
]

LONG = 1 << 24

# name -> (builder(nn namespace), input shape, memory formats)
LAYERS: dict[str, tuple[Callable[[ModuleType], torch.nn.Module], tuple[int, ...], tuple[str, ...]]] = {
    "BatchNorm2d": (lambda nn: nn.BatchNorm2d(8), (4, 8, 16, 16), ("contiguous", "channels_last")),
    "InstanceNorm2d": (lambda nn: nn.InstanceNorm2d(8), (4, 8, 16, 16), ("contiguous", "channels_last")),
    "GroupNorm": (lambda nn: nn.GroupNorm(4, 8), (4, 8, 16, 16), ("contiguous", "channels_last")),
    "LayerNorm": (lambda nn: nn.LayerNorm([8, 16, 16]), (4, 8, 16, 16), ("contiguous",)),
    "RMSNorm": (lambda nn: nn.RMSNorm([8, 16, 16]), (4, 8, 16, 16), ("contiguous",)),
}
LONG_LAYERS: dict[str, Callable[[ModuleType], torch.nn.Module]] = {
    "LayerNorm": lambda nn: nn.LayerNorm(LONG),
    "RMSNorm": lambda nn: nn.RMSNorm(LONG),
    "GroupNorm": lambda nn: nn.GroupNorm(1, 1),
}


def applies(layer: str, case: Case) -> bool:
    return layer in LONG_LAYERS if case.long else True


def _input(layer: str, case: Case, layout: str) -> Tensor:
    if case.long:
        shape = (1, 1, LONG) if layer == "GroupNorm" else (1, LONG)
        return case.make(shape)
    x = case.make(LAYERS[layer][1])
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _build(layer: str, case: Case, nn: ModuleType, dtype: torch.dtype) -> torch.nn.Module:
    factory = LONG_LAYERS[layer] if case.long else LAYERS[layer][0]
    return factory(nn).to(dtype)


def max_error(layer: str, case: Case, layout: str, nn: ModuleType, device: str = "cpu") -> float:
    """Max abs error of ``nn``'s layer on the float32 input (on ``device``) against torch.nn's layer
    in float64 on the CPU."""
    x = _input(layer, case, layout)
    with torch.no_grad():
        truth = _build(layer, case, torch.nn, torch.float64)(x.double())
        if case.std == 0 and layer != "RMSNorm":
            truth = torch.zeros_like(truth)  # exactly beta: the float64 layer itself may miss it
        y = _build(layer, case, nn, torch.float32).to(device)(x.to(device)).double().cpu()
    finite = torch.isfinite(truth)
    if not bool(finite.all()):
        raise ValueError(f"float64 result of {layer} on {case.name} is not finite")
    err = (y - truth).abs().max().item()
    return math.inf if math.isnan(err) else err
