"""InstanceNorm1d/2d/3d: torch.nn's modules on normkit's core, keeping the memory format."""

from __future__ import annotations

import warnings

from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.modules import instancenorm as torch_instancenorm

from .. import functional as F
from ._base import NormBase, check_dims, fx_node


class _InstanceNorm(NormBase, torch_instancenorm._InstanceNorm):
    _no_batch_dim: int = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def _check_input_dim(self, input: Tensor) -> None:
        check_dims(input, (self._no_batch_dim, self._no_batch_dim + 1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        if version is None and not self.track_running_stats:
            keys = [prefix + n for n in ("running_mean", "running_var") if prefix + n in state_dict]
            if keys:
                error_msgs.append(
                    "Unexpected running stats buffer(s) {names} for {klass} "
                    "with track_running_stats=False. If state_dict is a "
                    "checkpoint saved before 0.4.0, this may be expected "
                    "because {klass} does not track running stats by default "
                    "since 0.4.0. Please remove these keys from state_dict. If "
                    "the running stats are actually needed, instead set "
                    "track_running_stats=True in {klass} to enable them. See "
                    "the documentation of {klass} for details.".format(
                        names=" and ".join(f'"{k}"' for k in keys), klass=self.__class__.__name__
                    )
                )
                for key in keys:
                    state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply_instance_norm(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            mask,
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (bool, True = valid) keeps padding out of the statistics."""
        if isinstance(input, Proxy):
            return fx_node(self, input, mask)
        self._check_input_dim(input)
        feature_dim = input.dim() - self._no_batch_dim
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        if input.dim() == self._no_batch_dim:
            return self._apply_instance_norm(input.unsqueeze(0), None if mask is None else mask.unsqueeze(0)).squeeze(0)
        return self._apply_instance_norm(input, mask)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    """Instance normalization over a 2D (unbatched) or 3D input, as ``torch.nn.InstanceNorm1d``."""

    _no_batch_dim = 2


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    """Instance normalization over a 3D (unbatched) or 4D input; unlike torch.nn, keeps channels_last."""

    _no_batch_dim = 3


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    """Instance normalization over a 4D (unbatched) or 5D input; keeps channels_last_3d."""

    _no_batch_dim = 4
