"""Shared base of BatchNorm and InstanceNorm: parameters, running buffers, reset, versioned loading;
and what every normkit layer shares (input checks, its node in an FX graph).

Each twin of a torch.nn layer also derives from that layer's class (``nk.BatchNorm2d`` is an
``nn.BatchNorm2d``), so code that picks layers by ``isinstance`` (``swa_utils.update_bn``, weight-decay
groups, ``nn.SyncBatchNorm.convert_sync_batchnorm``, FSDP's mixed precision) finds normkit's too. The
normkit class comes first and defines everything the layer does; torch's class contributes its type
only, and its ``__init__`` is not run (``Module.__init__`` is called directly)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Proxy
from torch.fx.proxy import TraceError
from torch.nn import Module, Parameter, init


class NormBase(Module):
    """Owns ``weight``/``bias`` and ``running_mean``/``running_var``/``num_batches_tracked`` as torch.nn does.

    ``_version = 2``: checkpoints older than that carry no ``num_batches_tracked``; loading one fills it in.
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

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
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        Module.__init__(self)  # not the torch.nn twin's __init__ (see the module docstring)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine(self, (num_features,), affine, affine and bias, factory_kwargs)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "bias={use_bias}, track_running_stats={track_running_stats}".format(
                **self.__dict__, use_bias=self.bias is not None
            )
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            tracked = self.num_batches_tracked
            usable = tracked is not None and tracked.device != torch.device("meta")
            state_dict[key] = tracked if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError


def register_affine(
    module: Module, shape: tuple[int, ...], weight: bool, bias: bool | None, factory_kwargs: dict
) -> None:
    """Register ``weight`` and ``bias`` of ``shape``, ``None`` when disabled; ``bias=None``: no bias slot."""
    for name, wanted in (("weight", weight), ("bias", bias)):
        if wanted is not None:
            module.register_parameter(name, Parameter(torch.empty(shape, **factory_kwargs)) if wanted else None)


def check_dims(input: Tensor, allowed: tuple[int, ...]) -> None:
    """Raise torch.nn's ValueError when ``input.dim()`` is not one of ``allowed`` (2 or 3, or one value)."""
    if input.dim() in allowed:
        return
    expected = " or ".join(f"{d}D" for d in allowed)
    raise ValueError(f"expected {expected} input (got {input.dim()}D input)")


def fx_node(module: Module, *args: object) -> Proxy:
    """The layer's call as one ``call_module`` node of the FX graph being traced (``args`` hold a
    ``Proxy``): FX's tracer keeps torch.nn's layers whole, and a normkit layer's forward checks shapes
    and dtypes, which a Proxy cannot answer. A traced model then runs the layer itself."""
    while args and args[-1] is None:  # an absent mask: the node reads as torch.nn's layers' do
        args = args[:-1]
    tracer = next(a for a in args if isinstance(a, Proxy)).tracer
    path = tracer.path_of_module(module)
    if not path:
        raise TraceError(
            f"{type(module).__name__} is the root of this trace: FX keeps a normkit layer as one node of the "
            "module that holds it; trace that module (e.g. nn.Sequential(layer))"
        )
    return tracer.create_proxy("call_module", path, args, {})
