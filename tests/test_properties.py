"""Property tests: random shapes and values against a float64 implementation written here."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit.functional as F


def _expected(x: torch.Tensor, dims: tuple[int, ...], eps: float, rms: bool = False) -> tuple[torch.Tensor, float]:
    """Float64 result and the worst |mean| / std over groups, which sets the float32 error bound."""
    x = x.double()
    mean = torch.zeros_like(x.mean(dims, keepdim=True)) if rms else x.mean(dims, keepdim=True)
    std = torch.sqrt((x - mean).square().mean(dims, keepdim=True) + eps)
    return (x - mean) / std, (mean.abs() / std).max().item()


shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5))
scales = st.sampled_from([1e-3, 1.0, 1e3, 1e12])
offsets = st.sampled_from([0.0, 1.0, -1e4, 1e6])
settings.register_profile("normkit", max_examples=40, deadline=None)
settings.load_profile("normkit")


def _input(shape, scale, offset, seed, channels_last):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).float()
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _check(actual, expected_and_ratio):
    expected, mean_ratio = expected_and_ratio
    tol = 1e-5 + 4 * torch.finfo(torch.float32).eps * mean_ratio
    assert (actual.double() - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


@given(shapes, scales, offsets, st.integers(0, 2**16), st.booleans())
def test_batch_norm_property(shape, scale, offset, seed, channels_last):
    x = _input(shape, scale, offset, seed, channels_last)
    if shape[0] * shape[2] * shape[3] == 1:
        return
    _check(F.batch_norm(x, None, None, training=True), _expected(x, (0, 2, 3), 1e-5))


@given(shapes, scales, offsets, st.integers(0, 2**16), st.booleans())
def test_group_norm_property(shape, scale, offset, seed, channels_last):
    x = _input(shape, scale, offset, seed, channels_last)
    n, c, h, w = shape
    groups = next(g for g in (3, 2, 1) if c % g == 0)
    if (c // groups) * h * w * n == 1 or (c // groups) * h * w == 1 and n == 1:
        return
    expected, ratio = _expected(x.reshape(n, groups, -1), (2,), 1e-5)
    _check(F.group_norm(x, groups), (expected.reshape(shape), ratio))


@given(shapes, scales, offsets, st.integers(0, 2**16), st.booleans())
def test_instance_norm_property(shape, scale, offset, seed, channels_last):
    x = _input(shape, scale, offset, seed, channels_last)
    if shape[2] * shape[3] == 1:
        return
    _check(F.instance_norm(x), _expected(x, (2, 3), 1e-5))


@given(shapes, scales, offsets, st.integers(0, 2**16))
def test_layer_and_rms_norm_property(shape, scale, offset, seed):
    x = _input(shape, scale, offset, seed, False)
    _check(F.layer_norm(x, list(shape[2:])), _expected(x, (2, 3), 1e-5))
    _check(F.rms_norm(x, list(shape[2:]), eps=1e-5), _expected(x, (2, 3), 1e-5, rms=True))
