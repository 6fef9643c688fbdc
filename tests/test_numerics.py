"""normkit stays within the float32 error bound on adversarial inputs for every layer and layout."""

from __future__ import annotations

import pytest
import torch

import normkit.nn as nk
from normkit.numerics import CASES, LAYERS, applies, max_error


def _params():
    for layer, (_, _, layouts) in LAYERS.items():
        for case in CASES:
            if not applies(layer, case):
                continue
            for layout in layouts if not case.long else ("contiguous",):
                yield pytest.param(layer, case, layout, id=f"{layer}-{case.name}-{layout}")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("layer,case,layout", list(_params()))
def test_error_within_float32_bound(layer, case, layout, device):
    err = max_error(layer, case, layout, nk, device)
    bound = case.bound(layer)
    if bound == 0:
        assert err == 0.0, f"constant input must normalize to exactly beta, max error {err}"
    else:
        assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize(
    "make,shape,channels_last,spike",
    [
        (lambda: nk.LayerNorm(1 << 16), (4, 1 << 16), False, (slice(None), 0)),  # fused rows
        (lambda: nk.LayerNorm(1 << 20), (2, 1 << 20), False, (slice(None), 0)),  # a long row split in chunks
        (lambda: nk.BatchNorm2d(8), (64, 8, 32, 32), False, (0, slice(None), 0, 0)),
        (lambda: nk.BatchNorm2d(8), (64, 8, 32, 32), True, (0, slice(None), 0, 0)),  # column loops
        (lambda: nk.GroupNorm(4, 64), (2, 64, 16, 16), True, (slice(None), slice(None), 0, 0)),
    ],
)
def test_variance_exact_with_an_outlier_first(make, shape, channels_last, spike):
    """Each group's first element far from its mean (a massive-activation feature): the statistics are
    shifted by that element, and float32 sums about it lost the variance (LayerNorm of 2**20 elements:
    relative error 1e-2, torch's 3e-8); such groups are summed again about their mean."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 1e-4
    x[spike] = 1.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    m = make()
    y = m(x)
    y64 = make().double()(x.double())
    assert (y.double() - y64).abs().max() <= 1e-5 * y64.abs().max()
