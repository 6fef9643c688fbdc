"""The Triton kernels, run by Triton's interpreter on CPU tensors, against the reference backend.

Triton picks the interpreter when it is imported, so this process (where TRITON_INTERPRET is unset)
checks that the backend declines CPU tensors, runs the CUDA checks when a GPU is present, and runs
this same file in a child process with TRITON_INTERPRET=1, where the interpreter checks are defined.
Shapes there are small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import normkit  # noqa: E402
from normkit import kernels  # noqa: E402
from normkit.functional import _core, _layout as L  # noqa: E402
from normkit.kernels.reference import ReferenceBackend  # noqa: E402
from normkit.kernels.triton import TritonBackend, launch  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
REF = ReferenceBackend()

# One streamed tile is at most 64 elements and groups above 64 elements are split over programs, so
# small shapes take the multi-tile, split-reduction and multi-program-parameter-sum paths.
SPLIT = TritonBackend(max_tile=64, max_fused=64, programs=3)
FUSED = TritonBackend()

VIEWS = {
    # name: (input shapes, view(x, channels_last) -> (shape5, affine spans r1, affine spans r2), layouts)
    "batch": ([(3, 5, 4, 7), (2, 3, 9, 9), (5, 3)], lambda x, cl: (L.per_channel_view(x, cl), False, False)),
    "instance": ([(2, 3, 5, 7), (2, 5, 11)], lambda x, cl: (L.per_instance_view(x, cl), False, False)),
    "group": ([(2, 6, 5, 3), (3, 4, 13)], lambda x, cl: (L.per_group_view(x, 2, cl), not cl, cl)),
    "layer": ([(4, 37), (3, 2, 70)], lambda x, cl: (L.trailing_view(x, x.shape[-1]), True, False)),
    "rms": ([(4, 37), (3, 2, 70)], lambda x, cl: (L.trailing_view(x, x.shape[-1]), True, False)),
}


def _cases():
    for norm, (shapes, _) in VIEWS.items():
        for shape in shapes:
            for cl in [False] if norm in ("layer", "rms") or len(shape) < 3 else [False, True]:
                yield pytest.param(norm, shape, cl, id=f"{norm}-{'x'.join(map(str, shape))}-{'cl' if cl else 'cf'}")


def _make(norm, shape, cl, affine=True, scale=2.0, device="cpu", dtype=torch.float32):
    x = torch.randn(shape, device=device) * scale + 0.5
    shape5, span_r1, span_r2 = VIEWS[norm][1](x, cl)
    xc = x.movedim(1, -1).contiguous() if cl else x.contiguous()
    _, p, r1, b, r2 = shape5
    pshape = (p, r1 if span_r1 else 1, b, r2 if span_r2 else 1)
    w = (torch.rand(pshape, device=device) + 0.5).to(dtype) if affine else None
    bias = torch.randn(pshape, device=device).to(dtype) if affine else None
    return xc.view(shape5).to(dtype), w, bias, pshape


def _close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _check_against_reference(backend, x5, w, b, pshape, rms, tol=1e-5, grad_tol=1e-4):
    """Forward statistics and output, then dx/dweight/dbias, against the reference backend."""
    y, st = backend.forward(x5, w, b, 1e-5, rms)
    y_r, st_r = REF.forward(x5, w, b, 1e-5, rms)
    _close(y, y_r, tol)
    for got, want in zip(st, st_r):
        _close(got, want, 1e-5)
    dy = torch.randn_like(x5)
    affine = w is not None
    mask = (True, affine, affine)
    g = backend.backward(dy, x5, st.mean, st.rstd, w, pshape, rms, True, mask)
    g_r = REF.backward(dy, x5, st_r.mean, st_r.rstd, w, pshape, rms, True, mask)
    _close(g.dx, g_r.dx, grad_tol)
    if affine:
        scale = max(1.0, g_r.dweight.abs().max().item())
        _close(g.dweight / scale, g_r.dweight / scale, grad_tol)
        _close(g.dbias / scale, g_r.dbias / scale, grad_tol)


if not INTERPRETING:

    def test_declines_cpu_tensors_when_not_interpreting():
        x5 = torch.randn(2, 1, 8, 1, 1)
        assert not TritonBackend().supports(x5, None)
        assert kernels.AUTO_ORDER["cuda"] == ("triton",)
        with normkit.backend("triton"):
            y = normkit.functional.layer_norm(torch.randn(3, 8), (8,))
        assert y.shape == (3, 8)

    def test_interpreter_cases_cover_every_tile_kind():
        """The shapes checked under the interpreter reach fused and streamed tiles, flat and not."""
        kinds = set()
        for param in _cases():
            norm, shape, cl = param.values
            x5 = torch.empty(VIEWS[norm][1](torch.empty(shape), cl)[0])
            for backend in (FUSED, SPLIT):
                tile = backend.tile(x5)
                kinds.add((tile.fused, tile.flat))
        assert kinds == {(True, True), (True, False), (False, True), (False, False)}

    @pytest.mark.parametrize(
        "shape,groups",
        [((1, 1, 512, 512, 512), 1), ((1, 8, 128, 1024, 1040), 8), ((2, 128, 4096, 4096), 32), ((64, 1, 8192), 1)],
        ids=["one-channel-2**27", "8-channels", "2**31-elements", "long-rows"],
    )
    def test_launch_grids_fit_cuda_limits(shape, groups):
        """Every launch for huge views (planned on meta tensors, nothing runs) keeps its second and third
        grid dimensions within CUDA's 65,535 and its first within 2**31 - 1."""
        grids = []
        backend = TritonBackend(programs=4 * 132, launcher=lambda kernel, grid, *_: grids.append(grid))
        x = torch.empty(shape, device="meta")
        views = [L.trailing_view(x, shape[-1])] if len(shape) == 3 else [
            L.per_channel_view(x, False), L.per_group_view(x, groups, False), L.per_instance_view(x, True)]
        for shape5 in views:
            x5 = torch.empty(shape5, device="meta")
            q, p, r1, b, r2 = shape5
            pshape = (p, 1, b, 1)
            w, st = torch.empty(pshape, device="meta"), torch.empty(q, p, b, device="meta")
            backend.forward(x5, w, w, 1e-5, False)
            backend.backward(x5, x5, st, st, w, pshape, False, True, (True, True, True))
        assert grids and all(g[0] < 2**31 and all(d <= 65535 for d in g[1:]) for g in grids), grids

    def test_kernels_under_the_interpreter(pytestconfig):
        """This file's interpreter checks and the contract grid for triton, in the child process that
        ``conftest.pytest_collection_finish`` started when this test was selected."""
        run = pytestconfig.interpreter_run
        out, _ = run.communicate(timeout=900)
        assert run.returncode == 0, out[-12000:]

    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    CUDA_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (5e-2, 5e-2), torch.float16: (1e-2, 1e-2)}
    LARGE = [
        ("batch", (32, 64, 28, 28), False), ("batch", (32, 64, 28, 28), True),
        ("group", (8, 256, 16, 16), False), ("group", (8, 256, 16, 16), True),
        ("instance", (8, 64, 32, 32), True), ("layer", (64, 32768), False), ("rms", (512, 4096), False),
    ]

    @cuda
    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("dtype", list(CUDA_TOL), ids=lambda d: str(d).split(".")[-1])
    @pytest.mark.parametrize("norm,shape,cl", list(_cases()))
    def test_cuda_matches_reference(backend, dtype, norm, shape, cl):
        x5, w, b, pshape = _make(norm, shape, cl, device="cuda", dtype=dtype)
        assert backend.supports(x5, w)
        _check_against_reference(backend, x5, w, b, pshape, norm == "rms", *CUDA_TOL[dtype])

    @cuda
    @pytest.mark.parametrize("norm,shape,cl", LARGE)
    def test_cuda_large_shapes_match_reference(norm, shape, cl):
        x5, w, b, pshape = _make(norm, shape, cl, device="cuda")
        _check_against_reference(TritonBackend(), x5, w, b, pshape, norm == "rms", 1e-4, 1e-3)

    @cuda
    @torch.no_grad()
    def test_cuda_graph_replays_layers():
        layer = normkit.nn.GroupNorm(8, 64).cuda()
        x = torch.randn(4, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _close(y, torch.nn.functional.group_norm(x, 8, layer.weight, layer.bias).detach(), 1e-4)

    @cuda
    def test_torch_compile_fullgraph_on_cuda():
        layer = normkit.nn.GroupNorm(8, 64).cuda()
        x = torch.randn(4, 64, 16, 16, device="cuda", requires_grad=True)
        compiled = torch.compile(layer, fullgraph=True)
        compiled(x).square().sum().backward()
        grad, x.grad = x.grad, None
        y_t = torch.nn.functional.group_norm(x, 8, layer.weight, layer.bias)
        y_t.square().sum().backward()
        _close(grad, x.grad, 1e-4)

else:

    def test_supports_cpu_tensors_under_the_interpreter():
        assert FUSED.supports(torch.randn(2, 1, 8, 1, 1), None)
        assert not FUSED.supports(torch.randn(2, 1, 8, 1, 1, dtype=torch.float64), None)
        assert not FUSED.supports(torch.randn(0, 1, 8, 1, 1), None)

    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
    @pytest.mark.parametrize("norm,shape,cl", list(_cases()))
    def test_forward_and_backward_match_reference(backend, affine, norm, shape, cl):
        x5, w, b, pshape = _make(norm, shape, cl, affine)
        _check_against_reference(backend, x5, w, b, pshape, norm == "rms")

    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("norm,shape,cl", [c for c in _cases() if c.values[0] in ("batch", "instance")])
    def test_fixed_statistics_match_reference(backend, norm, shape, cl):
        x5, w, b, pshape = _make(norm, shape, cl)
        stat = (x5.shape[0], x5.shape[1], x5.shape[3])
        mean, rstd = torch.randn(stat), torch.rand(stat) + 0.5
        _close(backend.normalize(x5, mean, rstd, w, b), REF.normalize(x5, mean, rstd, w, b))
        var = torch.rand(stat) + 0.5
        _close(backend.normalize(x5, mean, var, w, b, var_eps=1e-3), REF.normalize(x5, mean, torch.rsqrt(var + 1e-3), w, b))
        dy = torch.randn_like(x5)
        g = backend.backward(dy, x5, mean, rstd, w, pshape, False, False, (True, True, True))
        g_r = REF.backward(dy, x5, mean, rstd, w, pshape, False, False, (True, True, True))
        for got, want in zip(g, g_r):
            _close(got, want, 1e-4)

    @pytest.mark.parametrize("k1,k2", [(6, 70), (6, 1), (1, 70), (1, 1)], ids=["r1+r2", "r1", "r2", "neither"])
    def test_backward_partials_for_every_parameter_span(k1, k2):
        """Two tile columns, 6 row chunks and 2 programs along q (checked below): every dweight/dbias
        slot is written exactly once and summed, whichever reduced axes the parameters span."""
        grids = []

        def recording(kernel, grid, args, constexprs, num_warps):
            grids.append((kernel.__name__, grid))
            launch(kernel, grid, args, constexprs, num_warps)

        backend = TritonBackend(max_tile=64, max_fused=64, programs=48, launcher=recording)
        x5 = torch.randn(6, 1, 6, 2, 70) * 2 + 0.5
        pshape = (1, k1, 2, k2)
        w, b = torch.rand(pshape) + 0.5, torch.randn(pshape)
        _check_against_reference(backend, x5, w, b, pshape, False)
        assert ("_bwd_kernel", (12, 2, 2)) in grids

    def test_backward_op_returns_gradients_apart():
        """This backend finishes dweight and dbias in one buffer; torch.compile's graphs call the backward
        custom op, whose outputs may not alias (torch checks on every call)."""
        x5, w, b, pshape = _make("group", (4, 8, 4, 4), False)
        _, st = REF.forward(x5, w, b, 1e-5, False)
        dy = torch.randn_like(x5)
        args = (dy, x5, list(x5.shape), st.mean, st.rstd, w, b, list(pshape), False, True, [True, True, True], None)
        with normkit.backend("triton"):
            dx, dw, db = _core._norm_backward(*args)
        assert dw.untyped_storage().data_ptr() != db.untyped_storage().data_ptr()
        g_r = REF.backward(dy, x5, st.mean, st.rstd, w, pshape, False, True, (True, True, True))
        for got, want in zip((dx, dw, db), g_r):
            _close(got, want, 1e-4)

    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True)])
    def test_partial_output_mask(backend, mask):
        x5, w, b, pshape = _make("group", (2, 6, 5, 3), True)
        _, st = REF.forward(x5, w, b, 1e-5, False)
        dy = torch.randn_like(x5)
        g = backend.backward(dy, x5, st.mean, st.rstd, w, pshape, False, True, mask)
        g_r = REF.backward(dy, x5, st.mean, st.rstd, w, pshape, False, True, mask)
        for got, want in zip(g, g_r):
            assert (got is None) == (want is None)
            if want is not None:
                _close(got, want, 1e-4)

    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("value", [1.0e7 + 1.0, -3.25, 1.0e30])
    def test_constant_groups_normalize_to_exactly_zero(backend, value):
        x5, w, b, _ = _make("batch", (2, 3, 9, 9), True)
        x5 = torch.full_like(x5, value)
        y, st = backend.forward(x5, w, b, 1e-5, False)
        assert torch.equal(y, b.unsqueeze(0).expand_as(y))
        assert torch.equal(st.mean, torch.full_like(st.mean, value))
        assert torch.equal(st.var, torch.zeros_like(st.var))

    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("norm", ["batch", "group", "rms"])
    def test_huge_scales_do_not_overflow(backend, norm):
        shape = (3, 2, 70) if norm == "rms" else (2, 6, 5, 3)
        x5, _, _, _ = _make(norm, shape, norm != "rms", affine=False, scale=1.0e30)
        y, st = backend.forward(x5, None, None, 1e-5, norm == "rms")
        y_r, st_r = REF.forward(x5, None, None, 1e-5, norm == "rms")
        assert torch.isfinite(y).all() and torch.isfinite(st.rstd).all()
        _close(y, y_r)
        _close(st.rstd / st_r.rstd, torch.ones_like(st.rstd))

    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
    @pytest.mark.parametrize("norm", ["batch", "group", "layer", "rms"])
    def test_non_finite_values_poison_exactly_their_group(backend, value, norm):
        """A group holding NaN or Inf normalizes to NaN, as the reference and torch.nn; the others not."""
        shape = (3, 2, 70) if norm in ("layer", "rms") else (2, 6, 5, 3)
        x5, w, b, _ = _make(norm, shape, False)
        x5[0, 0, 0, 0, 0] = value
        y, st = backend.forward(x5, w, b, 1e-5, norm == "rms")
        y_r, st_r = REF.forward(x5, w, b, 1e-5, norm == "rms")
        assert torch.equal(y.isnan(), y_r.isnan()) and bool(y_r.isnan().any())
        finite = ~y_r.isnan()
        _close(y[finite], y_r[finite])
        assert torch.equal(st.rstd.isnan(), st_r.rstd.isnan())

    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("norm", ["batch", "rms"])
    def test_subnormal_spreads_keep_a_finite_variance(backend, norm):
        """Deviations below 3e-39 (1 / spread overflows float32): the variance stays finite and equals
        the reference's."""
        shape = (3, 2, 70) if norm == "rms" else (4, 2, 3, 3)
        x5, _, _, _ = _make(norm, shape, False, affine=False, scale=1.0e-39)
        x5 = x5 - 0.5 if norm == "batch" else x5
        y, st = backend.forward(x5, None, None, 1e-5, norm == "rms")
        y_r, st_r = REF.forward(x5, None, None, 1e-5, norm == "rms")
        assert torch.isfinite(st.var).all() and torch.isfinite(st.rstd).all()
        _close(st.rstd, st_r.rstd)
        _close(y, y_r)

    def test_group_sizes_past_int32_keep_their_count():
        """The finalize kernel of a streamed group of 2**31 elements (128 rows of 2**24): its count
        taken in int32 would wrap to -2**31."""
        from normkit.kernels import _triton_kernels as kern

        n = 2**31
        x = torch.tensor([3.0])  # the group's shift, its first element
        part = torch.tensor([[0.5 * n], [1.25 * n]], dtype=torch.float64)  # sums of d and d*d, d = x - 3
        mean, rstd, var = (torch.empty(1) for _ in range(3))
        kern._stats_finalize_kernel[(1,)](x, part, mean, rstd, var, 1e-5, 128, 1, 2**24, 1, 1, BS=1, BG=1, RMS=False)
        _close(mean, torch.tensor([3.5]))
        _close(var, torch.tensor([1.0]))

    @pytest.mark.parametrize("backend", [FUSED, SPLIT], ids=["fused", "split"])
    @pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
    @pytest.mark.parametrize("norm,shape,cl", [("group", (2, 6, 5, 3), True), ("batch", (2, 3, 9, 9), False)])
    def test_fused_activation_matches_reference_then_activation(backend, activation, norm, shape, cl):
        x5, w, b, pshape = _make(norm, shape, cl)
        act = {"relu": torch.relu, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[activation]
        xs, ws, bs = (t.clone().requires_grad_() for t in (x5, w, b))
        y_r = act(REF.forward(xs, ws, bs, 1e-5, False)[0])
        y, st = backend.forward(x5, w, b, 1e-5, False, activation=activation)
        _close(y, y_r.detach())
        dy = torch.randn_like(x5)
        want = torch.autograd.grad(y_r, (xs, ws, bs), dy)
        g = backend.backward(dy, x5, st.mean, st.rstd, w, pshape, False, True, (True, True, True), bias=b, activation=activation)
        for got, exp in zip(g, want):
            _close(got, exp, 1e-4)
        _close(backend.normalize(x5, st.mean, st.rstd, w, b, activation=activation), y_r.detach())

    def test_unknown_activation_is_a_clear_error():
        x5, w, b, _ = _make("layer", (4, 37), False)
        with pytest.raises(ValueError, match="unknown activation 'tanh'"):
            FUSED.forward(x5, w, b, 1e-5, False, activation="tanh")

    @pytest.mark.parametrize("cl", [False, True], ids=["cf", "cl"])
    def test_layers_through_the_core_match_torch(cl):
        x = torch.randn(2, 6, 5, 3)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        silu, gelu = torch.nn.functional.silu, torch.nn.functional.gelu
        for ours, theirs, act in [
            (normkit.nn.GroupNorm(3, 6), torch.nn.GroupNorm(3, 6), None),
            (normkit.nn.BatchNorm2d(6), torch.nn.BatchNorm2d(6), None),
            (normkit.nn.InstanceNorm2d(6, affine=True), torch.nn.InstanceNorm2d(6, affine=True), None),
            (normkit.nn.GroupNormAct(3, 6, act_layer="silu"), torch.nn.GroupNorm(3, 6), silu),
            (normkit.nn.BatchNormAct2d(6, act_layer="gelu"), torch.nn.BatchNorm2d(6), gelu),
        ]:
            ours.load_state_dict(theirs.state_dict())
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            with normkit.backend("triton"):
                y = ours(xa)
                y.square().sum().backward()
            y_t = theirs(xb) if act is None else act(theirs(xb))
            y_t.square().sum().backward()
            _close(y, y_t.detach(), 1e-4)
            _close(xa.grad, xb.grad, 1e-4)
            _close(ours.weight.grad, theirs.weight.grad, 1e-4)
            assert y.is_contiguous(memory_format=torch.channels_last) == cl
