"""Every Triton kernel compiles ahead of time to a Hopper (sm_90) cubin, without a GPU.

The backend runs on meta tensors with a launcher that records each launch instead of running it, so
what is compiled is exactly what the dispatcher chooses (kernel, argument dtypes, block sizes,
flags, warps) for real layer shapes. The sweep over every tile the planner can produce is slow.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import pytest
import torch

triton = pytest.importorskip("triton")

from normkit.functional import _layout as L  # noqa: E402
from normkit.kernels import _triton_kernels as kern  # noqa: E402
from normkit.kernels import _triton_plan as plan  # noqa: E402
from normkit.kernels.triton import TritonBackend  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # older layout
    from triton.compiler import GPUTarget

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are built for the interpreter"),
    pytest.mark.skipif(
        "constexprs" not in inspect.signature(triton.compiler.ASTSource).parameters,
        reason="this Triton's ASTSource takes no constexprs (ahead-of-time API differs)",
    ),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
]

HOPPER = GPUTarget("cuda", 90, 32)
H100_PROGRAMS = 4 * 132
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Recorder:
    """A launcher that records (kernel, signature, constexprs, warps) instead of launching."""

    def __init__(self) -> None:
        self.launches: dict[tuple, tuple] = {}

    def __call__(self, kernel, grid, args, constexprs, num_warps) -> None:
        signature = {name: _arg_type(a) for name, a in zip(kernel.arg_names, args)}
        signature.update({name: "constexpr" for name in constexprs})
        key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), num_warps)
        self.launches[key] = (kernel, signature, dict(constexprs), num_warps)


def _arg_type(a) -> str:
    if isinstance(a, torch.Tensor):
        return "*" + TYPES[a.dtype]
    if isinstance(a, float):
        return "fp32"
    return "i32" if -(2**31) <= a < 2**31 else "i64"


def _meta(shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


def _record(backend, shape5, pshape, dtype, *, rms=False, fixed=False, activation=None):
    """Run forward (or normalize) and backward of one view on meta tensors through the recorder."""
    x5 = _meta(shape5, dtype)
    w = b = None if pshape is None else _meta(pshape, dtype)
    if fixed:
        stat = (shape5[0], shape5[1], shape5[3])
        mean, rstd = _meta(stat, torch.float32), _meta(stat, torch.float32)
        backend.normalize(x5, mean, rstd, w, b, activation=activation)
    else:
        _, st = backend.forward(x5, w, b, 1e-5, rms, activation=activation)
        mean, rstd = st.mean, st.rstd
    pshape = pshape or (shape5[1], 1, shape5[3], 1)
    mask = (True, w is not None, b is not None)
    backend.backward(x5, x5, mean, rstd, w, pshape, rms, not fixed, mask, bias=b, activation=activation)


def _layer_cases():
    """(id, shape5, param shape, options) for common layers in both memory formats."""
    x4 = torch.empty(32, 64, 56, 56, device="meta")
    g4 = torch.empty(8, 256, 32, 32, device="meta")
    cases = []
    for cl in (False, True):
        tag = "cl" if cl else "cf"
        bn = L.per_channel_view(x4, cl)
        inst = L.per_instance_view(x4, cl)
        gn = L.per_group_view(g4, 32, cl)
        cases += [
            (f"batchnorm-{tag}", bn, (1, 1, 64, 1), {}),
            (f"batchnorm-eval-{tag}", bn, (1, 1, 64, 1), {"fixed": True}),
            (f"instancenorm-{tag}", inst, (inst[1], 1, inst[3], 1), {}),
            (f"groupnorm-silu-{tag}", gn, (1, 1, 32, 8) if cl else (32, 8, 1, 1), {"activation": "silu"}),
        ]
    cases += [
        ("layernorm-768", L.trailing_view(torch.empty(8, 512, 768, device="meta"), 768), (1, 768, 1, 1), {}),
        ("rmsnorm-4096", L.trailing_view(torch.empty(4, 1024, 4096, device="meta"), 4096), (1, 4096, 1, 1), {"rms": True}),
        ("layernorm-32768", L.trailing_view(torch.empty(64, 32768, device="meta"), 32768), (1, 32768, 1, 1), {}),
        ("groupnorm-plain-small", L.per_group_view(torch.empty(2, 6, 5, 7, device="meta"), 3, False), None, {}),
    ]
    return cases


@lru_cache(maxsize=None)
def _compile(kernel, signature: tuple, constexprs: tuple, num_warps: int):
    src = triton.compiler.ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs))
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps})


def _cubin_size(kernel_name: str, signature: tuple, constexprs: tuple, num_warps: int) -> int:
    return len(_compile(getattr(kern, kernel_name), signature, constexprs, num_warps).asm["cubin"])


def _assert_cubins(recorder: Recorder, workers: int = 1) -> None:
    """Compile every recorded launch (in ``workers`` processes) and require a non-empty cubin each."""
    assert recorder.launches
    jobs = [
        (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), num_warps)
        for kernel, signature, constexprs, num_warps in recorder.launches.values()
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            sizes = list(pool.map(_cubin_size, *zip(*jobs)))
    else:
        sizes = [_cubin_size(*job) for job in jobs]
    empty = [job for job, size in zip(jobs, sizes) if not size]
    assert not empty, f"no cubin for {empty}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: TYPES[d])
@pytest.mark.parametrize("case", _layer_cases(), ids=lambda c: c[0])
def test_layer_kernels_compile_for_hopper(case, dtype):
    _, shape5, pshape, options = case
    recorder = Recorder()
    _record(TritonBackend(programs=H100_PROGRAMS, launcher=recorder), shape5, pshape, dtype, **options)
    _assert_cubins(recorder)


def _shape_for(tile: plan.Tile) -> tuple[int, int, int]:
    """An (r1, b, r2) for which the planner picks ``tile`` (a run one short of ``br2`` unless flat)."""
    r2 = tile.br2 if tile.flat or tile.bb == 1 else tile.br2 - 1
    return (tile.br1 if tile.fused else 2 * plan.MAX_FUSED), tile.bb, r2


def test_every_kernel_appears_in_the_layer_cases():
    recorder = Recorder()
    backend = TritonBackend(programs=H100_PROGRAMS, launcher=recorder)
    for _, shape5, pshape, options in _layer_cases():
        _record(backend, shape5, pshape, torch.bfloat16, **options)
    kernels = {key[0] for key in recorder.launches}
    assert kernels == {
        "_fwd_kernel", "_stats_partial_kernel", "_stats_finalize_kernel", "_bwd_sums_kernel", "_bwd_kernel"
    }


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: TYPES[d])
def test_every_tile_compiles_for_hopper(dtype):
    """All kernels at every tile, per-channel parameters and, separately, parameters along r1 with
    RMS statistics and a GELU epilogue. About 1500 compiles a dtype, spread over the CPU cores."""
    recorder = Recorder()
    backend = TritonBackend(programs=H100_PROGRAMS, launcher=recorder)
    for tile in plan.tile_configs():
        r1, b, r2 = _shape_for(tile)
        assert plan.choose_tile(r1, b, r2) == tile
        _record(backend, (2, 1, r1, b, r2), (1, 1, b, 1), dtype)
        _record(backend, (2, 1, r1, b, r2), (1, r1, b, 1), dtype, rms=True, activation="gelu")
    _assert_cubins(recorder, workers=os.cpu_count() or 1)
