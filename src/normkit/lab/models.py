"""Small models for the lab, every normalization built from ``normkit.nn`` (or ``torch.nn`` for comparison).

A norm is named by a short string: ``none``, ``bn``, ``ln``, ``in``, ``gn`` (``gn4`` = 4 groups), ``rms``,
``ghost8`` (batch norm whose statistics come from chunks of 8 examples: normkit's ``GhostBatchNorm``
under either backend, torch.nn has none), ``bnmask`` (normkit's BatchNorm1d given the padding mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn as tnn
import torch.nn.functional as F
from torch import Tensor

import normkit.nn

NORM_LABELS = {"none": "no norm", "bn": "BatchNorm", "bnmask": "BatchNorm, masked", "ln": "LayerNorm", "in": "InstanceNorm", "gn": "GroupNorm", "rms": "RMSNorm"}


def norm_label(kind: str) -> str:
    """Human name of a norm string, e.g. ``gn4`` -> ``GroupNorm(G=4)``."""
    if kind.startswith("ghost"):
        return f"ghost BN ({kind[5:]})"
    if kind.startswith("gn") and kind[2:]:
        return f"GroupNorm(G={kind[2:]})"
    return NORM_LABELS[kind]


def layers(backend: str):
    """The module namespace providing the norms: torch.nn for ``torch``, normkit.nn otherwise."""
    return tnn if backend == "torch" else normkit.nn


def default_groups(channels: int) -> int:
    """Group count used when a study does not sweep it: 8 (as in many GN configs) or fewer for narrow layers."""
    return math.gcd(channels, 8)


def make_norm(kind: str, channels: int, backend: str, size: tuple[int, ...] = ()) -> tnn.Module:
    """A norm layer for ``channels`` features with spatial ``size`` (``()`` for plain vectors)."""
    L = layers(backend)
    dims = len(size)
    if kind == "none":
        return tnn.Identity()
    if kind == "bn":
        return (L.BatchNorm1d, L.BatchNorm1d, L.BatchNorm2d)[dims](channels)
    if kind == "bnmask":
        return normkit.nn.BatchNorm1d(channels)
    if kind.startswith("ghost"):
        return normkit.nn.GhostBatchNorm(channels, ghost_batch_size=int(kind[5:]))
    if kind == "ln":
        return L.LayerNorm([channels, *size])
    if kind == "in":
        if not dims:
            raise ValueError("instance norm needs a spatial axis: one value per channel normalizes to 0")
        return (None, L.InstanceNorm1d, L.InstanceNorm2d)[dims](channels, affine=True)
    if kind.startswith("gn"):
        groups = int(kind[2:]) if kind[2:] else default_groups(channels)
        return L.GroupNorm(groups, channels)
    if kind == "rms":
        return L.RMSNorm([channels, *size])
    raise ValueError(f"unknown norm {kind!r}")


def scale_init(model: tnn.Module, scale: float, generator: torch.Generator) -> None:
    """Re-draw every linear/conv weight as N(0, (scale / sqrt(fan_in))^2); scale=sqrt(2) is He init."""
    for module in model.modules():
        if isinstance(module, (tnn.Linear, tnn.Conv1d, tnn.Conv2d)):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * scale / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.zero_()


class MLP(tnn.Sequential):
    """Flatten -> [Linear -> norm -> ReLU] x depth -> Linear."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int, norm: str, backend: str):
        blocks: list[tnn.Module] = [tnn.Flatten()]
        dim = in_dim
        for _ in range(depth):
            blocks += [tnn.Linear(dim, width), make_norm(norm, width, backend), tnn.ReLU()]
            dim = width
        blocks.append(tnn.Linear(dim, out_dim))
        super().__init__(*blocks)


class ConvNet(tnn.Sequential):
    """[Conv -> norm -> ReLU] per width (stride 2 where asked) -> global average pool -> Linear, 1-D or 2-D."""

    def __init__(
        self,
        in_channels: int,
        size: tuple[int, ...],
        widths: list[int],
        out_dim: int,
        norm: str,
        backend: str,
        strides: list[int] | None = None,
    ):
        conv = tnn.Conv1d if len(size) == 1 else tnn.Conv2d
        strides = strides or [1] * len(widths)
        blocks: list[tnn.Module] = []
        channels = in_channels
        for width, stride in zip(widths, strides):
            size = tuple((s + 2 - 3) // stride + 1 for s in size)
            blocks += [conv(channels, width, 3, stride=stride, padding=1), make_norm(norm, width, backend, size), tnn.ReLU()]
            channels = width
        pool = tnn.AdaptiveAvgPool1d(1) if len(size) == 1 else tnn.AdaptiveAvgPool2d(1)
        blocks += [pool, tnn.Flatten(), tnn.Linear(channels, out_dim)]
        super().__init__(*blocks)


class DenoisingAutoencoder(tnn.Module):
    """Conv encoder/decoder for 8x8 images; ``encode``/``decode`` are exposed for the AdaIN illustration."""

    def __init__(self, norm: str, backend: str, width: int = 16):
        super().__init__()
        self.encoder = tnn.Sequential(
            tnn.Conv2d(1, width, 3, padding=1), make_norm(norm, width, backend, (8, 8)), tnn.ReLU(),
            tnn.Conv2d(width, 2 * width, 3, stride=2, padding=1), make_norm(norm, 2 * width, backend, (4, 4)), tnn.ReLU(),
        )  # fmt: skip
        self.decoder = tnn.Sequential(
            tnn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), make_norm(norm, width, backend, (8, 8)), tnn.ReLU(),
            tnn.Conv2d(width, 1, 3, padding=1),
        )  # fmt: skip

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


class SequenceNorm(tnn.Module):
    """A norm over the feature axis of (N, L, D) token features. ``bn`` sees padding like a naive port
    would; ``bnmask`` takes its statistics from the valid positions only."""

    def __init__(self, kind: str, dim: int, backend: str):
        super().__init__()
        self.kind = kind
        self.norm = make_norm(kind, dim, backend)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        if self.kind == "bn":
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        if self.kind == "bnmask":
            return self.norm(x.transpose(1, 2), mask=valid).transpose(1, 2)
        return self.norm(x)


class TinyTransformer(tnn.Module):
    """Pre-norm transformer encoder over padded token sequences; masked attention and masked mean pooling."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, max_len: int, classes: int, norm: str, backend: str):
        super().__init__()
        self.heads = heads
        self.embed = tnn.Embedding(vocab, dim)
        self.pos = tnn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = tnn.ModuleList()
        for _ in range(depth):
            self.blocks.append(
                tnn.ModuleDict(
                    {
                        "norm1": SequenceNorm(norm, dim, backend),
                        "qkv": tnn.Linear(dim, 3 * dim),
                        "proj": tnn.Linear(dim, dim),
                        "norm2": SequenceNorm(norm, dim, backend),
                        "mlp": tnn.Sequential(tnn.Linear(dim, 2 * dim), tnn.GELU(), tnn.Linear(2 * dim, dim)),
                    }
                )
            )
        self.final = SequenceNorm(norm, dim, backend)
        self.head = tnn.Linear(dim, classes)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        n, length = tokens.shape
        valid = torch.arange(length, device=tokens.device).view(1, -1) < lengths.view(-1, 1)
        x = self.embed(tokens) + self.pos[:length]
        attn_mask = valid.view(n, 1, 1, length)
        for block in self.blocks:
            h = block["norm1"](x, valid)
            q, k, v = block["qkv"](h).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            x = x + block["proj"](a.transpose(1, 2).reshape(n, length, -1))
            x = x + block["mlp"](block["norm2"](x, valid))
        x = self.final(x, valid)
        pooled = (x * valid.unsqueeze(-1)).sum(1) / lengths.view(-1, 1).to(x.dtype)
        return self.head(pooled)
