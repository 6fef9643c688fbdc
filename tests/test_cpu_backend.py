"""The ``cpu`` backend beyond the contract grid: every work split and loop shape against the reference,
edge sizes, non-finite input, adversarial numerics, backend choice and thread handling."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import threading
import types

import numba
import numpy as np
import pytest
import torch

import normkit
import normkit.nn as nk
from normkit import kernels
from normkit.functional import _layout as L
from normkit.functional import activation as composed
from normkit.kernels import _numba_kernels, _pages, cpu
from normkit.numerics import CASES, LAYERS, applies, max_error
from normkit.selection import resolve


@pytest.fixture(autouse=True)
def _fresh_call_setups(monkeypatch):
    """Calls work out their set-up once and read the module constants then: the tests that change a
    constant start and end with none cached. No pause of the huge-page hint carries over from an
    earlier call that happened to be slow (``_pages.observe``), and no kept output block either."""
    monkeypatch.setattr(_pages, "_pause", 0)
    monkeypatch.setattr(_pages, "_recent", 0)
    _pages.empty_cache()
    cpu._call.cache_clear()
    yield
    cpu._call.cache_clear()
    _pages.empty_cache()


REF = kernels.load("reference")
CPU = kernels.load("cpu")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# name -> (input shape, view builder(x, channels_last) -> (shape5, affine_r1, affine_r2), layouts)
VIEWS = {
    "batch": ((6, 40, 9, 11), lambda x, cl: (L.per_channel_view(x, cl), False, False), (False, True)),
    "batch1d": ((300, 48), lambda x, cl: (L.per_channel_view(x, cl), False, False), (False,)),
    "batch-1ch": ((4, 1, 60, 70), lambda x, cl: (L.per_channel_view(x, cl), False, False), (False, True)),
    # channels-last rows of 3 columns: the column loops sweep 42 rows at once, 4495 rows end in a partial sweep
    "batch-3ch": ((5, 3, 31, 29), lambda x, cl: (L.per_channel_view(x, cl), False, False), (False, True)),
    "instance": ((3, 24, 17, 19), lambda x, cl: (L.per_instance_view(x, cl), False, False), (False, True)),
    "group": ((3, 48, 13, 15), lambda x, cl: (L.per_group_view(x, 6, cl), not cl, cl), (False, True)),
    "group-wide": ((2, 256, 9, 9), lambda x, cl: (L.per_group_view(x, 4, cl), not cl, cl), (False, True)),
    # few rows: NCHW 4x4 planes take the segment loops; channels-last units keep whole slabs
    "batch-small-planes": ((2, 40, 4, 4), lambda x, cl: (L.per_channel_view(x, cl), False, False), (False, True)),
    "group-few-rows": ((2, 64, 4, 6), lambda x, cl: (L.per_group_view(x, 8, cl), not cl, cl), (False, True)),
    # channels-last rows of 32 and 64 columns: the column and gradient sums take two rows a step, odd row
    # counts end in one
    "batch-32ch": ((3, 32, 5, 7), lambda x, cl: (L.per_channel_view(x, cl), False, False), (True,)),
    "group-64ch": ((3, 64, 5, 7), lambda x, cl: (L.per_group_view(x, 8, cl), not cl, cl), (True,)),
    "layer": ((64, 33, 96), lambda x, cl: (L.trailing_view(x, 96), True, False), (False,)),
    "layer-long": ((2, 3 * 2**16), lambda x, cl: (L.trailing_view(x, 3 * 2**16), True, False), (False,)),
    "rms": ((50, 37, 64), lambda x, cl: (L.trailing_view(x, 64), True, False), (False,)),
}
RMS = {"rms"}

# Work splits: the default; parallel; parallel with a tiny cache budget (row chunks, two passes);
# segment loops only (no column loops); serial; serial in row chunks.
SPLITS = {
    "default": {},
    "parallel": {"SERIAL_BELOW": 0},
    "rowchunks": {"SERIAL_BELOW": 0, "CACHE_BYTES": 2048, "WHOLE_BYTES": 2048},
    "segonly": {"SERIAL_BELOW": 0, "COL_MAX_RUN": 0},
    "serial": {"SERIAL_BELOW": 1 << 62},
    "serial-rowchunks": {"SERIAL_BELOW": 1 << 62, "CACHE_BYTES": 2048, "WHOLE_BYTES": 2048},
}
SERIAL_SPLITS = ("serial", "serial-rowchunks")


@pytest.fixture(params=list(SPLITS))
def split(request, monkeypatch):
    for name, value in SPLITS[request.param].items():
        monkeypatch.setattr(cpu, name, value)
    return request.param


def _split_dtypes(dtypes):
    """(split, dtype) pairs. The parallel and the serial drivers are one source compiled twice (a
    minute or more per dtype and activation from a cold cache): the default run checks the parallel
    ones in float32, every dtype on the serial ones in both fused and row-chunked plans; the slow run
    checks the parallel ones in every dtype."""
    for split_name in SPLITS:
        for dtype in dtypes:
            slow = split_name not in SERIAL_SPLITS and dtype != torch.float32
            yield pytest.param(split_name, dtype, id=f"{split_name}-{dtype}", marks=[pytest.mark.slow] if slow else [])


def _make(view: str, cl: bool, dtype: torch.dtype, affine: bool = True):
    shape, build, _ = VIEWS[view]
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    if cl:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    shape5, ar1, ar2 = build(x, cl)
    xc = x.movedim(1, -1).contiguous() if cl else x.contiguous()
    _, p, r1, b, r2 = shape5
    pshape = (p, r1 if ar1 else 1, b, r2 if ar2 else 1)
    w = (torch.rand(pshape, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    bias = torch.randn(pshape, dtype=torch.float64).to(dtype) if affine else None
    return xc.view(shape5), w, bias, pshape


def _close(actual, expected, tol, what):
    a, e = actual.double(), expected.double()
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


def _cases():
    for view, (_, _, layouts) in VIEWS.items():
        for cl in layouts:
            yield pytest.param(view, cl, id=f"{view}-{'cl' if cl else 'cf'}")


@pytest.mark.parametrize("split,dtype", list(_split_dtypes([torch.float32, torch.float64, torch.bfloat16])),
                         indirect=["split"])
@pytest.mark.parametrize("view,cl", list(_cases()))
def test_every_split_matches_reference(split, view, cl, dtype):
    x5, w, b, pshape = _make(view, cl, dtype)
    rms = view in RMS
    tol = TOL[dtype]
    y, st = CPU.forward(x5, w, b, 1e-5, rms)
    y_r, st_r = REF.forward(x5, w, b, 1e-5, rms)
    _close(y, y_r, tol, "y")
    for name in ("mean", "rstd", "var"):
        _close(getattr(st, name), getattr(st_r, name), 1e-5 if dtype != torch.float64 else 1e-10, name)

    dy = torch.randn_like(x5, dtype=torch.float64).to(dtype)
    for batch_stats in (True, False):
        g = CPU.backward(dy, x5, st_r.mean, st_r.rstd, w, pshape, rms, batch_stats, (True, True, True))
        g_r = REF.backward(dy, x5, st_r.mean, st_r.rstd, w, pshape, rms, batch_stats, (True, True, True))
        _close(g.dx, g_r.dx, 4 * tol, f"dx batch_stats={batch_stats}")
        n = math.sqrt(x5.numel())
        _close(g.dweight, g_r.dweight, 4 * tol * n, "dweight")
        _close(g.dbias, g_r.dbias, 4 * tol * n, "dbias")

    y_r = REF.normalize(x5, st_r.mean, st_r.rstd, w, b)
    _close(CPU.normalize(x5, st_r.mean, st_r.rstd, w, b), y_r, tol, "normalize")
    _close(CPU.normalize(x5, st_r.mean, st_r.var, w, b, var_eps=1e-5), y_r, tol, "normalize from the variance")


def _activation_cases():
    """Every activation through every view and split. The activation code is the same in every loop
    (the split only changes which loops run), and each activation compiles the drivers once more from
    a cold cache: the default run takes the serial splits (fused and row-chunked passes), the slow run
    the parallel ones."""
    for case in _cases():
        view, cl = case.values
        for split_name in SPLITS:
            for activation in ("relu", "silu", "gelu"):
                yield pytest.param(
                    split_name, view, cl, activation, id=f"{split_name}-{case.id}-{activation}",
                    marks=[] if split_name in SERIAL_SPLITS else [pytest.mark.slow],
                )


@pytest.mark.parametrize("split,view,cl,activation", list(_activation_cases()), indirect=["split"])
def test_fused_activation_matches_reference_then_activation(split, view, cl, activation):
    """The fused epilogue against the reference followed by torch's activation (the core's composed
    path, ``normkit.functional.activation``): forward, normalize, and backward against the reference
    backward fed ``dy * activation'(z)``."""
    x5, w, b, pshape = _make(view, cl, torch.float32)
    rms = view in RMS
    y, st = CPU.forward(x5, w, b, 1e-5, rms, activation=activation)
    z, st_r = REF.forward(x5, w, b, 1e-5, rms)
    _close(y, composed.apply(activation, z), 2e-5, "y")
    _close(CPU.normalize(x5, st_r.mean, st_r.rstd, w, b, activation=activation), composed.apply(activation, z), 2e-5,
           "normalize")
    dy = torch.randn_like(x5)
    n = math.sqrt(x5.numel())
    for batch_stats in (True, False):
        g = CPU.backward(dy, x5, st_r.mean, st_r.rstd, w, pshape, rms, batch_stats, (True, True, True),
                         bias=b, activation=activation)
        g_r = REF.backward(composed.backward(activation, z, dy), x5, st_r.mean, st_r.rstd, w, pshape, rms, batch_stats, (True, True, True))
        _close(g.dx, g_r.dx, 1e-4, f"dx batch_stats={batch_stats}")
        _close(g.dweight, g_r.dweight, 1e-4 * n, "dweight")
        _close(g.dbias, g_r.dbias, 1e-4 * n, "dbias")
        # without dx the first pass keeps the activation's gradient aside, not in dx: the same sums
        g_p = CPU.backward(dy, x5, st_r.mean, st_r.rstd, w, pshape, rms, batch_stats, (False, True, True),
                           bias=b, activation=activation)
        assert g_p.dx is None and torch.equal(g_p.dweight, g.dweight) and torch.equal(g_p.dbias, g.dbias)


def test_fused_activation_keeps_nan_and_rejects_unknown_names():
    x5, w, b, pshape = _make("group", True, torch.float32)
    x5[0, 0, 0, 0, 0] = float("nan")
    for activation in ("relu", "silu", "gelu"):
        y, _ = CPU.forward(x5, w, b, 1e-5, False, activation=activation)
        assert y[0, :, :, 0].isnan().all() and not y[1:].isnan().any() and not y[0, :, :, 1:].isnan().any()
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        CPU.forward(x5, w, b, 1e-5, False, activation="tanh")


@pytest.mark.parametrize("split,dtype", list(_split_dtypes([torch.float32, torch.bfloat16])), indirect=["split"])
@pytest.mark.parametrize("view,cl", list(_cases()))
def test_squares_beyond_float32_fall_back_to_float64(split, view, cl, dtype):
    """Inputs of scale 1e20: the float32 block sums of squares overflow and every split and loop
    shape must take its float64 path."""
    x5, w, b, _ = _make(view, cl, torch.float32)
    x5 = (x5 * 1e20).to(dtype)
    rms = view in RMS
    y, st = CPU.forward(x5, w.to(dtype), b.to(dtype), 1e-5, rms)
    y_r, st_r = REF.forward(x5, w.to(dtype), b.to(dtype), 1e-5, rms)
    assert torch.isfinite(y).all()
    _close(y, y_r, TOL[dtype], "y")
    _close(st.rstd * 1e20, st_r.rstd * 1e20, 1e-5, "rstd")


@pytest.mark.parametrize("view,cl", [("group", True), ("batch", True), ("layer", False)])
def test_without_affine_and_partial_masks(split, view, cl):
    x5, _, _, pshape = _make(view, cl, torch.float32, affine=False)
    y, st = CPU.forward(x5, None, None, 1e-5, False)
    y_r, _ = REF.forward(x5, None, None, 1e-5, False)
    _close(y, y_r, 2e-5, "y")
    dy = torch.randn_like(x5)
    for mask in ((True, False, False), (False, True, True), (False, False, True)):
        g = CPU.backward(dy, x5, st.mean, st.rstd, None, pshape, False, True, mask)
        g_r = REF.backward(dy, x5, st.mean, st.rstd, None, pshape, False, True, mask)
        for a, e in zip(g, g_r):
            assert (a is None) == (e is None)
            if a is not None:
                _close(a, e, 1e-4, f"mask {mask}")


@pytest.mark.parametrize(
    "shape,groups",
    [((7, 1), None), ((3, 1, 5), 1), ((2, 2048, 2, 2), 32), ((100_000, 8), None), ((5, 7, 3), 7), ((2, 6, 1, 1), 3)],
    ids=["one-element", "one-channel", "large-C", "huge-Q", "odd", "unit-spatial"],
)
@pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
def test_edge_shapes_through_layers(shape, groups, cl):
    x = torch.randn(shape)
    if cl and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    if groups is None:
        layers = [(nk.LayerNorm(shape[-1]), torch.nn.LayerNorm(shape[-1])), (nk.RMSNorm(shape[-1]), torch.nn.RMSNorm(shape[-1]))]
    else:
        layers = [(nk.GroupNorm(groups, shape[1]), torch.nn.GroupNorm(groups, shape[1]))]
    if x.dim() == 4 and math.prod(shape[2:]) > 1:
        layers.append((nk.InstanceNorm2d(shape[1], affine=True), torch.nn.InstanceNorm2d(shape[1], affine=True)))
    if shape[0] * math.prod(shape[2:]) > 1 and x.dim() in (2, 3, 4):
        bn = {2: nk.BatchNorm1d, 3: nk.BatchNorm1d, 4: nk.BatchNorm2d}[x.dim()]
        layers.append((bn(shape[1]), getattr(torch.nn, bn.__name__)(shape[1])))
    for ours, theirs in layers:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with normkit.backend("cpu"):
            ya = ours(xa)
            (ya * torch.arange(ya.numel()).view_as(ya).sin()).sum().backward()
        yb = theirs(xb)
        (yb * torch.arange(yb.numel()).view_as(yb).sin()).sum().backward()
        _close(ya, yb, 1e-4, f"{type(ours).__name__} y")
        _close(xa.grad, xb.grad, 1e-3, f"{type(ours).__name__} dx")


@pytest.mark.parametrize("split_name", ["serial", "parallel"])
@pytest.mark.parametrize("view,cl", [("batch", False), ("batch", True), ("group", True), ("layer", False)])
def test_nan_and_inf_propagate_to_their_groups_only(monkeypatch, split_name, view, cl):
    for name, value in SPLITS[split_name].items():
        monkeypatch.setattr(cpu, name, value)
    x5, w, b, _ = _make(view, cl, torch.float32)
    x5 = x5.clone()
    x5[0, 0, 1, 0, 0] = float("nan")
    x5[-1, 0, 2, -1, -1] = float("inf")
    y, st = CPU.forward(x5, w, b, 1e-5, False)
    y_r, st_r = REF.forward(x5, w, b, 1e-5, False)
    assert torch.equal(torch.isnan(y), torch.isnan(y_r))
    assert torch.equal(torch.isfinite(st.mean), torch.isfinite(st_r.mean))
    finite = torch.isfinite(y_r)
    _close(y[finite], y_r[finite], 2e-5, "finite part")


def _numerics_params():
    for layer, (_, _, layouts) in LAYERS.items():
        for case in CASES:
            if applies(layer, case):
                for layout in layouts if not case.long else ("contiguous",):
                    yield pytest.param(layer, case, layout, id=f"{layer}-{case.name}-{layout}")


@pytest.mark.parametrize("split_name", ["serial", "rowchunks"])
@pytest.mark.parametrize("layer,case,layout", list(_numerics_params()))
def test_numerics_bound_on_cpu(monkeypatch, split_name, layer, case, layout):
    for name, value in SPLITS[split_name].items():
        monkeypatch.setattr(cpu, name, value)
    with normkit.backend("cpu"):
        err = max_error(layer, case, layout, nk)
    bound = case.bound(layer)
    if bound == 0:
        assert err == 0.0, f"constant input must normalize to exactly beta, max error {err}"
    else:
        assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


def test_column_loops_need_rows(monkeypatch):
    """Column loops only for views, and in units, of at least ``col_rows(R2)`` rows: with fewer, the
    per-unit expansion of per-group values to columns costs more than the segment loops."""
    monkeypatch.setattr(cpu, "SERIAL_BELOW", 0)
    assert cpu.col_rows(1) == 4 and cpu.col_rows(8) == 16
    few = torch.empty(1, 1, 2, 40, 16)  # BatchNorm NCHW, 2 x 40 x 4 x 4
    assert not cpu.launch(tuple(few.shape), few.dtype, (1, 1, 40, 1), 2).view.col
    enough = torch.empty(2, 1, 24, 8, 8)  # GroupNorm(8) channels-last, 2 x 64 x 4 x 6
    ln = cpu.launch(tuple(enough.shape), enough.dtype, (1, 1, 8, 8), 2)
    _, nrc, rchunk, _, _ = ln.plan
    assert ln.view.col and ln.loops == "col" and (nrc == 1 or rchunk >= cpu.col_rows(8))


@pytest.mark.parametrize("view", ["layer", "rms"])
def test_serial_rows_with_a_parameter_each_share_fused_units(view):
    """The serial LayerNorm/RMSNorm views of the grid above run fused units of many rows on one lane:
    the backward's ``whole`` order (every row's sums, then every row's dx) is what the grid's serial
    splits check against the reference, and would not be checked with one row a unit."""
    x5, w, _, pshape = _make(view, False, torch.float32)
    ln = cpu.launch(tuple(x5.shape), x5.dtype, pshape, 1)
    gchunk, nrc, _, _, _ = ln.plan
    assert ln.lanes == 1 and nrc == 1 and gchunk > 1 and ln.view.k2 > 1 and ln.view.g > gchunk


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scratch_arrays_start_on_cache_lines(dtype):
    """Scratch arrays the kernels read or add into on every row start on 64-byte boundaries (numba's own
    start on 32): vector loads that straddle cache lines made the column loops 20-25% slower."""
    for n in (1, 7, 16, 100, 512, 4099):
        a = _numba_kernels._aligned(n, dtype)
        z = _numba_kernels._aligned_zeros(n, dtype)
        assert a.shape == z.shape == (n,) and a.dtype == z.dtype == dtype
        assert a.ctypes.data % 64 == 0 and z.ctypes.data % 64 == 0
        assert not z.any()


@pytest.mark.parametrize("vector_ldexp", [True, False])
def test_float32_exp_is_within_an_ulp_over_its_whole_range(monkeypatch, vector_ldexp):
    """The float32 exp of the activations, scaled either way (``_ldexp``; the machine decides which one
    the kernels compile), against float64's exp rounded to float32: within 1 ulp, the subnormals
    included, inf past the range, 0 below the subnormals and at -inf, NaN kept."""
    monkeypatch.setattr(_numba_kernels, "_scales_in_vectors", lambda: vector_ldexp)

    @numba.njit(**dict(_numba_kernels._DRIVER, cache=False))
    def run(x, y):
        for k in range(x.shape[0]):
            y[k] = _numba_kernels._exp(x[k])

    special = [np.nan, np.inf, -np.inf, 88.72283, 88.7229, 88.73, 1e30, -87.3365, -87.34, -103.9, -103.98, -104.0,
               -1e30, 0.0, -0.0]
    x = np.concatenate([np.linspace(-110, 90, 1_000_001), special]).astype(np.float32)
    y = np.empty_like(x)
    run(x, y)
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(np.float32)
    finite = np.isfinite(ref)
    assert np.abs(y[finite].view(np.int32).astype(np.int64) - ref[finite].view(np.int32)).max() <= 1
    assert (y[ref == np.inf] == np.inf).all() and (y[ref == 0] == 0).all() and np.isnan(y[np.isnan(x)]).all()
    assert ((ref > 0) & (ref < np.finfo(np.float32).tiny)).sum() > 1000  # the subnormals were checked


def test_float32_exp_takes_vector_ldexp_only_where_compiled_for_avx512(monkeypatch):
    """Without AVX-512 LLVM turns a vector ldexp into a libm call per element: the choice follows the
    features numba compiles for."""
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert not _numba_kernels._scales_in_vectors()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,+avx512f,+avx512vl")
    assert _numba_kernels._scales_in_vectors()


def test_a_group_past_the_cache_budget_stays_whole_up_to_whole_bytes(monkeypatch):
    """A group larger than ``CACHE_BYTES`` cannot share a unit, but is still fused (one row chunk:
    statistics and output in one read from memory) up to ``WHOLE_BYTES``; beyond, it is cut into row
    chunks of at most ``CACHE_BYTES`` read in two passes."""
    monkeypatch.setattr(cpu, "CACHE_BYTES", 1 << 12)
    monkeypatch.setattr(cpu, "WHOLE_BYTES", 1 << 14)
    for rows, fused in ((8, True), (32, True), (64, False)):  # BatchNorm NCHW, channels of rows x 512 B
        ln = cpu.launch((1, 1, rows, 16, 128), torch.float32, (1, 1, 16, 1), 2)
        _, nrc, rchunk, _, bchunk = ln.plan
        assert bchunk == 1 and (nrc == 1) == fused
        assert fused or rchunk * 128 * 4 <= cpu.CACHE_BYTES


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize(
    "shape5", [(1, 1, 32, 512, 49), (1, 1, 8, 256, 1024), (1, 1, 4096, 64, 1), (64, 1, 1, 1, 768), (2, 1, 1, 1, 5),
               (1, 1, 3, 7, 5), (8, 1, 64, 8, 32), (32, 1, 96, 32, 2), (3, 1, 5, 7, 1)],
)
def test_output_units_run_through_memory_in_order(monkeypatch, shape5, threads):
    """The output-only pass (given statistics) cuts the view into runs of consecutive memory: taken
    in order, the units cover every (slab, row, group) once, each starting where the last one ended,
    so each thread's share of them is one contiguous block."""
    monkeypatch.setattr(cpu, "SERIAL_BELOW", 0)
    _, p, _, b, _ = shape5
    ln = cpu.launch(tuple(shape5), torch.float32, (p, 1, b, 1), threads, apply=True)
    g_total, r_total, b_total = ln.view.g, ln.view.r1, ln.view.b
    covered = []
    for u in range(_numba_kernels._units(ln.plan, g_total)):
        g0, g1, _, r0, r1_, b0, b1 = _numba_kernels._unit(u, ln.plan, g_total, r_total, b_total)
        covered += [(g * r_total + r) * b_total + c for g in range(g0, g1) for r in range(r0, r1_) for c in range(b0, b1)]
    assert covered == list(range(g_total * r_total * b_total))
    if ln.loops == "seg":  # column units keep a minimum of rows (test_column_loops_need_rows)
        assert _numba_kernels._units(ln.plan, g_total) >= min(threads, g_total * r_total * b_total)


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_large_outputs_ask_for_huge_pages(monkeypatch, cached):
    """y, dx and normalize's output of ``_pages.HINT_BYTES`` and more (here lowered to 4 MB, to keep the
    tensors small) are advised into huge pages before they are written: a new block of the output cache
    from the output's start over its 2 MB pages, or without the cache the whole 2 MB pages inside the
    output; smaller ones are left alone; results are unchanged."""
    advised = []
    monkeypatch.setattr(_pages, "madvise", lambda addr, length, advice: advised.append((addr, length, advice)) or 0)
    monkeypatch.setattr(_pages, "CACHE_LIMIT", (64 << 20) if cached else 0)
    x5 = torch.randn(1, 1, 8, 64, 2560) + 3.0  # 5.2 MB
    w, b = torch.rand(1, 1, 64, 1) + 0.5, torch.randn(1, 1, 64, 1)
    CPU.forward(x5, w, b, 1e-5, False)
    assert advised == []  # the default threshold: heap memory, left alone
    monkeypatch.setattr(_pages, "MIN_BYTES", 4 << 20)
    monkeypatch.setattr(_pages, "HINT_BYTES", 4 << 20)
    cpu._call.cache_clear()  # the threshold is read with a call's set-up
    y, st = CPU.forward(x5, w, b, 1e-5, False)
    g = CPU.backward(torch.ones_like(x5), x5, st.mean, st.rstd, w, (1, 1, 64, 1), False, True, (True, True, True))
    y_fixed = CPU.normalize(x5, st.mean, st.rstd, w, b)
    assert len(advised) == 3
    for out, (addr, length, advice) in zip((y, g.dx, y_fixed), advised):
        start, end = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
        assert advice == _pages.MADV_HUGEPAGE and addr % _pages.HUGE_PAGE == 0 and length % _pages.HUGE_PAGE == 0
        if cached:
            assert addr == start and end <= addr + length < end + _pages.HUGE_PAGE
        else:
            assert start <= addr < addr + length <= end and end - start - length < 2 * _pages.HUGE_PAGE
    y_r, st_r = REF.forward(x5, w, b, 1e-5, False)
    _close(y, y_r, 1e-5, "y")
    _close(y_fixed, y_r, 1e-5, "normalize")
    _close(g.dx, REF.backward(torch.ones_like(x5), x5, st_r.mean, st_r.rstd, w, (1, 1, 64, 1), False, True,
                              (True, True, True)).dx, 1e-4, "dx")
    advised.clear()
    CPU.forward(x5[:, :, :1, :, :1000].contiguous(), w, b, 1e-5, False)
    assert advised == []


def test_freed_large_outputs_are_reused(monkeypatch):
    """A large output's memory is kept when the tensor is freed and is the next output of its size: no
    new pages to fault in. Such an output is an ordinary tensor (no view of another, its input's layout)
    and never shares memory with a live one."""
    advised = []
    monkeypatch.setattr(_pages, "madvise", lambda addr, length, advice: advised.append(addr) or 0)
    monkeypatch.setattr(_pages, "MIN_BYTES", 4 << 20)
    monkeypatch.setattr(_pages, "CACHE_LIMIT", 64 << 20)
    layer = nk.BatchNorm2d(64).eval()
    x = torch.randn(8, 64, 48, 48).to(memory_format=torch.channels_last)  # 4.7 MB
    with torch.no_grad():
        y = layer(x)
        first = y.data_ptr()
        expected = torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias)
        _close(y, expected, 1e-6, "y")
        del y
        assert _pages.cached_bytes() == 6 << 20  # rounded up to whole 2 MB pages
        y = layer(x)
        assert y.data_ptr() == first and _pages.cached_bytes() == 0
        assert y._base is None and y.is_contiguous(memory_format=torch.channels_last)
        _close(y, expected, 1e-6, "y on reused memory")
        kept = y.clone()
        z = layer(x * 2.0)
        assert z.data_ptr() != y.data_ptr() and torch.equal(y, kept)
    assert torch.equal(y.add_(1.0), kept + 1.0)  # in place, as on any tensor
    del y, z
    layer.train()
    xg = x.detach().requires_grad_()
    out = layer(xg)
    out.relu_()  # in place on the Function's output, on a kept block: refused were it a view
    out.sum().backward()
    twin, xt = torch.nn.BatchNorm2d(64), x.detach().requires_grad_()
    twin(xt).relu_().sum().backward()
    _close(xg.grad, xt.grad, 1e-4, "dx after an in-place ReLU")
    assert advised == []  # blocks under HINT_BYTES stay in the pages they get


def test_output_cache_limit_and_empty_cache(monkeypatch):
    """At most ``CACHE_LIMIT`` bytes of freed blocks are kept; 0 turns the cache off (outputs are torch
    allocations again); ``empty_cache`` lets go of what is kept."""
    monkeypatch.setattr(_pages, "MIN_BYTES", 4 << 20)
    t = torch.empty(5 << 18)  # 5 MB
    monkeypatch.setattr(_pages, "CACHE_LIMIT", 8 << 20)
    a, b = _pages.empty_like(t), _pages.empty_like(t)
    assert not a.untyped_storage().resizable()  # memory torch did not allocate
    del a, b
    assert _pages.cached_bytes() == 6 << 20  # the second block was over the limit
    normkit.empty_cache()
    assert _pages.cached_bytes() == 0
    monkeypatch.setattr(_pages, "CACHE_LIMIT", 0)
    c = _pages.empty_like(t)
    assert c.untyped_storage().resizable()
    del c
    assert _pages.cached_bytes() == 0
    monkeypatch.setenv("NORMKIT_OUTPUT_CACHE_MB", "0")
    assert _pages._cache_limit() == 0
    monkeypatch.setenv("NORMKIT_OUTPUT_CACHE_MB", "256")
    assert _pages._cache_limit() == 256 << 20
    monkeypatch.delenv("NORMKIT_OUTPUT_CACHE_MB")
    assert 0 < _pages._cache_limit() <= 1 << 30
    a = _pages.empty_like(t)
    del a
    assert _pages.cached_bytes() == 0  # off


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_outputs_on_kept_blocks_are_like_torch_empty_like(monkeypatch, dtype):
    """Dtype, shape and strides (channels-last too) as ``torch.empty_like``'s, and no view of another
    tensor, whichever dtype: autograd refuses in-place changes of a custom Function's outputs that are views."""
    monkeypatch.setattr(_pages, "MIN_BYTES", 1 << 20)
    monkeypatch.setattr(_pages, "CACHE_LIMIT", 64 << 20)
    for like in (torch.empty(4, 32, 64, 64), torch.empty(4, 32, 64, 64).to(memory_format=torch.channels_last)):
        addresses = []
        for _ in range(2):  # a new block, then the same one kept
            out, ref = _pages.empty_like(like, dtype), torch.empty_like(like, dtype=dtype)
            addresses.append(out.data_ptr())
            assert (out.dtype, out.shape, out.stride()) == (ref.dtype, ref.shape, ref.stride())
            assert out._base is None and not out._is_view() and out.data_ptr() % _pages.HUGE_PAGE == 0
            out.fill_(2.0)
            assert torch.all(out == 2.0)
            del out
        assert addresses[0] == addresses[1]
    nbytes = like.numel() * dtype.itemsize  # 1 MB and more
    assert _pages.cached_bytes() == -(-nbytes // _pages.HUGE_PAGE) * _pages.HUGE_PAGE


def test_output_blocks_are_never_shared_between_threads(monkeypatch):
    """Threads taking and freeing large outputs at once each write and read back their own memory."""
    monkeypatch.setattr(_pages, "MIN_BYTES", 1 << 20)
    monkeypatch.setattr(_pages, "CACHE_LIMIT", 64 << 20)
    like = torch.empty(1 << 18)  # 1 MB
    errors = []

    def work(k: int) -> None:
        for i in range(200):
            live = [_pages.empty_like(like).fill_(k * 1000 + i + j) for j in range(3)]
            if any(not torch.all(t == k * 1000 + i + j) for j, t in enumerate(live)):
                errors.append((k, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # at most six blocks live per thread (a list of three and the one before), so at most that many kept
    assert errors == [] and 0 < _pages.cached_bytes() <= 4 * 6 * (2 << 20)


def test_stalled_hinted_calls_pause_the_hint(monkeypatch):
    """A call that wrote an advised output more slowly than ``STALL_BYTES_PER_S`` (the kernel compacting
    memory on the faults) stalled. Fewer than ``STALLS`` stalls in the last ``WINDOW`` hinted calls change
    nothing; ``STALLS`` leave the hint off for the next ``PAUSE`` large outputs, after which it is tried
    again with a fresh window. The hint is timed from the advice to the written output (``time`` patched
    here), not on the first call of each set-up, which may load the driver from the disk cache."""
    advised = []
    monkeypatch.setattr(_pages, "madvise", lambda addr, length, advice: advised.append(addr) or 0)
    monkeypatch.setattr(_pages, "MIN_BYTES", 4 << 20)
    monkeypatch.setattr(_pages, "HINT_BYTES", 4 << 20)
    monkeypatch.setattr(_pages, "PAUSE", 2)
    monkeypatch.setattr(_pages, "CACHE_LIMIT", 0)  # each output new memory, advised
    monkeypatch.setattr(cpu, "_ran", set())
    cpu._call.cache_clear()
    x5 = torch.randn(1, 1, 8, 64, 2560)  # 5.2 MB
    w, b = torch.ones(1, 1, 64, 1), torch.zeros(1, 1, 64, 1)
    slow = iter(range(10 ** 6))  # a second between any two readings: every call stalls

    def calls(n, stalling):
        clock = (lambda: float(next(slow))) if stalling else (lambda: 0.0)
        monkeypatch.setattr(_pages, "time", types.SimpleNamespace(perf_counter=clock))
        advised.clear()
        for _ in range(n):
            CPU.forward(x5, w, b, 1e-5, False)
        return len(advised)

    stalls = _pages.STALLS
    assert calls(1, False) == 1  # the first call of a set-up is not judged
    assert calls(stalls - 1, True) == stalls - 1 and calls(_pages.WINDOW, False) == _pages.WINDOW  # too few
    assert calls(stalls, True) == stalls  # the last of these ...
    assert calls(2, True) == 0  # ... paused the hint for 2
    assert calls(stalls, True) == stalls  # tried again: paused after as many stalls ...
    assert calls(2, False) == 0 and calls(3, False) == 3  # ... for 2; then fast calls keep the hint


def test_float16_copies_ask_for_huge_pages_too(monkeypatch):
    """float16 runs on a float32 copy and is rounded back: both copies are large outputs as well."""
    advised = []
    monkeypatch.setattr(_pages, "madvise", lambda addr, length, advice: advised.append(length) or 0)
    monkeypatch.setattr(_pages, "MIN_BYTES", 4 << 20)
    monkeypatch.setattr(_pages, "HINT_BYTES", 4 << 20)
    x5 = (torch.randn(1, 1, 8, 64, 4096) + 3.0).half()  # 4.2 MB in float16, 8.4 MB widened
    w, b = torch.rand(1, 1, 64, 1) + 0.5, torch.randn(1, 1, 64, 1)
    y, _ = CPU.forward(x5, w, b, 1e-5, False)
    assert len(advised) == 3 and y.dtype == torch.float16
    y_r, _ = REF.forward(x5, w, b, 1e-5, False)
    _close(y.float(), y_r.float(), TOL[torch.float16], "y")


def test_shapes_that_do_not_fit_the_view_are_refused():
    """The kernels index raw memory by the view's dims: a parameter, statistic or gradient of the
    wrong size is an error, not a read past its end."""
    x5 = torch.randn(2, 3, 4, 5, 6)
    w, st = torch.ones(3, 1, 5, 1), REF.forward(x5, None, None, 1e-5, False)[1]
    for bad in (torch.ones(3, 1, 4, 1), torch.ones(2, 1, 5, 1), torch.ones(3, 2, 5, 1), torch.ones(3, 1, 5, 2)):
        with pytest.raises(ValueError, match="do not fit the view"):
            CPU.forward(x5, bad, None, 1e-5, False)
    with pytest.raises(ValueError, match="statistics for 30 groups"):
        CPU.normalize(x5, st.mean[:1], st.rstd, w, None)
    with pytest.raises(ValueError, match="statistics for 30 groups"):
        CPU.backward(x5, x5, st.mean, st.rstd[:, :2], w, (3, 1, 5, 1), False, True, (True, True, True))
    with pytest.raises(ValueError, match="dy of shape"):
        CPU.backward(x5[:1], x5, st.mean, st.rstd, w, (3, 1, 5, 1), False, True, (True, True, True))
    flat, wide = x5.view(-1), (2, 3, 4, 5, 7)  # a tensor with a view beside it that does not cover it
    with pytest.raises(ValueError, match="a view of 840 elements for a tensor of 720"):
        CPU.forward(flat, w.flatten(), None, 1e-5, False, shape=wide, param_shape=(3, 1, 5, 1))
    with pytest.raises(ValueError, match="a view of 840 elements for a tensor of 720"):
        CPU.normalize(flat, st.mean, st.rstd, None, None, shape=wide)
    with pytest.raises(ValueError, match="a view of 840 elements for a tensor of 720"):
        CPU.backward(flat, flat, st.mean, st.rstd, None, (3, 1, 5, 1), False, True, (True, False, False), shape=wide)


def test_core_grades_a_broadcast_parameter_like_the_reference():
    """Through the core, one weight and bias for every channel: autograd sums the view-sized gradients
    the kernels return to the parameters' shape, as with the reference backend."""
    from normkit.functional._core import normalize_batch

    x = torch.randn(2, 3, 40, 5, requires_grad=True)
    w, b = torch.full((1,), 1.5, requires_grad=True), torch.full((1,), -0.25, requires_grad=True)
    grads = {}
    for name in ("reference", "cpu"):
        with normkit.backend(name):
            y, _ = normalize_batch(x, (1, 1, 6, 40, 5), w, b, 1e-5, param_shape=(1, 1, 40, 1))
            grads[name] = torch.autograd.grad(y.square().sum(), (x, w, b))
    for got, want, what in zip(grads["cpu"], grads["reference"], ("dx", "dweight", "dbias")):
        assert got.shape == want.shape
        _close(got, want, 1e-4, what)


def test_auto_picks_cpu_and_falls_back():
    x5 = torch.randn(4, 1, 8, 3, 5)
    with normkit.backend("auto"):
        assert resolve(x5, None).name == "cpu"
        assert resolve(x5.to(torch.float16), None).name == "cpu"
        assert resolve(x5[:0], None).name == "reference"
        assert resolve(torch.randn(4, 1, 8, 3, 5, device="meta"), None).name == "reference"
    with normkit.backend("reference"):
        assert resolve(x5, None).name == "reference"


def test_importing_normkit_compiles_nothing():
    code = "import sys, normkit, normkit.nn; print(any(m.startswith('numba') for m in sys.modules))"
    out = _python(code)
    assert out.strip() == "False"


def _python(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_threads_follow_torch(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu.threads_for(1 << 24) == 1
        torch.set_num_threads(max(2, threads))
        assert cpu.threads_for(1 << 24) == min(max(2, threads), cpu.numba.config.NUMBA_NUM_THREADS)
        assert cpu.threads_for(10) == 1
        monkeypatch.setattr(cpu, "_parallel_pid", os.getpid() + 1)
        assert cpu.threads_for(1 << 24) == 1
    finally:
        torch.set_num_threads(threads)


FORK_INPUT = torch.randn(2, 1, 256, 64, 1, generator=torch.Generator().manual_seed(1))


def _child_forward(queue):
    """Only normkit runs here: torch's own OpenMP pool is not usable after fork with 2 threads."""
    y, _ = CPU.forward(FORK_INPUT, None, None, 1e-5, False)
    queue.put(y.tolist())


@pytest.mark.skipif(cpu.numba.config.NUMBA_NUM_THREADS < 2, reason="needs two threads")
def test_forked_child_after_parallel_use(monkeypatch):
    """A forked worker (DataLoader) must run the serial kernels: the OpenMP layer is not fork-safe."""
    monkeypatch.setattr(cpu, "SERIAL_BELOW", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected, _ = CPU.forward(FORK_INPUT, None, None, 1e-5, False)
        assert cpu._parallel_pid == os.getpid()
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_forward, args=(queue,))
        proc.start()
        got = torch.tensor(queue.get(timeout=120))
        proc.join(30)
    finally:
        torch.set_num_threads(threads)
    assert proc.exitcode == 0
    _close(got, expected, 1e-6, "forked child")


PRECOMPILE_THEN_CALL = """
import json, torch, normkit.functional as F, normkit.nn as nk
from normkit.kernels import cpu

def counts():
    return [len(d[a][1].signatures) for d in cpu.DRIVERS.values() for a in (None, "silu")]

list(cpu.precompile((torch.float32,), (None, "silu"), (False,)))
before = counts()
cpu.SERIAL_BELOW = 1 << 62
for cl in (False, True):
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    for layer in (nk.BatchNorm2d(8), nk.GroupNorm(2, 8), nk.InstanceNorm2d(8, affine=True)):
        layer(x).sum().backward()
        layer.eval()(x)
    F.group_norm(x, 2, torch.ones(8), torch.zeros(8), activation="silu").sum().backward()
    F.layer_norm(x, (6,)).sum()
print(json.dumps([before, counts()]))
"""


def test_precompile_covers_the_signatures_of_real_calls(capsys):
    """In a fresh process (no driver compiled or loaded yet), ``precompile`` readies every serial driver
    once, and calls through the layers (both loop shapes, training and eval, backward) compile nothing
    more: the drivers it ran are those calls' signatures. The command prints each family."""
    from normkit.cli import main

    compiled, after_calls = json.loads(_python(PRECOMPILE_THEN_CALL))
    assert compiled == [1] * (2 * len(cpu.DRIVERS))
    assert after_calls == compiled
    assert main(["precompile", "--dtypes", "fp32", "--activations", "none,silu", "--modes", "serial"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("serial float32 None: ")
    assert main(["precompile", "--dtypes", "fp16", "--activations", "none", "--modes", "serial"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("serial float16 (float32 kernels) None: ")
    with pytest.raises(SystemExit) as exc:
        main(["precompile", "--dtypes", "fp8"])
    assert exc.value.code == 2 and "unknown dtypes ['fp8']" in capsys.readouterr().err
