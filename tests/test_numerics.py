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


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d"])
def test_input_gradient_finite_with_a_tiny_eps(name, channels_last):
    """Data of scale 1e-20 with eps 1e-45: rstd is about 1e20, whose square overflows float32; dx
    (about 1e20) was inf or NaN in whole channels. Compared with torch's (finite, 2e-6 from float64)."""
    torch.manual_seed(0)
    x = (torch.randn(8, 4, 8, 8, dtype=torch.float64) * 1e-20).float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(8, 4, 8, 8)
    grads = []
    for m in (getattr(nk, name)(4, eps=1e-45), getattr(torch.nn, name)(4, eps=1e-45)):
        xi = x.clone().requires_grad_()
        m(xi).backward(dy)
        grads.append(xi.grad)
    ours, theirs = grads
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_eval_input_gradient_ignores_nan_in_the_input(dtype, channels_last):
    """In evaluation dx = rstd * w * dy does not depend on x: a NaN or inf input where dy is 0 gives a
    0 gradient there, as torch's (it was NaN)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=dtype)
    x[0, 1, 2, 2], x[1, 2, 0, 0] = float("nan"), float("inf")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.ones_like(x)
    dy[0, 1, 2, 2] = dy[1, 2, 0, 0] = 0
    grads = []
    for cls in (nk.BatchNorm2d, torch.nn.BatchNorm2d):
        m = cls(3).to(dtype).eval()
        m.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
        xi = x.clone().requires_grad_()
        m(xi).backward(dy)
        grads.append(xi.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d"])
def test_inf_first_in_a_group_gives_torch_running_statistics(name, channels_last):
    """+inf as a channel's first element: running mean inf as torch's (the first element is the sums'
    shift, and inf - inf made it NaN)."""
    x = torch.randn(2, 2, 3, 3)
    x[0, 0, 0, 0] = float("inf")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ours = getattr(nk, name)(2, track_running_stats=True)
    theirs = getattr(torch.nn, name)(2, track_running_stats=True)
    ours(x), theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, theirs.running_var, equal_nan=True)


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm"])
def test_input_gradient_finite_on_constant_groups_with_a_tiny_eps(name):
    """Constant groups with eps 1e-40: rstd = 1e20 and dx of about 1e20, as torch's (it was NaN: inf * 0)."""
    torch.manual_seed(0)
    x = torch.full((4, 8, 6), 0.5)
    dy = torch.randn(4, 8, 6)
    args = (6,) if name == "LayerNorm" else (2, 8)
    grads = []
    for mod in (nk, torch.nn):
        xi = x.clone().requires_grad_()
        getattr(mod, name)(*args, eps=1e-40)(xi).backward(dy)
        grads.append(xi.grad)
    assert torch.isfinite(grads[0]).all()
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()
