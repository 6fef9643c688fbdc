"""One contract test that every registered backend must pass.

Each backend's forward, normalize and backward on the 5-D view of every norm and layout is compared
with an independent float64 autograd implementation written here (not the reference backend's code),
so the reference backend is checked too.
"""

from __future__ import annotations

import math

import pytest
import torch

from normkit import kernels
from normkit.functional import _layout as L

NORM_CASES = {
    # name: (input shapes, view builder(x, channels_last) -> (shape5, affine_r1, affine_r2), layouts)
    "batch": ([(4, 3, 5, 7), (2, 5, 1, 1), (3, 17), (2, 64, 3, 3)], lambda x, cl: (L.per_channel_view(x, cl), False, False)),
    "instance": ([(2, 3, 5, 7), (3, 4, 2, 1), (2, 33, 3)], lambda x, cl: (L.per_instance_view(x, cl), False, False)),
    "group": ([(2, 6, 5, 7), (3, 8, 1, 1), (2, 12, 9)], lambda x, cl: (L.per_group_view(x, 3 if x.shape[1] % 3 == 0 else 2, cl), not cl, cl)),
    "layer": ([(4, 37), (3, 5, 8), (2, 1, 1)], lambda x, cl: (L.trailing_view(x, x.shape[-1]), True, False)),
    "rms": ([(4, 37), (3, 5, 8)], lambda x, cl: (L.trailing_view(x, x.shape[-1]), True, False)),
}
DTYPES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _cases():
    for norm, (shapes, _) in NORM_CASES.items():
        for shape in shapes:
            layouts = [False] if norm in ("layer", "rms") or len(shape) < 3 else [False, True]
            for cl in layouts:
                yield pytest.param(norm, shape, cl, id=f"{norm}-{'x'.join(map(str, shape))}-{'cl' if cl else 'cf'}")


def _backends():
    """Every backend that runs on CPU tensors in this process. Triton does so only under
    TRITON_INTERPRET=1: ``test_triton_backend`` runs this file in such a process."""
    out = []
    for name in kernels.names():
        impl = kernels.try_load(name)
        if impl is None:
            out.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=f"{name} not importable")))
        elif impl.supports(torch.zeros(2, 1, 2, 1, 1), None):
            out.append(pytest.param(impl, id=name))
    return out


def _make(norm, shape, cl, dtype, affine=True):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    shape5, ar1, ar2 = NORM_CASES[norm][1](x, cl)
    xc = x.movedim(1, -1).contiguous() if cl else x.contiguous()
    _, p, r1, b, r2 = shape5
    pshape = (p, r1 if ar1 else 1, b, r2 if ar2 else 1)
    w = (torch.rand(pshape, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    bias = torch.randn(pshape, dtype=torch.float64).to(dtype) if affine else None
    return xc.view(shape5), w, bias, pshape


def _truth(x5, w, b, eps, rms, dy, fixed=None):
    """Float64 autograd implementation: statistics, output and gradients."""
    x = x5.double().requires_grad_()
    params = [None if t is None else t.double().requires_grad_() for t in (w, b)]
    if fixed is None:
        mean = torch.zeros_like(x[:, :, :1, :, :1]) if rms else x.mean((2, 4), keepdim=True)
        var = (x - mean).square().mean((2, 4), keepdim=True)
        rstd = (var + eps).rsqrt()
    else:
        mean, rstd = (t.double().unsqueeze(2).unsqueeze(-1) for t in fixed)
        var = None
    y = (x - mean) * rstd
    if params[0] is not None:
        y = y * params[0].unsqueeze(0)
    if params[1] is not None:
        y = y + params[1].unsqueeze(0)
    grads = torch.autograd.grad(y, [x] + [p for p in params if p is not None], dy.double())
    return y.detach(), mean.detach(), rstd.detach(), var, grads


def _close(actual, expected, tol, what):
    assert actual.numel() == expected.numel(), f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    actual, expected = actual.reshape(-1), expected.reshape(-1).to(torch.float64)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.to(torch.float64) - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("norm,shape,cl", list(_cases()))
def test_forward_and_backward_match_float64(backend, dtype, affine, norm, shape, cl):
    x5, w, b, pshape = _make(norm, shape, cl, dtype, affine)
    if not backend.supports(x5, w):
        pytest.skip(f"{backend.name} declines {dtype} on {x5.device.type}; the core uses the reference")
    rms, eps = norm == "rms", 1e-5
    tol = DTYPES[dtype]
    dy = torch.randn(x5.shape, dtype=torch.float64).to(dtype)
    y_t, mean_t, rstd_t, var_t, grads_t = _truth(x5, w, b, eps, rms, dy)

    y, st = backend.forward(x5, w, b, eps, rms)
    assert y.dtype == dtype and y.shape == x5.shape
    assert st.mean.shape == st.rstd.shape == st.var.shape == (x5.shape[0], x5.shape[1], x5.shape[3])
    _close(y, y_t, tol, "y")
    _close(st.mean, mean_t.flatten(), 1e-6 if dtype != torch.float64 else 1e-12, "mean")
    _close(st.rstd, rstd_t.flatten(), 1e-5 if dtype != torch.float64 else 1e-12, "rstd")
    _close(st.var, var_t.flatten(), 1e-5 if dtype != torch.float64 else 1e-12, "var")

    g = backend.backward(dy, x5, st.mean, st.rstd, w, pshape, rms, True, (True, affine, affine))
    assert g.dx.dtype == dtype
    _close(g.dx, grads_t[0], 4 * tol, "dx")
    if affine:
        _close(g.dweight, grads_t[1], 4 * tol * math.sqrt(x5.numel()), "dweight")
        _close(g.dbias, grads_t[2], 4 * tol * math.sqrt(x5.numel()), "dbias")
    else:
        assert g.dweight is None and g.dbias is None


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("norm,shape,cl", list(_cases()))
def test_tensors_as_they_are_with_their_views_beside(backend, dtype, norm, shape, cl):
    """The core passes the dense input and the module's 1-D parameters as they are, with ``shape`` and
    ``param_shape`` beside them: every method gives what it gives on the views, in the input's shape."""
    x5, w, b, pshape = _make(norm, shape, cl, dtype)
    if not backend.supports(x5, w):
        pytest.skip(f"{backend.name} declines {dtype} on {x5.device.type}; the core uses the reference")
    rms = norm == "rms"
    xd = x5.reshape(-1, x5.shape[-1] * x5.shape[-2])  # the same memory, another shape
    wd, bd = w.flatten(), b.flatten()
    views = dict(shape=tuple(x5.shape), param_shape=pshape)
    y, st = backend.forward(x5, w, b, 1e-5, rms)
    yd, std = backend.forward(xd, wd, bd, 1e-5, rms, **views)
    assert yd.shape == xd.shape and torch.equal(yd.view(x5.shape), y)
    for got, want in zip(std, st):
        assert torch.equal(got.view(want.shape), want)
    assert torch.equal(backend.normalize(xd, st.mean, st.rstd, wd, bd, **views).view(x5.shape),
                       backend.normalize(x5, st.mean, st.rstd, w, b))
    dy = torch.randn(x5.shape).to(dtype)
    mask = (True, True, True)
    g = backend.backward(dy, x5, st.mean, st.rstd, w, pshape, rms, True, mask)
    gd = backend.backward(dy.view(xd.shape), xd, st.mean, st.rstd, wd, pshape, rms, True, mask, shape=views["shape"])
    assert gd.dx.shape == xd.shape and torch.equal(gd.dx.view(x5.shape), g.dx)
    assert gd.dweight.shape == gd.dbias.shape == wd.shape and g.dweight.shape == g.dbias.shape == w.shape
    assert torch.equal(gd.dweight.view(w.shape), g.dweight) and torch.equal(gd.dbias.view(w.shape), g.dbias)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (3, 6, 1, 4), (2, 6, 3, 4, 5)], ids=lambda s: "x".join(map(str, s)))
def test_channels_last_tensors_are_read_in_memory_order(backend, dtype, norm, shape):
    """A channels-last input goes as it is, with its view in memory order: every method gives what it
    gives on the contiguous permuted view, in the input's shape and layout; ``dy`` may come in either
    layout. Without its view it is refused: its own shape is not its memory order."""
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    xcl = x.contiguous(memory_format=fmt)
    shape5, ar1, ar2 = NORM_CASES[norm][1](x, True)
    _, p, r1, b, r2 = shape5
    pshape = (p, r1 if ar1 else 1, b, r2 if ar2 else 1)
    w, bias = (torch.rand(pshape, dtype=torch.float64) + 0.5).to(dtype), torch.randn(pshape, dtype=torch.float64).to(dtype)
    if not backend.supports(xcl, w):
        pytest.skip(f"{backend.name} declines {dtype} on {x.device.type}; the core uses the reference")
    x5 = x.movedim(1, -1).contiguous().view(shape5)

    def in_order(t):
        assert t.shape == x.shape and t.stride() == xcl.stride()
        return t.movedim(1, -1).reshape(shape5)

    views = dict(shape=shape5, param_shape=pshape)
    y5, st5 = backend.forward(x5, w, bias, 1e-5, False)
    y, st = backend.forward(xcl, w, bias, 1e-5, False, **views)
    assert torch.equal(in_order(y), y5) and all(torch.equal(a.view(e.shape), e) for a, e in zip(st, st5))
    assert torch.equal(in_order(backend.normalize(xcl, st.mean, st.rstd, w, bias, **views)),
                       backend.normalize(x5, st.mean, st.rstd, w, bias))
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    mask = (True, True, True)
    g5 = backend.backward(dy.movedim(1, -1).contiguous().view(shape5), x5, st.mean, st.rstd, w, pshape, False, True, mask)
    for dy_in in (dy, dy.contiguous(memory_format=fmt)):
        g = backend.backward(dy_in, xcl, st.mean, st.rstd, w, pshape, False, True, mask, shape=shape5)
        assert torch.equal(in_order(g.dx), g5.dx)
        assert torch.equal(g.dweight, g5.dweight) and torch.equal(g.dbias, g5.dbias)
    with pytest.raises(ValueError, match="memory order"):
        backend.forward(xcl, w, bias, 1e-5, False, param_shape=pshape)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("norm,shape,cl", [c for c in _cases() if c.values[0] in ("batch", "group")])
def test_broadcast_parameters_are_read_and_graded_as_their_view(backend, norm, shape, cl):
    """A parameter with fewer elements than ``param_shape`` (one scale for every channel) is broadcast to
    it: the same output as the dense parameter, and gradients of the view's size (never written into
    the smaller parameter's memory)."""
    x5, w, b, pshape = _make(norm, shape, cl, torch.float32)
    if not backend.supports(x5, w):
        pytest.skip(f"{backend.name} declines CPU tensors")
    w1, b1 = torch.full((1,), 1.5), torch.full((1,), -0.25)
    wd, bd = w1.expand(pshape).contiguous(), b1.expand(pshape).contiguous()
    y, st = backend.forward(x5, wd, bd, 1e-5, False)
    y1, _ = backend.forward(x5, w1, b1, 1e-5, False, param_shape=pshape)
    assert torch.equal(y1, y)
    dy = torch.randn(x5.shape)
    mask = (True, True, True)
    g = backend.backward(dy, x5, st.mean, st.rstd, wd, pshape, False, True, mask)
    g1 = backend.backward(dy, x5, st.mean, st.rstd, w1, pshape, False, True, mask)
    assert g1.dweight.shape == g1.dbias.shape == pshape
    assert torch.equal(g1.dx, g.dx) and torch.equal(g1.dweight, g.dweight) and torch.equal(g1.dbias, g.dbias)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("norm,shape,cl", [c for c in _cases() if c.values[0] == "batch"])
def test_fixed_statistics_match_float64(backend, dtype, norm, shape, cl):
    """BatchNorm in eval mode: given statistics, and a backward that treats them as constants."""
    x5, w, b, pshape = _make(norm, shape, cl, dtype)
    if not backend.supports(x5, w):
        pytest.skip(f"{backend.name} declines {dtype} on {x5.device.type}; the core uses the reference")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stat = (x5.shape[0], x5.shape[1], x5.shape[3])
    mean, rstd = torch.randn(stat, dtype=acc), torch.rand(stat, dtype=acc) + 0.5
    dy = torch.randn(x5.shape, dtype=torch.float64).to(dtype)
    y_t, *_, grads_t = _truth(x5, w, b, 0.0, False, dy, fixed=(mean, rstd))
    tol = DTYPES[dtype]
    _close(backend.normalize(x5, mean, rstd, w, b), y_t, tol, "y")
    var, eps = torch.rand(stat, dtype=acc) + 0.5, 1e-3  # the variance, flat as BatchNorm's running buffer
    y_v = _truth(x5, w, b, 0.0, False, dy, fixed=(mean, (var.double() + eps).rsqrt()))[0]
    _close(backend.normalize(x5, mean.flatten(), var.flatten(), w, b, var_eps=eps), y_v, tol, "y from the variance")
    g = backend.backward(dy, x5, mean, rstd, w, pshape, False, False, (True, True, True))
    _close(g.dx, grads_t[0], 4 * tol, "dx")
    _close(g.dweight, grads_t[1], 4 * tol * math.sqrt(x5.numel()), "dweight")
    _close(g.dbias, grads_t[2], 4 * tol * math.sqrt(x5.numel()), "dbias")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mask", [(False, True, False), (False, False, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("norm,cl", [("group", False), ("group", True), ("batch", True), ("layer", False)])
def test_partial_output_mask(backend, mask, norm, cl):
    x5, w, b, pshape = _make(norm, (2, 6, 5, 7), cl, torch.float32)
    if not backend.supports(x5, w):
        pytest.skip(f"{backend.name} declines CPU tensors")
    dy = torch.randn(x5.shape, dtype=torch.float64)
    *_, grads_t = _truth(x5, w, b, 1e-5, False, dy)
    _, st = backend.forward(x5, w, b, 1e-5, False)
    g = backend.backward(dy.float(), x5, st.mean, st.rstd, w, pshape, False, True, mask)
    for got, want, asked, what in zip(g, grads_t, mask, ("dx", "dweight", "dbias")):
        assert (got is not None) == asked, what
        if asked:
            _close(got, want, 1e-4 * math.sqrt(x5.numel()), what)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k1,k2", [(4, 6), (4, 1), (1, 6), (1, 1)], ids=["r1+r2", "r1", "r2", "neither"])
def test_every_parameter_span_matches_float64(backend, dtype, k1, k2):
    """Parameters may span R1, R2, both or neither with B > 1, beyond the spans today's norms use."""
    x5 = (torch.randn(2, 3, 4, 5, 6, dtype=torch.float64) * 2 + 0.5).to(dtype)
    pshape = (3, k1, 5, k2)
    w = (torch.rand(pshape, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(pshape, dtype=torch.float64).to(dtype)
    if not backend.supports(x5, w):
        pytest.skip(f"{backend.name} declines {dtype} on {x5.device.type}; the core uses the reference")
    dy = torch.randn(x5.shape, dtype=torch.float64).to(dtype)
    y_t, *_, grads_t = _truth(x5, w, b, 1e-5, False, dy)
    tol = DTYPES[dtype]
    y, st = backend.forward(x5, w, b, 1e-5, False)
    _close(y, y_t, tol, "y")
    g = backend.backward(dy, x5, st.mean, st.rstd, w, pshape, False, True, (True, True, True))
    _close(g.dx, grads_t[0], 4 * tol, "dx")
    _close(g.dweight, grads_t[1], 4 * tol * math.sqrt(x5.numel()), "dweight")
    _close(g.dbias, grads_t[2], 4 * tol * math.sqrt(x5.numel()), "dbias")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("norm,shape,cl", [
    ("layer", (16, 768), False), ("group", (4, 32, 16, 16), False), ("group", (4, 32, 16, 16), True),
    ("batch", (16, 32, 8, 8), False), ("batch", (16, 32, 8, 8), True), ("instance", (4, 32, 16, 16), True),
])
def test_backward_of_offset_data_matches_float64(backend, norm, shape, cl):
    """Mean 1e4, std 1 in float32: dx relative to the float64 gradient of the same input stays near
    the error the float32-stored mean brings (about 2e-5 here). A backward in torch's x-form
    ``a * dy * w + b * x + c`` on the raw input cancels and is off by about 1e-4."""
    x = torch.randn(shape, dtype=torch.float64) + 1e4
    shape5, ar1, ar2 = NORM_CASES[norm][1](x, cl)
    x5 = (x.movedim(1, -1).contiguous() if cl else x).view(shape5).float()
    if not backend.supports(x5, None):
        pytest.skip(f"{backend.name} declines CPU tensors")
    _, p, r1, b, r2 = shape5
    pshape = (p, r1 if ar1 else 1, b, r2 if ar2 else 1)
    w = torch.rand(pshape) + 0.5
    dy = torch.randn(x5.shape)
    *_, grads_t = _truth(x5, w, None, 1e-5, False, dy)
    _, st = backend.forward(x5, w, None, 1e-5, False)
    g = backend.backward(dy, x5, st.mean, st.rstd, w, pshape, False, True, (True, False, False))
    err = (g.dx.double() - grads_t[0]).abs().max() / grads_t[0].abs().max()
    assert err < 4e-5, f"dx relative error {err:.3g}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("buffers", [torch.float32, torch.bfloat16, torch.float16, None], ids=["fp32", "bf16", "fp16", "absent"])
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("only", [None, "mean", "var"])
def test_update_running_blends_the_mean_over_q(backend, buffers, q, only):
    """r = (1 - m) r + m s per channel, s the mean over Q (InstanceNorm) and the variance unbiased by
    ``var_scale``; absent buffers (both, or one: ``only`` the other) are skipped, buffers in another dtype
    than the statistics are blended through the statistics' dtype, NaN statistics reach the buffers, and
    the buffers' version counters move as with any in-place op."""
    p, b = 2, 5
    mean, var = torch.randn(q, p, b), torch.rand(q, p, b)
    mean[0, 1, 2] = float("nan")
    rm = None if buffers is None else torch.randn(p * b).to(buffers)
    rv = None if buffers is None else torch.rand(p * b).to(buffers)
    before = None if rm is None else (rm.double(), rv.double())
    versions = None if rm is None else (rm._version, rv._version)
    if only is not None and rm is not None:
        kept = rm if only == "mean" else rv
        old, version = kept.double(), kept._version
        backend.update_running(kept if only == "mean" else None, kept if only == "var" else None, mean, var, 0.3, 1.25)
        stat, scale = (mean, 1.0) if only == "mean" else (var, 1.25)
        want = 0.7 * old + 0.3 * scale * stat.double().mean(0).reshape(-1)
        tol = dict(rtol=1e-6, atol=1e-6) if buffers == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(kept.double(), want, equal_nan=True, **tol)
        assert kept._version > version
        return
    backend.update_running(rm, rv, mean, var, 0.3, 1.25)
    if before is None:
        return
    assert rm._version > versions[0] and rv._version > versions[1], "an in-place update bumps the version"
    want_m = 0.7 * before[0] + 0.3 * mean.double().mean(0).reshape(-1)
    want_v = 0.7 * before[1] + 0.3 * 1.25 * var.double().mean(0).reshape(-1)
    tol = dict(rtol=1e-6, atol=1e-6) if buffers == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rm.double(), want_m, equal_nan=True, **tol)
    torch.testing.assert_close(rv.double(), want_v, **tol)
    assert rm.isnan().sum() == 1 and rm.isnan()[1 * b + 2]
