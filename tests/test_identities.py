"""Identities between norms: the shared core must make them hold in every layout."""

from __future__ import annotations

import pytest
import torch

import normkit.functional as F
import normkit.nn as nk

LAYOUTS = ["contiguous", "channels_last"]


def _x(layout, shape=(3, 6, 5, 4)):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_with_one_group_is_layer_norm_over_c_and_space(layout):
    x = _x(layout)
    torch.testing.assert_close(F.group_norm(x, 1), F.layer_norm(x, list(x.shape[1:])))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_with_c_groups_is_instance_norm(layout):
    x = _x(layout)
    w, b = torch.rand(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(F.group_norm(x, 6, w, b), F.instance_norm(x, weight=w, bias=b))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_norm_in_eval_is_an_affine_transform(layout):
    x = _x(layout)
    bn = nk.BatchNorm2d(6, dtype=torch.float64).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(6))
        bn.running_var.copy_(torch.rand(6) + 0.5)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    torch.testing.assert_close(bn(x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_instance_norm_is_batch_norm_of_each_sample(layout):
    x = _x(layout)
    per_sample = torch.cat([F.batch_norm(x[i : i + 1], None, None, training=True) for i in range(x.shape[0])])
    torch.testing.assert_close(F.instance_norm(x), per_sample)


def test_rms_norm_of_zero_mean_rows_is_layer_norm_without_bias():
    x = torch.randn(4, 16, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(F.rms_norm(x, [16], eps=1e-5), F.layer_norm(x, [16], eps=1e-5))


def test_layer_norm_is_invariant_to_shift_and_scale_of_each_row():
    x = torch.randn(4, 16, dtype=torch.float64)
    shifted = x * torch.rand(4, 1, dtype=torch.float64).add(0.5) * 10 + torch.randn(4, 1, dtype=torch.float64) * 100
    torch.testing.assert_close(F.layer_norm(x, [16], eps=0.0), F.layer_norm(shifted, [16], eps=0.0))
