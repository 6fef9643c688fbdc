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
from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from ._numba_kernels import DRIVERS, lane_sum, running_update
from .contract import ACTIVATIONS, Grads, Stats, check_activation, update_running

NATIVE = (torch.float32, torch.float64, torch.bfloat16)
WIDENED = (torch.float16,)
SUPPORTED = NATIVE + WIDENED
# A unit of work whose data stays cached between its statistics and its output (a core's L2 and
# its share of the last level) is read from memory once. Measured from memory on a 2-core EPYC
# (512 KB L2): fused units of up to 1.5 MB were 5-12% faster than the same work in row chunks and
# two passes (GroupNorm channels-last 8x256x32x32, BatchNorm 8x32x192x192).
CACHE_BYTES = 3 << 19
# Small slabs are batched into units of about this size: per-unit overhead is tens of nanoseconds.
UNIT_BYTES = 1 << 16
# Below this many elements a parallel launch costs more than it saves.
SERIAL_BELOW = 1 << 15
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

    @property
    def param_shape(self) -> tuple[int, int, int, int]:
        return (self.p, self.k1, self.b, self.k2)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.g, self.r1, self.b * self.r2) if self.col else (self.g, self.r1, self.b, self.r2)


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


def plan(v: View, itemsize: int, threads: int, fuse: bool = True) -> Plan:
    """Cut the view into units: whole groups when they fit in cache and give every thread work
    (``fuse``: statistics and output in one read), otherwise row chunks as well."""
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
    enough = units >= (min(want, 2 * threads) if fuse else want)
    if v.r1 == 1 or (enough and (not fuse or group_bytes * bchunk <= CACHE_BYTES)):
        gchunk = max(1, min(units // want, UNIT_BYTES // (group_bytes * bchunk)))
        return Plan(gchunk, 1, v.r1, nbc, bchunk)
    nrc = min(v.r1, max(math.ceil(want / units), math.ceil(group_bytes * bchunk / CACHE_BYTES)))
    if v.col:
        nrc = min(nrc, max(1, v.r1 // col_rows(v.r2)))
    rchunk = math.ceil(v.r1 / nrc)
    return Plan(1, math.ceil(v.r1 / rchunk), rchunk, nbc, bchunk)


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


@lru_cache(maxsize=256)
def _setup(
    shape5: tuple[int, ...], pshape: tuple[int, ...], itemsize: int, threads: int, fuse: bool, tuning: tuple[int, ...]
) -> tuple[View, tuple[int, ...]]:
    """The view and plan of a call, computed once per shape: ``tuning`` (the module constants) is
    part of the key, so that changing them takes effect."""
    v = canonical(shape5, pshape, itemsize, threads)
    return v, tuple(plan(v, itemsize, threads, fuse))


def _view_plan(x5: Tensor, pshape: tuple[int, ...], threads: int, fuse: bool = True) -> tuple[View, tuple[int, ...]]:
    itemsize = 4 if x5.dtype in WIDENED else x5.element_size()
    return _setup(tuple(x5.shape), pshape, itemsize, threads, fuse, (CACHE_BYTES, UNIT_BYTES, COL_MAX_RUN))


@lru_cache(maxsize=64)
def _constant(shape: tuple[int, ...], dtype: type, value: float) -> np.ndarray:
    """Ones / zeros standing in for an absent weight / bias (never written)."""
    return np.full(shape, value, dtype=dtype)


_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _np(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    return (t if t.dtype == dtype else t.detach().to(dtype)).numpy(force=True)


def _param(t: Tensor | None, v: View, pshape: tuple[int, ...], acc: torch.dtype, absent: float) -> np.ndarray:
    """A parameter in the accumulation dtype, shaped (P, K1, B, K2) for the kernels."""
    if t is None:
        return _constant(v.param_shape, _NP[acc], absent)
    a = _np(t, acc)
    if a.shape != pshape or not a.flags.c_contiguous:
        a = np.ascontiguousarray(np.broadcast_to(a, pshape))
    return a.reshape(v.param_shape)


def _pshape(x5: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[int, int, int, int]:
    if weight is not None and bias is not None and weight.shape != bias.shape:
        return tuple(np.broadcast_shapes(tuple(weight.shape), tuple(bias.shape)))
    t = weight if weight is not None else bias
    return tuple(t.shape) if t is not None else (x5.shape[1], 1, x5.shape[3], 1)


def _driver(name: str, threads: int, activation: str | None = None):
    """The compiled driver for ``threads`` (parallel or serial) with the activation epilogue."""
    global _parallel_pid
    check_activation(activation)
    par, ser = DRIVERS[name][activation]
    if threads == 1:
        return ser
    if _parallel_pid is None:
        _parallel_pid = os.getpid()
    if getattr(_numba_threads, "n", 0) != threads:  # numba's count is per calling thread
        numba.set_num_threads(threads)
        _numba_threads.n = threads
    return par


def _arr(t: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """The kernels' view of a tensor's data (bfloat16 as uint16 bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(force=True).view(np.uint16).reshape(shape)
    return t.numpy(force=True).reshape(shape)


def _empty(t: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, np.ndarray]:
    """A new tensor like ``t`` and the kernels' view of it."""
    y = torch.empty_like(t)
    return y, _arr(y, shape)


def _widen(t: Tensor) -> Tensor:
    """A tensor the kernels can read: float32 for float16."""
    return t.detach().float() if t.dtype in WIDENED else t


def _narrow(y: Tensor, dtype: torch.dtype) -> Tensor:
    return y if y.dtype == dtype else y.to(dtype)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CpuBackend:
    """``threads``: run every call on this many threads (1: the serial drivers) instead of choosing by
    size and ``torch.get_num_threads()``."""

    name = "cpu"
    activations: tuple[str, ...] = ACTIVATIONS

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def _threads(self, numel: int) -> int:
        return threads_for(numel) if self.threads is None else self.threads

    def supports(self, x5: Tensor, weight: Tensor | None) -> bool:
        return (
            x5.is_cpu
            and x5.dtype in SUPPORTED
            and x5.numel() > 0
            and x5.is_contiguous()
            and (weight is None or weight.is_cpu)
        )

    def forward(
        self, x5: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool,
        activation: str | None = None,
    ) -> tuple[Tensor, Stats]:
        xs = _widen(x5)
        acc = _acc(xs.dtype)
        threads = self._threads(xs.numel())
        pshape = _pshape(x5, weight, bias)
        v, pl = _view_plan(x5, pshape, threads)
        y, ya = _empty(xs, v.data_shape)
        q, p, _, nb, _ = x5.shape
        stats = np.empty((3, q, p, nb), _NP[acc])  # one allocation; each statistic its own tensor below
        mean, rstd, var = stats.reshape(3, v.g, v.b)
        w, b = _param(weight, v, pshape, acc, 1.0), _param(bias, v, pshape, acc, 0.0)
        data = (_arr(xs, v.data_shape), ya, w, b, mean, rstd, var)
        flags = (float(eps), rms, _lanes(v, pl, threads), pl)
        if v.col:
            _driver("forward_col", threads, activation)(*data, v.r2, *flags)
        else:
            _driver("forward_seg", threads, activation)(*data, *flags)
        return _narrow(y, x5.dtype), Stats(torch.from_numpy(stats[0]), torch.from_numpy(stats[1]), torch.from_numpy(stats[2]))

    def normalize(
        self, x5: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
        activation: str | None = None,
    ) -> Tensor:
        xs = _widen(x5)
        acc = _acc(xs.dtype)
        threads = self._threads(xs.numel())
        pshape = _pshape(x5, weight, bias)
        v, pl = _view_plan(x5, pshape, threads, fuse=False)
        y, ya = _empty(xs, v.data_shape)
        data = (
            _arr(xs, v.data_shape), ya,
            _param(weight, v, pshape, acc, 1.0), _param(bias, v, pshape, acc, 0.0),
            _np(mean, acc).reshape(v.g, v.b), _np(rstd, acc).reshape(v.g, v.b),
        )
        if v.col:
            _driver("apply_col", threads, activation)(*data, v.r2, pl)
        else:
            _driver("apply_seg", threads, activation)(*data, pl)
        return _narrow(y, x5.dtype)

    def update_running(
        self, running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
        momentum: float, var_scale: float,
    ) -> None:
        """One serial kernel per buffer where the buffer can be written as an array (bfloat16 as its
        bits); torch ops otherwise (float16, a buffer that requires grad). The write bumps the
        buffer's version counter, as an in-place torch op would: a graph that saved the buffer then
        refuses to use it."""
        if not (_blendable(running_mean, mean) and _blendable(running_var, var)):
            update_running(running_mean, running_var, mean, var, momentum, var_scale)
            return
        for running, stat, scale in ((running_mean, mean, 1.0), (running_var, var, var_scale)):
            if running is not None:
                n = running.numel()
                running_update(_arr(running, (n,)), stat.numpy(force=True).reshape(-1, n), 1.0 - momentum, momentum * scale)
                torch.autograd.graph.increment_version(running)

    def backward(
        self,
        dy5: Tensor,
        x5: Tensor,
        mean: Tensor,
        rstd: Tensor,
        weight: Tensor | None,
        param_shape: tuple[int, int, int, int],
        rms: bool,
        batch_stats: bool,
        output_mask: tuple[bool, bool, bool],
        bias: Tensor | None = None,
        activation: str | None = None,
    ) -> Grads:
        """The contract's backward; ``bias`` is needed only with an ``activation``."""
        xs, dys = _widen(x5), _widen(dy5).contiguous()
        acc = _acc(xs.dtype)
        threads = self._threads(xs.numel())
        pshape = tuple(param_shape)
        v, pl = _view_plan(x5, pshape, threads)
        nlanes = _lanes(v, pl, threads)
        want_dx = output_mask[0]
        xa = _arr(xs, v.data_shape)
        dx, dxa = _empty(xs, v.data_shape) if want_dx else (None, xa[:0])
        pcols = (v.p, v.b * v.r2) if v.col else v.param_shape
        lanes = np.zeros((2, nlanes, *pcols))
        args = (
            _arr(dys, v.data_shape), xa, dxa,
            _np(mean, acc).reshape(v.g, v.b), _np(rstd, acc).reshape(v.g, v.b), _param(weight, v, pshape, acc, 1.0),
            _param(bias, v, pshape, acc, 0.0), lanes[0], lanes[1],
        )
        flags = (rms, batch_stats, want_dx, nlanes, pl)
        if v.col:
            _driver("backward_col", threads, activation)(*args, v.r2, *flags)
        else:
            _driver("backward_seg", threads, activation)(*args, *flags)
        dweight, dbias = _param_grads(lanes, pshape, acc) if output_mask[1] or output_mask[2] else (None, None)
        return Grads(
            _narrow(dx, x5.dtype) if want_dx else None,
            dweight if output_mask[1] else None,
            dbias if output_mask[2] else None,
        )


def _blendable(running: Tensor | None, stat: Tensor) -> bool:
    """A buffer the update kernel writes: the statistics' dtype, or bfloat16 (a bf16 model's buffers)."""
    return running is None or (
        (running.dtype == stat.dtype or (running.dtype == torch.bfloat16 and stat.dtype == torch.float32))
        and running.device.type == "cpu" and running.is_contiguous() and not running.requires_grad
    )


def _lanes(v: View, pl: tuple[int, ...], threads: int) -> int:
    """Lanes of a pass: one per thread, at most one per unit."""
    gchunk, nrc, _, nbc, _ = pl
    return min(threads, math.ceil(v.g / gchunk) * nrc * nbc)


def _param_grads(lanes: np.ndarray, pshape: tuple[int, ...], acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """dweight and dbias from their per-lane float64 partials ``(2, lanes, ...)``: one kernel call (a
    numpy reduction costs several microseconds each)."""
    out = np.empty((2, *pshape), _NP[acc])
    lane_sum(lanes.reshape(2, lanes.shape[1], -1), out.reshape(2, -1))
    return torch.from_numpy(out[0]), torch.from_numpy(out[1])


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
                yield f"{'parallel' if par else 'serial'} {str(dtype).removeprefix('torch.')} {activation}"


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
