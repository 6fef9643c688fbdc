"""Variants that answer the cons of the classic norms, each a view, a statistics source or a thin
wrapper over the shared core. ``FrozenBatchNorm2d`` and ``LayerNorm2d`` live in ``normkit.nn``.

``factory(spec)`` maps the variant names of ``normkit.convert.get_norm_layer`` to layer factories.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from ..normalization import GroupNorm
from .adain import AdaptiveInstanceNorm
from .evonorm import EvoNormB0, EvoNormS0
from .ghost import GhostBatchNorm
from .groups import auto_groups, divisors, sweep_groups
from .norm_act import BatchNormAct2d, GroupNormAct
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .switchable import SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d
from .ws import WSConv2d, weight_standardize

CHANNEL_VARIANTS: tuple[type[nn.Module], ...] = (
    BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, GhostBatchNorm, SwitchableNorm1d, SwitchableNorm2d,
    SwitchableNorm3d, EvoNormS0, EvoNormB0,
)
SPECS: dict[str, Callable[..., nn.Module]] = {
    "brn": BatchRenorm2d,
    "brn1d": BatchRenorm1d,
    "brn2d": BatchRenorm2d,
    "brn3d": BatchRenorm3d,
    "sn": SwitchableNorm2d,
    "sn1d": SwitchableNorm1d,
    "sn2d": SwitchableNorm2d,
    "sn3d": SwitchableNorm3d,
    "evos0": EvoNormS0,
    "evob0": EvoNormB0,
}
SPEC_NAMES = (*SPECS, "gbn", "gbn:<size>", "gn:auto", "bnact[:relu|silu|gelu]", "gnact[<G>][:relu|silu|gelu]")
_GHOST = re.compile(r"gbn(?::?(\d+))?")
_ACT = re.compile(r"(bn|gn)act(\d+)?(?::(\w+))?")


def _partial(cls: type[nn.Module], name: str, **fixed: Any) -> Callable[..., nn.Module]:
    def make(num_channels: int, **kwargs: Any) -> nn.Module:
        return cls(num_channels, **{**fixed, **kwargs})

    make.__name__ = name
    return make


def _auto_group_norm(num_channels: int, **kwargs: Any) -> nn.Module:
    return GroupNorm(auto_groups(num_channels), num_channels, **kwargs)


def _group_norm_act(groups: int | None, act: str) -> Callable[..., nn.Module]:
    def make(num_channels: int, **kwargs: Any) -> nn.Module:
        count = auto_groups(num_channels) if groups is None else groups
        return GroupNormAct(count, num_channels, act_layer=act, **kwargs)

    make.__name__ = f"gnact{'' if groups is None else groups}:{act}"
    return make


def factory(key: str) -> Callable[..., nn.Module] | None:
    """The layer factory for a variant spec (lower case, stripped), or None when ``key`` names none.

    ``brn`` (= ``brn2d``), ``brn1d``, ``brn3d``, ``gbn`` (ghost batches of 32), ``gbn:16``, ``sn`` (=
    ``sn2d``), ``sn1d``, ``sn3d``,
    ``evos0``, ``evob0``, ``gn:auto`` (``auto_groups``), ``bnact`` / ``bnact:silu``, ``gnact`` /
    ``gnact16:gelu`` (activation default relu, groups default ``auto_groups``).
    """
    if key in SPECS:
        return SPECS[key]
    if key in ("gn:auto", "gnauto"):
        return _auto_group_norm
    ghost = _GHOST.fullmatch(key)
    if ghost:
        return _partial(GhostBatchNorm, key, ghost_batch_size=int(ghost.group(1) or 32))
    act = _ACT.fullmatch(key)
    if act:
        kind, groups, name = act.group(1), act.group(2), act.group(3) or "relu"
        if kind == "bn":
            return None if groups else _partial(BatchNormAct2d, key, act_layer=name)
        return _group_norm_act(int(groups) if groups else None, name)
    return None


__all__ = [
    "AdaptiveInstanceNorm",
    "BatchNormAct2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "EvoNormB0",
    "EvoNormS0",
    "GhostBatchNorm",
    "GroupNormAct",
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "SwitchableNorm3d",
    "WSConv2d",
    "auto_groups",
    "divisors",
    "factory",
    "sweep_groups",
    "weight_standardize",
]
