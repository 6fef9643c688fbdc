"""The ``cpu`` backend: numba kernels on the 5-D view, parallel over groups, channels or row chunks.

* float32 and float64 run natively. bfloat16 and float16 are widened to float32 with torch before the
  kernels and the output is rounded back once, which is exactly what the reference computes (it
  works in float32 too); this costs two extra passes over the data.
* Threads follow ``torch.get_num_threads()``. With one thread (DataLoader workers), for small
  tensors, and in a process forked after kernels ran in parallel, the serial compilation runs, so the
  OpenMP layer is never entered where it would oversubscribe or is not fork-safe.
* Importing this module compiles nothing: each driver compiles on its first call per dtype and the
  machine code is cached on disk (numba ``cache=True``) for later processes.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numba
import torch
from torch import Tensor

from ._numba_kernels import DRIVERS
from .contract import Grads, Stats, stat_shape, stats_dtype

NATIVE = (torch.float32, torch.float64)
WIDENED = (torch.bfloat16, torch.float16)
# A unit of work whose data fits in one core's L2 is read from memory once (statistics + output).
CACHE_BYTES = 1 << 19
# Below this many elements a parallel launch costs more than it saves.
SERIAL_BELOW = 1 << 15
# Column loops serve groups of fewer adjacent elements than this; longer runs use segment loops.
COL_MAX_RUN = 32

_parallel_pid: int | None = None


class Plan(NamedTuple):
    """How the work is cut: ``nrc`` row chunks of ``rchunk`` rows and ``nbc`` group chunks of ``bchunk``."""

    threads: int
    nrc: int
    rchunk: int
    nbc: int
    bchunk: int


def threads_for(numel: int) -> int:
    """Threads to use: torch's setting, or 1 for small work and in a forked child."""
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if n <= 1 or numel < SERIAL_BELOW:
        return 1
    if _parallel_pid is not None and _parallel_pid != os.getpid():
        return 1
    return n


def plan(groups: int, rows: int, nb: int, run: int, itemsize: int, threads: int, fuse: bool = True) -> Plan:
    """Cut ``groups`` slabs of ``rows`` x ``nb`` x ``run`` into units: whole groups when they fit in
    cache and give every thread work, otherwise row chunks as well. Without ``fuse`` (no reduction)
    units only need to give every thread work."""
    group_bytes = max(1, rows * run * itemsize)
    want = 4 * threads if threads > 1 else 1
    bchunk = max(1, min(nb, CACHE_BYTES // group_bytes))
    bchunk = min(bchunk, max(1, math.ceil(nb / math.ceil(want / groups))))
    nbc = math.ceil(nb / bchunk)
    units = groups * nbc
    if rows == 1 or (units >= want if not fuse else group_bytes <= CACHE_BYTES and units >= min(want, 2 * threads)):
        return Plan(threads, 1, rows, nbc, bchunk)
    nrc = min(rows, max(math.ceil(want / units), math.ceil(group_bytes * bchunk / CACHE_BYTES)))
    rchunk = math.ceil(rows / nrc)
    return Plan(threads, math.ceil(rows / rchunk), rchunk, nbc, bchunk)


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
        """Per-column accumulation: several short groups side by side in each row (channels_last)."""
        return self.b > 1 and self.r2 < COL_MAX_RUN and self.k1 == 1

    def param_shape(self) -> tuple[int, int, int, int]:
        return (self.p, self.k1, self.b, self.k2)


def canonical(shape5: tuple[int, ...], pshape: tuple[int, ...], itemsize: int, threads: int) -> View:
    """Merge a single contiguous group into one run and re-split long runs into rows so that few,
    long groups (a huge LayerNorm row) still spread over threads."""
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
            per_elem = v.k2 > 1
            v = View(v.g, v.r2 // run, 1, run, p, v.r2 // run if per_elem else 1, run if per_elem else 1)
    return v


def _divisor_near(n: int, target: int) -> int:
    """The largest divisor of ``n`` not above ``target`` that is at least 64, else ``n``."""
    for d in range(min(n, target), 63, -1):
        if n % d == 0:
            return d
    return n


def _params(weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...], acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Weight and bias in the accumulation dtype, both of ``shape`` (ones / zeros where absent)."""
    w = torch.ones(shape, dtype=acc) if weight is None else weight.detach().to(acc).expand(shape).contiguous()
    b = torch.zeros(shape, dtype=acc) if bias is None else bias.detach().to(acc).expand(shape).contiguous()
    return w, b


def _forward_shape(x5: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[int, int, int, int]:
    _, p, _, b, _ = x5.shape
    shapes = [tuple(t.shape) for t in (weight, bias) if t is not None]
    return tuple(torch.broadcast_shapes(*shapes)) if shapes else (p, 1, b, 1)


def _col_params(t: Tensor, v: View) -> Tensor:
    """(P, 1, B, K2) -> (P, B*R2): one value per column."""
    return t.expand(v.p, 1, v.b, v.r2).reshape(v.p, v.b * v.r2).contiguous()


def _driver(name: str, threads: int):
    global _parallel_pid
    par, ser = DRIVERS[name]
    if threads == 1:
        return ser
    if _parallel_pid is None:
        _parallel_pid = os.getpid()
    numba.set_num_threads(threads)
    return par


def _widen(t: Tensor) -> Tensor:
    """A detached tensor the kernels can read: float32 for the half types."""
    t = t.detach()
    return t.float() if t.dtype in WIDENED else t


class CpuBackend:
    name = "cpu"

    def supports(self, x5: Tensor, weight: Tensor | None) -> bool:
        return (
            x5.device.type == "cpu"
            and x5.dtype in NATIVE + WIDENED
            and x5.numel() > 0
            and x5.is_contiguous()
            and (weight is None or weight.device.type == "cpu")
        )

    def forward(
        self, x5: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool
    ) -> tuple[Tensor, Stats]:
        xs = _widen(x5)
        acc = stats_dtype(xs.dtype)
        pshape = _forward_shape(x5, weight, bias)
        threads = threads_for(xs.numel())
        v = canonical(tuple(x5.shape), pshape, xs.element_size(), threads)
        w, b = _params(weight, bias, pshape, acc)
        y = torch.empty_like(xs)
        g, nb = v.g, v.b
        mean, rstd, var = (torch.empty((g, nb), dtype=acc) for _ in range(3))
        pl = plan(g, v.r1, nb, v.r2, xs.element_size(), threads)
        stats = (mean.numpy(), rstd.numpy(), var.numpy())
        if v.col:
            w, b = _col_params(w.view(v.param_shape()), v), _col_params(b.view(v.param_shape()), v)
            shape3 = (g, v.r1, nb * v.r2)
            _driver("forward_col", threads)(
                xs.view(shape3).numpy(), y.view(shape3).numpy(), w.numpy(), b.numpy(), *stats, v.r2,
                float(eps), rms, pl.nrc, pl.rchunk, pl.nbc, pl.bchunk,
            )
        else:
            shape4 = (g, v.r1, nb, v.r2)
            _driver("forward_seg", threads)(
                xs.view(shape4).numpy(), y.view(shape4).numpy(), w.view(v.param_shape()).numpy(),
                b.view(v.param_shape()).numpy(), *stats, float(eps), rms, pl.nrc, pl.rchunk, pl.nbc, pl.bchunk,
            )
        out = stat_shape(x5)
        return y.to(x5.dtype), Stats(mean.view(out), rstd.view(out), var.view(out))

    def normalize(
        self, x5: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        xs = _widen(x5)
        acc = stats_dtype(xs.dtype)
        pshape = _forward_shape(x5, weight, bias)
        threads = threads_for(xs.numel())
        v = canonical(tuple(x5.shape), pshape, xs.element_size(), threads)
        w, b = _params(weight, bias, pshape, acc)
        y = torch.empty_like(xs)
        m = mean.detach().to(acc).reshape(v.g, v.b).contiguous().numpy()
        r = rstd.detach().to(acc).reshape(v.g, v.b).contiguous().numpy()
        pl = plan(v.g, v.r1, v.b, v.r2, xs.element_size(), threads, fuse=False)
        if v.col:
            w, b = _col_params(w.view(v.param_shape()), v), _col_params(b.view(v.param_shape()), v)
            shape3 = (v.g, v.r1, v.b * v.r2)
            _driver("apply_col", threads)(
                xs.view(shape3).numpy(), y.view(shape3).numpy(), w.numpy(), b.numpy(), m, r, v.r2,
                pl.nrc, pl.rchunk, pl.nbc, pl.bchunk,
            )
        else:
            shape4 = (v.g, v.r1, v.b, v.r2)
            _driver("apply_seg", threads)(
                xs.view(shape4).numpy(), y.view(shape4).numpy(), w.view(v.param_shape()).numpy(),
                b.view(v.param_shape()).numpy(), m, r, pl.nrc, pl.rchunk, pl.nbc, pl.bchunk,
            )
        return y.to(x5.dtype)

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
    ) -> Grads:
        xs, dys = _widen(x5), _widen(dy5).contiguous()
        acc = stats_dtype(xs.dtype)
        threads = threads_for(xs.numel())
        v = canonical(tuple(x5.shape), tuple(param_shape), xs.element_size(), threads)
        w, _ = _params(weight, None, tuple(param_shape), acc)
        m = mean.detach().to(acc).reshape(v.g, v.b).contiguous().numpy()
        r = rstd.detach().to(acc).reshape(v.g, v.b).contiguous().numpy()
        pl = plan(v.g, v.r1, v.b, v.r2, xs.element_size(), threads)
        nlanes = min(threads, v.g * pl.nrc * pl.nbc)
        dx = torch.empty_like(xs) if output_mask[0] else torch.empty_like(xs[:0])
        if v.col:
            w = _col_params(w.view(v.param_shape()), v)
            shape3 = (v.g, v.r1, v.b * v.r2)
            lanes = torch.zeros((2, nlanes, v.p, v.b * v.r2), dtype=torch.float64)
            _driver("backward_col", threads)(
                dys.view(shape3).numpy(), xs.view(shape3).numpy(),
                dx.view(shape3).numpy() if output_mask[0] else dx.numpy().reshape(0, 0, 0), m, r, w.numpy(),
                lanes[0].numpy(), lanes[1].numpy(), v.r2, rms, batch_stats, output_mask[0], nlanes,
                pl.nrc, pl.rchunk, pl.nbc, pl.bchunk,
            )
            sums = lanes.sum(1).view(2, v.p, 1, v.b, v.r2)
            if v.k2 == 1:
                sums = sums.sum(4, keepdim=True)
        else:
            shape4 = (v.g, v.r1, v.b, v.r2)
            lanes = torch.zeros((2, nlanes, *v.param_shape()), dtype=torch.float64)
            _driver("backward_seg", threads)(
                dys.view(shape4).numpy(), xs.view(shape4).numpy(),
                dx.view(shape4).numpy() if output_mask[0] else dx.numpy().reshape(0, 0, 0, 0), m, r,
                w.view(v.param_shape()).numpy(), lanes[0].numpy(), lanes[1].numpy(), rms, batch_stats,
                output_mask[0], nlanes, pl.nrc, pl.rchunk, pl.nbc, pl.bchunk,
            )
            sums = lanes.sum(1)
        dw, db = (s.reshape(param_shape).to(acc) for s in sums)
        return Grads(
            dx.to(x5.dtype) if output_mask[0] else None,
            dw if output_mask[1] else None,
            db if output_mask[2] else None,
        )
