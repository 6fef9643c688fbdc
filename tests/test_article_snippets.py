"""The article's four snippets run unchanged with ``import normkit.nn as nn``: forward, backward, eval."""

from __future__ import annotations

import pytest
import torch

import normkit.nn as nn


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.BatchNorm2d(num_features=64), (4, 64, 8, 8)),
        (lambda: nn.LayerNorm(normalized_shape=[64, 128, 128]), (2, 64, 128, 128)),
        (lambda: nn.InstanceNorm2d(num_features=64), (2, 64, 8, 8)),
        (lambda: nn.GroupNorm(num_groups=32, num_channels=64), (2, 64, 8, 8)),
    ],
    ids=["bn_layer", "ln_layer", "in_layer", "gn_layer"],
)
def test_article_snippet(make, shape):
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    flat = y.transpose(0, 1).reshape(64, -1) if not isinstance(layer, nn.LayerNorm) else y.reshape(shape[0], -1)
    if isinstance(layer, nn.BatchNorm2d):
        torch.testing.assert_close(flat.mean(1), torch.zeros(64), atol=1e-5, rtol=0)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    layer.eval()
    with torch.no_grad():
        assert torch.isfinite(layer(x)).all()


def test_normkit_nn_forwards_other_torch_nn_names():
    assert nn.Conv2d is torch.nn.Conv2d and nn.Module is torch.nn.Module
