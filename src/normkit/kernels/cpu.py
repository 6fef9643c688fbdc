"""The ``cpu`` backend: numba kernels on the 5-D view, parallel over groups, channels or row chunks.

* float32, float64 and bfloat16 run natively (bfloat16 as its bits, widened and rounded inside the
  kernels, statistics in float32 as everywhere). float16 is widened to float32 with torch before
  the kernels and rounded back once, as the reference does; this costs two extra passes.
* Threads follow ``torch.get_num_threads()``. With one thread (DataLoader workers), for small
  tensors, and in a process forked after kernels ran in parallel, the serial compilation runs, so the
  OpenMP layer is never entered where it would oversubscribe or is not fork-safe.
* The activation epilogue (``activation=``) is fused: the forward applies it to the affine output, the
  backward recomputes that output from ``x`` and takes the activation's derivative in the same loops.
* Importing this module compiles nothing: each driver compiles on its first call per dtype and the
  machine code is cached on disk (numba ``cache=True``) for later processes; ``precompile`` compiles
  ahead of time (``normkit precompile``).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from . import _pages as pages
from ._numba_kernels import DRIVERS, running_update
from .contract import (
    ACTIVATIONS, Grads, Stats, channels_last, check_activation, check_view, grad_shape, laid_like, params_shape,
    update_running, view_param,
)

NATIVE = (torch.float32, torch.float64, torch.bfloat16)
WIDENED = (torch.float16,)
SUPPORTED = NATIVE + WIDENED
# A unit of work whose data stays cached between its statistics and its output (a core's L2 and
# its share of the last level) is read from memory once. Measured from memory on a 2-core EPYC
# (512 KB L2): fused units of up to 1.5 MB were 5-12% faster than the same work in row chunks and
# two passes (GroupNorm channels-last 8x256x32x32, BatchNorm 8x32x192x192).
CACHE_BYTES = 3 << 19
# A unit that cannot be cut smaller without cutting what its statistics need whole (a channels-last
# slab, one sample's rows of every group: partial rows are slow; a single group larger than
# CACHE_BYTES) is still fused up to this size, re-read from the last-level cache rather than twice
# from memory: GroupNorm/InstanceNorm channels-last 16x128x64x64 (2 MB slabs) forward 4.7-5.2 -> 4.2 ms.
WHOLE_BYTES = 4 << 20
# Small slabs are batched into units of about this size: per-unit overhead is tens of nanoseconds.
UNIT_BYTES = 1 << 16
# Below this many elements a parallel launch costs more than it saves (numba's parallel region runs on
# torch's OpenMP pool; from a cold cache the launch alone costs 8-12 µs against 2-4 serially). Timed from
# a flushed cache, each call right after one of its own kind on other data (the pool awake, as after a
# torch op): serial faster at LayerNorm 1x64x768 (forward 35 against 36 µs, backward 53 against 60),
# parallel from about 2**16 elements (LayerNorm 1x96x768 forward 42 against 49, backward 69 against 83;
# 1x256x768 backward 128 against 172; GroupNorm 2x128x16x16 backward 58 against 68; BatchNorm
# 4x64x16x16 even).
SERIAL_BELOW = 1 << 16
# Column loops serve groups of fewer adjacent elements than this; longer runs use segment loops.
COL_MAX_RUN = 32

_parallel_pid: int | None = None
# The thread count last given to numba from each thread: setting it costs microseconds a call.
_numba_threads = threading.local()


class Plan(NamedTuple):
    """How the work is cut: units of ``gchunk`` slabs, ``rchunk`` rows (``nrc`` chunks) and ``bchunk``
    groups (``nbc`` chunks)."""

    gchunk: int
    nrc: int
    rchunk: int
    nbc: int
    bchunk: int


class View(NamedTuple):
    """The 5-D view reduced to ``(G, R1, B, R2)`` with parameters ``(P, K1, B, K2)``."""

    g: int
    r1: int
    b: int
    r2: int
    p: int
    k1: int
    k2: int

    @property
    def col(self) -> bool:
        """Per-column loops: several short groups side by side in each row (channels_last), when there
        are rows enough to pay for expanding the per-group values to columns."""
        return self.b > 1 and self.r2 < COL_MAX_RUN and self.k1 == 1 and self.r1 >= col_rows(self.r2)



def col_rows(r2: int) -> int:
    """The fewest rows a unit of the column loops should own: below that the per-unit expansion of
    per-group values to columns costs more than the segment loops' short inner loops (measured
    serially for groups of 1-16 columns and 2-32 rows: the crossover lies near 2 * r2 rows)."""
    return max(4, 2 * r2)


def threads_for(numel: int) -> int:
    """Threads to use: torch's setting, or 1 for small work and in a forked child."""
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if n <= 1 or numel < SERIAL_BELOW:
        return 1
    if _parallel_pid is not None and _parallel_pid != os.getpid():
        return 1
    return n


def plan(v: View, itemsize: int, threads: int) -> Plan:
    """Cut the view into units for a pass with reductions: whole groups when they fit in cache and
    give every thread work (statistics and output in one read), otherwise row chunks as well."""
    group_bytes = max(1, v.r1 * v.r2 * itemsize)
    want = 4 * threads if threads > 1 else 1
    if v.col:  # units of partial rows run several times slower than whole rows: split rows only
        bchunk = v.b
    else:
        bchunk = min(v.b, max(1, CACHE_BYTES // group_bytes))
        bchunk = min(bchunk, max(1, math.ceil(v.b / math.ceil(want / v.g))))
    nbc = math.ceil(v.b / bchunk)
    bchunk = math.ceil(v.b / nbc)
    units = v.g * nbc
    enough = units >= min(want, 2 * threads)
    if v.r1 == 1 or (enough and group_bytes * bchunk <= (WHOLE_BYTES if v.col or bchunk == 1 else CACHE_BYTES)):
        gchunk = max(1, min(units // want, UNIT_BYTES // (group_bytes * bchunk)))
        return Plan(gchunk, 1, v.r1, nbc, bchunk)
    nrc = min(v.r1, max(math.ceil(want / units), math.ceil(group_bytes * bchunk / CACHE_BYTES)))
    if v.col:
        nrc = min(nrc, max(1, v.r1 // col_rows(v.r2)))
    rchunk = math.ceil(v.r1 / nrc)
    return Plan(1, math.ceil(v.r1 / rchunk), rchunk, nbc, bchunk)


def apply_plan(v: View, threads: int) -> Plan:
    """Units for the output alone (no reductions): runs of consecutive memory, slabs first, then rows,
    then groups, so each thread streams one contiguous block. Cutting by groups as the reductions do
    makes every unit a strided run of short pieces: BatchNorm NCHW eval on 32x512x7x7 took 186 µs with
    the caches flushed, 73 µs in row units."""
    want = 4 * threads if threads > 1 else 1
    if v.g >= want or (v.r1 == 1 and v.b == 1):
        return Plan(math.ceil(v.g / want), 1, v.r1, 1, v.b)
    nrc = min(v.r1, math.ceil(want / v.g))
    if v.col:
        nrc = min(nrc, max(1, v.r1 // col_rows(v.r2)))
    rchunk = math.ceil(v.r1 / nrc)
    nrc = math.ceil(v.r1 / rchunk)
    nbc = 1 if v.col or rchunk > 1 else min(v.b, math.ceil(want / (v.g * nrc)))
    bchunk = math.ceil(v.b / nbc)
    return Plan(1, nrc, rchunk, math.ceil(v.b / bchunk), bchunk)


def canonical(shape5: tuple[int, ...], pshape: tuple[int, ...], itemsize: int, threads: int) -> View:
    """Merge a single contiguous group into one run, and re-split a long run into rows so that a
    few long groups (a huge LayerNorm row) still spread over threads."""
    q, p, r1, b, r2 = shape5
    _, k1, _, k2 = pshape
    v = View(q * p, r1, b, r2, p, k1, k2)
    if b != 1:
        return v
    if k1 == 1 and k2 == 1:
        v = View(v.g, 1, 1, r1 * r2, p, 1, 1)
    elif (k1 == r1 or r1 == 1) and (k2 == r2 or r2 == 1):
        v = View(v.g, 1, 1, r1 * r2, p, 1, r1 * r2)
    if v.r1 == 1 and v.g < 2 * threads and v.r2 * itemsize > CACHE_BYTES:
        run = _divisor_near(v.r2, CACHE_BYTES // (8 * itemsize))
        if run < v.r2:
            rows = v.r2 // run
            v = View(v.g, rows, 1, run, p, rows, run) if v.k2 > 1 else View(v.g, rows, 1, run, p, 1, 1)
    return v


def _divisor_near(n: int, target: int) -> int:
    """The largest divisor of ``n`` not above ``target`` that is at least 64, else ``n``."""
    for d in range(min(n, target), 63, -1):
        if n % d == 0:
            return d
    return n


# Type tags the drivers compile for: a scalar of the data's type (bfloat16 as its uint16 bits) and of
# the statistics' type.
_TAG = {torch.float32: np.float32(0), torch.float64: np.float64(0), torch.bfloat16: np.uint16(0)}


class Launch(NamedTuple):
    """What a call passes the drivers besides its data, worked out once per shape, dtype and thread
    count (each Python operation of a call costs microseconds; more after a kernel has evicted the
    interpreter's data from cache)."""

    view: View
    shape5: tuple[int, ...]
    numel: int  # of the data: the kernels index raw memory by the view, so a call checks it
    dims: tuple[int, ...]
    plan: tuple[int, ...]
    lanes: int
    loops: str  # the drivers' suffix: "col" or "seg"
    val: np.generic  # type tags of the data and of the statistics
    acc: np.generic


@lru_cache(maxsize=256)
def _setup(
    shape5: tuple[int, ...], pshape: tuple[int, ...], dtype: torch.dtype, threads: int, apply: bool,
    tuning: tuple[int, ...],
) -> Launch:
    """``tuning`` (the module constants) is part of the key, so that changing them takes effect. The
    kernels index raw memory by these dims: parameters that do not fit the view are refused here."""
    _, p, r1, b, r2 = shape5
    if len(pshape) != 4 or pshape[0] != p or pshape[2] != b or pshape[1] not in (1, r1) or pshape[3] not in (1, r2):
        raise ValueError(f"parameters of shape {pshape} do not fit the view {shape5}: expected (P, K1, B, K2), "
                         "K1 in (1, R1), K2 in (1, R2)")
    kernel_dtype = torch.float32 if dtype in WIDENED else dtype
    itemsize = kernel_dtype.itemsize
    v = canonical(shape5, pshape, itemsize, threads)
    pl = apply_plan(v, threads) if apply else plan(v, itemsize, threads)
    return Launch(
        v, shape5, math.prod(shape5), tuple(v), tuple(pl), _lanes(v, pl, threads), "col" if v.col else "seg",
        _TAG[kernel_dtype], _TAG[_acc(kernel_dtype)],
    )


def launch(
    shape5: tuple[int, ...], dtype: torch.dtype, pshape: tuple[int, ...], threads: int, apply: bool = False
) -> Launch:
    """How the drivers run on the view ``shape5`` of ``dtype`` data with parameters of ``pshape``;
    ``apply``: the output alone, from given statistics."""
    tuning = (CACHE_BYTES, WHOLE_BYTES, UNIT_BYTES, COL_MAX_RUN)
    return _setup(shape5, pshape, dtype, threads, apply, tuning)


class Call(NamedTuple):
    """Everything a backend method needs besides its tensors: the launch, the compiled driver, its
    thread count and the statistics' dtype."""

    launch: Launch
    driver: Callable
    threads: int
    stats: torch.dtype
    widened: bool  # float16 data, read by the kernels as a float32 copy
    huge: bool  # large outputs: reused memory in huge pages (``_pages``)
    param_numel: int


@lru_cache(maxsize=512)
def _call(
    op: str, shape5: tuple[int, ...], pshape: tuple[int, ...], dtype: torch.dtype, activation: str | None,
    threads: int | None, torch_threads: int,
) -> Call:
    """A call's set-up, worked out once per view, dtype, activation and thread setting: one cache
    lookup a call instead of a dozen small steps, each of which costs microseconds from a cold cache.
    The module constants (``SERIAL_BELOW``, ``CACHE_BYTES``, ..., ``_pages.MIN_BYTES``) are read here,
    not made part of the key (inside a model the lookup took 12 µs a call with them, 9 without): after
    changing one, ``_call.cache_clear()``. A forked child starts with an empty cache."""
    check_activation(activation)
    if threads is None:
        threads = threads_for(math.prod(shape5))
    ln = launch(shape5, dtype, pshape, threads, apply=op == "apply")
    par, ser = DRIVERS[f"{op}_{ln.loops}"][activation]
    widened = dtype in WIDENED
    huge = ln.numel * (4 if widened else dtype.itemsize) >= pages.MIN_BYTES
    return Call(ln, ser if threads == 1 else par, threads, _acc(dtype), widened, huge, math.prod(pshape))


def _prepare(
    op: str, x: Tensor, shape: Sequence[int] | None, pshape: tuple[int, ...], activation: str | None,
    threads: int | None,
) -> Call:
    """The call's set-up for ``x`` (viewed as ``shape``), after checking that the view covers ``x``:
    the kernels index raw memory by it. Enters numba's thread pool when the call runs in parallel."""
    check_view(x, shape)
    c = _call(op, tuple(x.shape if shape is None else shape), pshape, x.dtype, activation, threads,
              torch.get_num_threads())
    if x.numel() != c.launch.numel:
        raise ValueError(f"a view of {c.launch.numel} elements for a tensor of {x.numel()}")
    if c.threads > 1:
        _enter_parallel(c.threads)
    return c


def _enter_parallel(threads: int) -> None:
    """Remember that the OpenMP layer ran in this process, and give numba the thread count (numba keeps
    it per calling thread; setting it costs microseconds, so only when it changes)."""
    global _parallel_pid
    if _parallel_pid is None:
        _parallel_pid = os.getpid()
    if getattr(_numba_threads, "n", 0) != threads:
        numba.set_num_threads(threads)
        _numba_threads.n = threads


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere processes do not fork
    os.register_at_fork(after_in_child=_call.cache_clear)


@lru_cache(maxsize=64)
def _constant(numel: int, dtype: torch.dtype, value: float) -> Tensor:
    """Ones / zeros standing in for an absent weight / bias (never written); filled by numpy, as a
    torch fill inside a backward would read as a gradient being zeroed."""
    return torch.from_numpy(np.full(numel, value, dtype=_TAG[dtype].dtype))


def _param(t: Tensor | None, pshape: tuple[int, ...], numel: int, acc: torch.dtype, absent: float) -> Tensor:
    """A parameter as the kernels read it: dense ``pshape`` (``numel``) elements in the accumulation
    dtype (a module's own parameter as it is). The caller keeps the returned tensor alive while a
    kernel reads its data pointer."""
    if t is None:
        return _constant(numel, acc, absent)
    if t.dtype != acc or t.numel() != numel or not t.is_contiguous():
        return view_param(t.detach().to(acc), pshape).contiguous()
    return t


def _stat(t: Tensor, acc: torch.dtype, ln: Launch) -> Tensor:
    """Statistics as the kernels read them: one per group, dense, in the accumulation dtype."""
    if t.numel() != ln.dims[0] * ln.dims[2]:
        raise ValueError(f"{t.numel()} statistics for {ln.dims[0] * ln.dims[2]} groups")
    return t if t.dtype == acc and t.is_contiguous() else t.detach().to(acc).contiguous()


def _output(c: Call, xs: Tensor) -> Tensor:
    """An empty tensor like ``xs`` (its layout); a large one on reused memory (``_pages``)."""
    return pages.empty_like(xs) if c.huge else torch.empty_like(xs)


_ran: set[Call] = set()


def _observe(c: Call, out: Tensor) -> None:
    """Tell ``_pages`` that the large output ``out`` is written, except after the first call of its set-up:
    a first call may load the driver from the disk cache, or compile it."""
    if c in _ran:
        pages.observe(out)
    else:
        _ran.add(c)


def _widen(t: Tensor) -> Tensor:
    """The float32 copy the kernels read for float16 data (its layout; a large one on reused memory)."""
    return pages.empty_like(t, torch.float32).copy_(t.detach())


def _narrow(y: Tensor, dtype: torch.dtype) -> Tensor:
    """A float32 result rounded back to the (float16) input dtype."""
    return pages.empty_like(y, dtype).copy_(y)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CpuBackend:
    """``threads``: run every call on this many threads (1: the serial drivers) instead of choosing by
    size and ``torch.get_num_threads()``."""

    name = "cpu"
    activations: tuple[str, ...] = ACTIVATIONS

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def supports(self, x: Tensor, weight: Tensor | None) -> bool:
        return (
            x.is_cpu
            and x.dtype in SUPPORTED
            and x.numel() > 0
            and (x.is_contiguous() or channels_last(x))
            and (weight is None or weight.is_cpu)
        )

    def forward(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool,
        activation: str | None = None, *, shape: Sequence[int] | None = None,
        param_shape: Sequence[int] | None = None,
    ) -> tuple[Tensor, Stats]:
        pshape = params_shape(x.shape if shape is None else shape, weight, bias, param_shape)
        c = _prepare("forward", x, shape, pshape, activation, self.threads)
        ln, acc = c.launch, c.stats
        xs = _widen(x) if c.widened else x
        y = _output(c, xs)
        q, p, _, nb, _ = ln.shape5
        # three allocations: the statistics are outputs of a custom op, which may not alias each other.
        # Sizes as separate arguments: a shape tuple costs a microsecond more per allocation.
        st = Stats(torch.empty(q, p, nb, dtype=acc), torch.empty(q, p, nb, dtype=acc), torch.empty(q, p, nb, dtype=acc))
        w, b = _param(weight, pshape, c.param_numel, acc, 1.0), _param(bias, pshape, c.param_numel, acc, 0.0)
        c.driver(
            xs.data_ptr(), y.data_ptr(), w.data_ptr(), b.data_ptr(), st.mean.data_ptr(), st.rstd.data_ptr(),
            st.var.data_ptr(), ln.dims, ln.val, ln.acc, float(eps), rms, ln.lanes, ln.plan,
        )
        if c.huge:
            _observe(c, y)
        return (_narrow(y, x.dtype) if c.widened else y), st

    def normalize(
        self, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
        activation: str | None = None, var_eps: float | None = None, *, shape: Sequence[int] | None = None,
        param_shape: Sequence[int] | None = None,
    ) -> Tensor:
        pshape = params_shape(x.shape if shape is None else shape, weight, bias, param_shape)
        c = _prepare("apply", x, shape, pshape, activation, self.threads)
        ln, acc = c.launch, c.stats
        xs = _widen(x) if c.widened else x
        y = _output(c, xs)
        w, b = _param(weight, pshape, c.param_numel, acc, 1.0), _param(bias, pshape, c.param_numel, acc, 0.0)
        mean, rstd = _stat(mean, acc, ln), _stat(rstd, acc, ln)
        c.driver(
            xs.data_ptr(), y.data_ptr(), w.data_ptr(), b.data_ptr(), mean.data_ptr(), rstd.data_ptr(), ln.dims,
            ln.val, ln.acc, 0.0 if var_eps is None else float(var_eps), var_eps is not None, ln.plan,
        )
        if c.huge:
            _observe(c, y)
        return _narrow(y, x.dtype) if c.widened else y

    def update_running(
        self, running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
        momentum: float, var_scale: float,
    ) -> None:
        """One serial kernel for both buffers where they can be written as arrays (bfloat16 as their
        bits, both of one dtype); torch ops otherwise (float16, a buffer that requires grad). The write
        bumps the buffers' version counters, as an in-place torch op would: a graph that saved a buffer
        then refuses to use it."""
        if not _blendable(running_mean, running_var, mean, var):
            update_running(running_mean, running_var, mean, var, momentum, var_scale)
            return
        some = running_var if running_mean is None else running_mean
        if some is None:
            return
        n = some.numel()
        running_update(
            0 if running_mean is None else running_mean.data_ptr(), 0 if running_var is None else running_var.data_ptr(),
            mean.data_ptr(), var.data_ptr(), n, mean.numel() // n, _TAG[some.dtype], _TAG[mean.dtype],
            1.0 - momentum, momentum, momentum * var_scale,
        )
        torch.autograd.graph.increment_version([t for t in (running_mean, running_var) if t is not None])

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        rstd: Tensor,
        weight: Tensor | None,
        param_shape: tuple[int, int, int, int],
        rms: bool,
        batch_stats: bool,
        output_mask: tuple[bool, bool, bool],
        bias: Tensor | None = None,
        activation: str | None = None,
        *,
        shape: Sequence[int] | None = None,
    ) -> Grads:
        """The contract's backward; ``bias`` is needed only with an ``activation``."""
        if dy.numel() != x.numel():
            raise ValueError(f"dy of shape {tuple(dy.shape)} for x of shape {tuple(x.shape)}")
        pshape = tuple(param_shape)
        c = _prepare("backward", x, shape, pshape, activation, self.threads)
        ln, acc = c.launch, c.stats
        dy = laid_like(dy, x)
        xs, dys = (_widen(x), _widen(dy)) if c.widened else (x, dy)
        want_dx = output_mask[0]
        dx = _output(c, xs) if want_dx else None
        gshape = grad_shape(weight, pshape, c.param_numel)  # the kernel writes param_numel elements to each
        dweight, dbias = torch.empty(gshape, dtype=acc), torch.empty(gshape, dtype=acc)
        w, b = _param(weight, pshape, c.param_numel, acc, 1.0), _param(bias, pshape, c.param_numel, acc, 0.0)
        mean, rstd = _stat(mean, acc, ln), _stat(rstd, acc, ln)
        c.driver(
            dys.data_ptr(), xs.data_ptr(), dx.data_ptr() if want_dx else 0, mean.data_ptr(), rstd.data_ptr(),
            w.data_ptr(), b.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), ln.dims, ln.val, ln.acc,
            rms, batch_stats, want_dx, ln.lanes, ln.plan,
        )
        if c.huge and want_dx:
            _observe(c, dx)
        return Grads(
            (_narrow(dx, x.dtype) if c.widened else dx) if want_dx else None,
            dweight if output_mask[1] else None,
            dbias if output_mask[2] else None,
        )


def _blendable(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor) -> bool:
    """Buffers the update kernel writes: of one dtype, the statistics' or bfloat16 (a bf16 model's
    buffers), dense CPU tensors that do not require grad, from dense CPU statistics of the kernels' own
    dtypes."""
    if mean.dtype not in (torch.float32, torch.float64) or var.dtype != mean.dtype:
        return False
    if not (mean.is_cpu and var.is_cpu and mean.is_contiguous() and var.is_contiguous()):
        return False
    dtype = None
    for running in (running_mean, running_var):
        if running is None:
            continue
        if dtype not in (None, running.dtype) or running.dtype not in (mean.dtype, torch.bfloat16):
            return False
        if not running.is_cpu or not running.is_contiguous() or running.requires_grad:
            return False
        dtype = running.dtype
    return dtype is None or not (dtype == torch.bfloat16 and mean.dtype != torch.float32)


def _lanes(v: View, pl: Plan, threads: int) -> int:
    """Lanes of a pass: one per thread, at most one per unit."""
    gchunk, nrc, _, nbc, _ = pl
    return min(threads, math.ceil(v.g / gchunk) * nrc * nbc)


def precompile(
    dtypes: tuple[torch.dtype, ...] = NATIVE,
    activations: tuple[str | None, ...] = (None, *ACTIVATIONS),
    parallel: tuple[bool, ...] = (False, True),
) -> Iterator[str]:
    """Compile every driver for these dtypes, activations and thread modes, or load it from the disk
    cache, so that no later call waits for it (a first call compiles for 40-100 s per dtype and
    activation): at an image's build, or beside a process that will need them. Runs each entry point
    once on tiny tensors of both loop shapes, so the signatures are those of real calls. The parallel
    drivers are skipped where they would not run (one thread, a forked child). Yields each family's
    name once it is ready."""
    for par in parallel:
        threads = threads_for(SERIAL_BELOW) if par else 1
        if par and threads == 1:
            continue
        backend = CpuBackend(threads)
        for dtype in dtypes:
            for activation in activations:
                _exercise(backend, dtype, activation)
                name = str(dtype).removeprefix("torch.") + (" (float32 kernels)" if dtype in WIDENED else "")
                yield f"{'parallel' if par else 'serial'} {name} {activation}"


def _exercise(backend: CpuBackend, dtype: torch.dtype, activation: str | None) -> None:
    """Forward, normalize, backward and the running update once on a segment view and a column view."""
    pshape = (1, 1, 3, 1)
    for shape5 in ((1, 1, 2, 3, COL_MAX_RUN), (1, 1, col_rows(1), 3, 1)):
        x5 = torch.rand(shape5).to(dtype)
        w, b = torch.ones(pshape, dtype=dtype), torch.zeros(pshape, dtype=dtype)
        y, st = backend.forward(x5, w, b, 1e-5, False, activation=activation)
        backend.normalize(x5, st.mean, st.rstd, w, b, activation=activation)
        backend.backward(y, x5, st.mean, st.rstd, w, pshape, False, True, (True, True, True), bias=b,
                         activation=activation)
    running = torch.zeros(3, dtype=dtype if dtype in (torch.float64, torch.bfloat16) else torch.float32)
    backend.update_running(running, running.clone(), st.mean, st.var, 0.1, 1.0)
