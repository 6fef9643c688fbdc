"""Take over an existing model: swap its norm layers, change their kind, sync, freeze or fold them.

Every converter works in place on the model's submodules and returns the model (or the replacement
when the model itself is a norm layer), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
A module object that appears several times in the model is converted once and stays shared.

Parameter policy:

- ``to_normkit``, ``to_torch`` and ``convert_sync_batchnorm`` keep the *same* Parameter and buffer
  objects (no copy): weight tying, optimizers already built on the parameters, hooks, training mode,
  device, dtype and memory format all carry over. The new layer takes over the very hook dicts of the
  old one, so a handle returned before the conversion still removes its hook.
- ``replace_norm`` builds new layers; it copies ``weight``, ``bias``, ``running_mean`` and
  ``running_var`` from the old layer when the new one has a tensor of the same shape (a pretrained
  model keeps its learned per-channel scale and shift) and leaves the rest at the new layer's
  defaults (weight 1, bias 0, running mean 0, running var 1). It is placed on the old layer's device
  and dtype, or, when the old layer holds no floating-point tensor, on those of its nearest enclosing
  module that does.
- ``freeze_batchnorm`` copies parameters and statistics into buffers of ``FrozenBatchNorm2d``.
- ``fuse_conv_bn_eval`` replaces each folded Conv/Linear by a new module with fused parameters and
  the BatchNorm by ``nn.Identity``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn
from torch.nn.modules.module import _WrappedHook

from . import nn as nk
from .distributed import SyncBatchNorm, SyncBatchNormAct2d
from .nn.frozen import FrozenBatchNorm2d
from .nn.layernorm2d import LayerNorm2d
from .nn.variants import CHANNEL_VARIANTS, SPEC_NAMES, BatchNormAct2d
from .nn.variants import factory as _variant_factory
from .nn.variants.norm_act import NormAct

NormFactory = Callable[..., nn.Module]

_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nk.BatchNorm1d,
    nn.BatchNorm2d: nk.BatchNorm2d,
    nn.BatchNorm3d: nk.BatchNorm3d,
    nn.InstanceNorm1d: nk.InstanceNorm1d,
    nn.InstanceNorm2d: nk.InstanceNorm2d,
    nn.InstanceNorm3d: nk.InstanceNorm3d,
    nn.GroupNorm: nk.GroupNorm,
    nn.LayerNorm: nk.LayerNorm,
    nn.RMSNorm: nk.RMSNorm,
    nn.SyncBatchNorm: SyncBatchNorm,
}
_TORCH_TWINS = {v: k for k, v in _TWINS.items()}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d)
_CHANNEL_NORMS = (
    *_BATCHNORMS,
    nn.SyncBatchNorm, SyncBatchNorm, FrozenBatchNorm2d, LayerNorm2d, nn.GroupNorm, nk.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nk.InstanceNorm1d, nk.InstanceNorm2d, nk.InstanceNorm3d,
    *CHANNEL_VARIANTS,
)
_FOLDABLE = (*_BATCHNORMS, nn.SyncBatchNorm, SyncBatchNorm, FrozenBatchNorm2d)
_NORMKIT_LAYERS = tuple(
    cls for cls in (getattr(nk, name) for name in nk.__all__) if isinstance(cls, type) and issubclass(cls, nn.Module)
)
_NORMKIT_ONLY = tuple(cls for cls in _NORMKIT_LAYERS if cls not in _TORCH_TWINS)
# What torch.nn.SyncBatchNorm.convert_sync_batchnorm converts (any torch.nn BatchNorm), and normkit's counterparts.
_SYNCABLE = (nn.modules.batchnorm._BatchNorm, nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d, SyncBatchNorm)


def _folds(norm: nn.Module) -> bool:
    """Whether ``norm`` in eval mode is an affine map per channel that a Conv/Linear can take in: a
    BatchNorm, not one followed by its activation (SyncBatchNormAct2d)."""
    return isinstance(norm, _FOLDABLE) and not isinstance(norm, NormAct)


class UnsupportedNormWarning(UserWarning):
    """A layer that looks like a normalization has no normkit twin and was left as it is."""


def _walk(model: nn.Module, swap: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace each module for which ``swap(qualified_name, module)`` returns a module, and recurse into the
    original's children, as torch's ``convert_sync_batchnorm`` does: a replaced layer's submodules are
    converted too where the replacement holds them (a twin), and a freshly built replacement's own children
    (a factory's norm + activation) are left as built. A module met twice is replaced once, by the same
    object. The originals stay referenced until the walk ends: keyed by ``id``, a freed original's address
    could be reused by a module built later, which would then be taken for it."""
    done: dict[int, tuple[nn.Module, nn.Module]] = {}

    def visit(name: str, module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)][1]
        new = swap(name, module)
        if new is None:
            new = module
        done[id(module)] = (module, new)
        for child_name, child in list(module._modules.items()):
            if child is not None and new._modules.get(child_name) is child:
                replacement = visit(f"{name}.{child_name}" if name else child_name, child)
                if replacement is not child:
                    setattr(new, child_name, replacement)
        return new

    return visit("", model)


def _twin(module: nn.Module, cls: type[nn.Module], **attrs: Any) -> nn.Module:
    """An instance of ``cls`` holding ``module``'s state: same Parameter and buffer objects, hooks, mode.

    The hook dicts are the old module's own objects, not copies: a ``RemovableHandle`` removes its hook
    from the dict it was registered in. Hooks registered with the module bound (load_state_dict pre
    hooks) are rebound to the new module, which they would otherwise reach through a dead reference.
    """
    new = cls.__new__(cls)
    state = {
        k: copy.copy(v) if isinstance(v, (dict, set)) and "_hooks" not in k else v for k, v in vars(module).items()
    }
    object.__setattr__(new, "__dict__", {**state, **attrs})
    for hook in new._load_state_dict_pre_hooks.values():
        if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is module:
            hook.module = weakref.ref(new)
    return new


def _looks_like_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ or isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))


def _swap_classes(model: nn.Module, table: dict[type[nn.Module], type[nn.Module]], known: tuple[type, ...], who: str) -> nn.Module:
    skipped: list[str] = []

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        cls = table.get(type(module))
        if cls is not None:
            return _twin(module, cls)
        if _looks_like_norm(module) and type(module) not in known:
            skipped.append(f"{name or '<model>'} ({type(module).__name__})")
        return None

    result = _walk(model, swap)
    if skipped:
        warnings.warn(
            f"{who}: left {len(skipped)} normalization layer(s) it has no twin for untouched: {', '.join(skipped)}",
            UnsupportedNormWarning,
            stacklevel=3,
        )
    return result


def to_normkit(model: nn.Module) -> nn.Module:
    """Swap every torch.nn norm layer for its normkit twin, sharing its parameters and buffers.

    Only exact torch.nn classes are swapped: a subclass may override ``forward``. Layers that look
    like norms but have no twin (custom norms, subclasses) stay as they are, with an
    ``UnsupportedNormWarning`` naming them.
    """
    return _swap_classes(model, _TWINS, (*_TORCH_TWINS, *_NORMKIT_ONLY), "to_normkit")


def to_torch(model: nn.Module) -> nn.Module:
    """Swap every normkit norm layer back to torch.nn, sharing its parameters and buffers.

    ``FrozenBatchNorm2d`` and ``LayerNorm2d`` have no torch.nn twin and stay, with a warning.
    """
    return _swap_classes(model, _TORCH_TWINS, tuple(_TWINS), "to_torch")


_SPECS: dict[str, Callable[..., nn.Module]] = {
    "bn": nk.BatchNorm2d,
    "bn1d": nk.BatchNorm1d,
    "bn2d": nk.BatchNorm2d,
    "bn3d": nk.BatchNorm3d,
    "syncbn": SyncBatchNorm,
    "frozenbn": FrozenBatchNorm2d,
    "ln": nk.LayerNorm,
    "ln2d": LayerNorm2d,
    "in": nk.InstanceNorm2d,
    "in1d": nk.InstanceNorm1d,
    "in2d": nk.InstanceNorm2d,
    "in3d": nk.InstanceNorm3d,
    "rms": nk.RMSNorm,
    "none": nn.Identity,
}
_GROUPS = re.compile(r"gn(?::?(\d+))?")
_GROUP_NORMS = (nn.GroupNorm, nk.GroupNorm)


def _valid_specs() -> str:
    return ", ".join([*_SPECS, "gn", "gn<G>", "gn:<G>", *SPEC_NAMES]) + ", None, a norm class or a callable taking num_channels"


def _group_norm(groups: int) -> NormFactory:
    def make(num_channels: int, **kwargs: Any) -> nn.Module:
        return nk.GroupNorm(groups, num_channels, **kwargs)

    make.__name__ = f"gn{groups}"
    return make


def get_norm_layer(spec: str | type[nn.Module] | NormFactory | None) -> NormFactory:
    """A factory ``make(num_channels, **kwargs) -> nn.Module`` for a norm named by ``spec``.

    Strings (case-insensitive): ``bn`` (= ``bn2d``), ``bn1d``, ``bn2d``, ``bn3d``, ``syncbn``,
    ``frozenbn``, ``ln`` (over the last dim), ``ln2d`` (over channels of (N, C, *)), ``in`` (= ``in2d``),
    ``in1d``, ``in2d``, ``in3d``, ``gn`` (32 groups), ``gn32``, ``gn:16``, ``rms``, ``none``, and the
    variants of ``normkit.nn.variants.factory`` (``brn``, ``gbn:16``, ``sn``, ``evos0``, ``evob0``,
    ``gn:auto``, ``bnact:silu``, ``gnact``, …). ``None``
    means ``none``. A GroupNorm class gets 32 groups unless ``num_groups`` is passed; other classes
    and callables are called as ``spec(num_channels, **kwargs)``.
    """
    if spec is None:
        return nn.Identity
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise TypeError(f"norm layer class must be an nn.Module subclass, got {spec!r}")
        if issubclass(spec, _GROUP_NORMS):
            return functools.partial(_class_group_norm, spec)
        return spec
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"unknown norm layer spec {spec!r}; valid specs: {_valid_specs()}")
    key = spec.strip().lower()
    if key in _SPECS:
        return _SPECS[key]
    variant = _variant_factory(key)
    if variant is not None:
        return variant
    match = _GROUPS.fullmatch(key)
    if match:
        groups = int(match.group(1) or 32)
        if groups < 1:
            raise ValueError(f"norm layer spec {spec!r} asks for {groups} groups; the number of groups must be positive")
        return _group_norm(groups)
    raise ValueError(f"unknown norm layer spec {spec!r}; valid specs: {_valid_specs()}")


def _class_group_norm(cls: type[nn.Module], num_channels: int, num_groups: int = 32, **kwargs: Any) -> nn.Module:
    return cls(num_groups, num_channels, **kwargs)


def _num_channels(module: nn.Module) -> int:
    if isinstance(module, (nn.GroupNorm, nk.GroupNorm)):
        return module.num_channels
    if isinstance(module, LayerNorm2d):
        return module.normalized_shape[0]
    return module.num_features


def _floating_tensor(module: nn.Module) -> torch.Tensor | None:
    return next((t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()), None)


def _placement(model: nn.Module, name: str) -> torch.Tensor | None:
    """A floating-point tensor of the module at ``name``, else of its nearest enclosing module that has one.

    A layer without one (InstanceNorm, non-affine GroupNorm) says nothing of where the model lives.
    """
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        ref = _floating_tensor(model.get_submodule(".".join(parts[:depth])))
        if ref is not None:
            return ref
    return None


def _carry_state(old: nn.Module, new: nn.Module, like: torch.Tensor | None) -> None:
    """Copy the per-channel tensors both layers have, with the same shape (a parameter with its
    ``requires_grad``: a frozen layer stays frozen); put ``new`` on ``like``'s device and dtype."""
    if like is not None:
        new.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                if isinstance(dst, nn.Parameter):
                    dst.requires_grad_(src.requires_grad)
    new.train(old.training)


def replace_norm(
    model: nn.Module, spec: str | type[nn.Module] | NormFactory | None, **kwargs: Any
) -> nn.Module:
    """Change the kind of every channel norm (BatchNorm, SyncBatchNorm, FrozenBatchNorm2d, InstanceNorm,
    GroupNorm, LayerNorm2d, the normkit variants, torch.nn or normkit) to ``spec`` — e.g. BatchNorm → GroupNorm for small batches.

    The new layer is ``get_norm_layer(spec)(num_channels, **kwargs)`` on the old one's device and dtype,
    initialised as the module docstring describes. LayerNorm and RMSNorm over trailing dims and the
    norm+activation layers (BatchNormAct2d, GroupNormAct, SyncBatchNormAct2d) are left alone.
    Raises ValueError naming the layer when it cannot be built (e.g. channels not divisible by groups).
    """
    make = get_norm_layer(spec)

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, _CHANNEL_NORMS) or isinstance(module, NormAct):
            return None
        channels = _num_channels(module)
        try:
            new = make(channels, **kwargs)
        except (ValueError, RuntimeError) as err:
            raise ValueError(
                f"replace_norm: cannot replace layer {name or '<model>'!r} ({type(module).__name__}, "
                f"{channels} channels) by {spec!r}: {err}"
            ) from err
        _carry_state(module, new, _placement(model, name))
        return new

    return _walk(model, swap)


def convert_sync_batchnorm(model: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Swap every BatchNorm for normkit's SyncBatchNorm over ``process_group``.

    As in ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, any instance of torch.nn's BatchNorm
    base class is converted, subclasses and SyncBatchNorm included (an overridden ``forward`` is not
    kept); so are normkit's BatchNorm1d/2d/3d and SyncBatchNorm and their subclasses. BatchNormAct2d
    becomes SyncBatchNormAct2d with the same activation (torch's converter makes it a plain
    SyncBatchNorm and drops the activation). normkit's other variants built on BatchNorm (BatchRenorm,
    GhostBatchNorm) compute something else and stay. Parameters and buffers are shared with the
    original layers, as in torch's converter.
    """

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, (BatchNormAct2d, SyncBatchNormAct2d)):
            return _twin(module, SyncBatchNormAct2d, process_group=process_group)
        if isinstance(module, _SYNCABLE) and not isinstance(module, _NORMKIT_ONLY):
            return _twin(module, SyncBatchNorm, process_group=process_group)
        return None

    return _walk(model, swap)


def _frozen_from(module: nn.Module, like: torch.Tensor | None) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(module.num_features, module.eps)
    _carry_state(module, frozen, like)
    frozen.train(False)
    return frozen


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d and SyncBatchNorm (torch.nn or normkit) by ``FrozenBatchNorm2d``.

    The frozen layer holds copies of the affine parameters and running statistics as buffers, so they
    no longer train, and it normalizes with them in train mode too. Layers without running
    statistics freeze to mean 0 and variance 1.
    """
    kinds = (nn.BatchNorm2d, nk.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm)

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        return _frozen_from(module, _placement(model, name)) if type(module) in kinds else None

    return _walk(model, swap)


class _NormLeafTracer(torch.fx.Tracer):
    """Traces a model keeping every norm layer as one call, so normkit layers need not be traceable."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _CHANNEL_NORMS) or super().is_leaf_module(m, module_qualified_name)


# Layers and calls whose output has the rank of their (first) input.
_KEEP_RANK_MODULES = (
    nn.Linear, nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Sigmoid, nn.Tanh, *_FOLDABLE,
)
_KEEP_RANK_CALLS = {
    *(("call_function", f) for f in (torch.relu, torch.sigmoid, torch.tanh, TF.relu, TF.gelu, TF.silu, TF.dropout)),
    *(("call_method", m) for m in ("relu", "sigmoid", "tanh")),
}
_FLATTEN_CALLS = {("call_function", torch.flatten), ("call_method", "flatten")}
_RESHAPE_CALLS = {("call_function", torch.reshape), ("call_method", "view"), ("call_method", "reshape")}


def _flattens_to_2d(module: nn.Module) -> bool:
    return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1


def _traced_2d(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether the graph shows ``node``'s output is 2-D: a flatten from dim 1 or a view/reshape to two
    sizes, followed only by layers and calls that keep the rank."""
    while isinstance(node, torch.fx.Node) and node.args:
        call, args = (node.op, node.target), node.args
        if node.op == "call_module":
            module = modules[node.target]
            if _flattens_to_2d(module):
                return True
            if not isinstance(module, _KEEP_RANK_MODULES):
                return False
        elif call in _FLATTEN_CALLS:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return start == 1 and end == -1
        elif call in _RESHAPE_CALLS:
            sizes = args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            return len(sizes) == 2
        elif call not in _KEEP_RANK_CALLS:
            return False
        node = args[0]
    return False


def _sequential_2d(children: list[nn.Module]) -> bool:
    """Whether ``children`` run in order give a 2-D output: a flatten from dim 1, then layers that keep the rank."""
    for module in reversed(children):
        if _flattens_to_2d(module):
            return True
        if not isinstance(module, _KEEP_RANK_MODULES):
            return False
    return False


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, norm) names where a norm reads only the output of a Conv/Linear that nothing else reads;
    a Linear only where its output is 2-D."""
    graph = _NormLeafTracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _folds(modules[node.target]) or len(node.args) != 1:
            continue
        prev = node.args[0]
        if (
            isinstance(prev, torch.fx.Node)
            and prev.op == "call_module"
            and len(prev.users) == 1
            and calls[prev.target] == 1
            and calls[node.target] == 1
            and (not isinstance(modules[prev.target], nn.Linear) or _traced_2d(prev, modules))
        ):
            pairs.append((prev.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, norm) names of adjacent children of each nn.Sequential, for models fx cannot trace;
    a Linear only where the children before it make its output 2-D."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            names, children = list(module._modules), list(module._modules.values())
            prefix = f"{name}." if name else ""
            for i in range(len(names) - 1):
                if isinstance(children[i], nn.Linear) and not _sequential_2d(children[: i + 1]):
                    continue
                pairs.append((prefix + names[i], prefix + names[i + 1]))
    return pairs


def _fold(layer: nn.Module, norm: nn.Module) -> nn.Module | None:
    """A copy of the Conv/Linear ``layer`` that outputs what eval-mode ``norm`` makes of its output, or None.

    Output channel ``o`` is scaled by ``γ[o] / sqrt(running_var[o] + eps)`` and its bias moved to
    match. A transposed convolution stores its weight as (in_channels, out_channels / groups, *kernel):
    its output channel ``g · out/groups + j`` is ``weight[g · in/groups : (g + 1) · in/groups, j]``.
    """
    if isinstance(layer, nn.Linear):
        channels = layer.out_features
    elif isinstance(layer, nn.modules.conv._ConvNd):
        channels = layer.out_channels
    else:
        return None
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if mean is None or var is None or channels != norm.num_features:
        return None
    weight, bias = layer.weight, layer.bias
    with torch.no_grad():
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = (-mean if bias is None else bias - mean) * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        ones = [1] * (weight.dim() - 2)
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            groups = layer.groups
            folded = (weight.unflatten(0, (groups, -1)) * scale.view(groups, 1, -1, *ones)).flatten(0, 1)
        else:
            folded = weight * scale.view(-1, 1, *ones)
    like = weight if bias is None else bias
    fused = copy.deepcopy(layer)
    fused.weight = nn.Parameter(folded.to(weight.dtype), weight.requires_grad)
    fused.bias = nn.Parameter(shift.to(like.dtype), like.requires_grad)
    return fused


def fuse_conv_bn_eval(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm (or FrozenBatchNorm2d) into the Conv/Linear that feeds it.

    Pairs are found by tracing the model with torch.fx (norm layers kept as leaves), or, when the model
    cannot be traced, among adjacent children of ``nn.Sequential``. A pair is folded only when the norm
    reads nothing but that layer's output, each is called once, and the norm has running statistics.
    A Linear is folded only where its input is known to be 2-D (N, C): after a flatten from dim 1
    (``torch.flatten(x, 1)``, ``x.flatten(1)``, ``nn.Flatten()``) or a view/reshape to two sizes,
    with only Linear, norm, dropout and activation layers in between. On (N, C, L) input the norm
    normalizes dim 1 while the Linear's features are the last dim, so no fold is exact for every input
    rank; other Linear pairs stay unfused.
    Eval-mode outputs are unchanged up to rounding; the model must be in eval mode.
    """
    if model.training:
        raise ValueError("fuse_conv_bn_eval needs a model in eval mode; call model.eval() first")
    try:
        pairs = _traced_pairs(model)
    except Exception:
        pairs = _sequential_pairs(model)
    modules = dict(model.named_modules())
    for layer_name, norm_name in pairs:
        layer, norm = modules[layer_name], modules[norm_name]
        if layer.training or norm.training or not _folds(norm):
            continue
        fused = _fold(layer, norm)
        if fused is not None:
            model.set_submodule(layer_name, fused)
            model.set_submodule(norm_name, nn.Identity())
    return model


__all__ = [
    "UnsupportedNormWarning",
    "convert_sync_batchnorm",
    "freeze_batchnorm",
    "fuse_conv_bn_eval",
    "get_norm_layer",
    "replace_norm",
    "to_normkit",
    "to_torch",
]
