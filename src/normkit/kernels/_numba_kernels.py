"""Numba kernels of the ``cpu`` backend: one set for every norm and layout.

The data is a slab per ``g = (q, p)`` of ``R1`` rows; statistics are per ``(g, b)``. Two loop shapes
cover every view (see ``cpu.py`` for the choice):

* ``seg`` — ``x`` as ``(G, R1, B, R2)``; the inner loop runs over a contiguous segment of ``R2``
  elements (BatchNorm NCHW, InstanceNorm/GroupNorm NCHW, LayerNorm, RMSNorm). Parameters are
  ``(P, K1, B, K2)`` with ``K1`` in ``{1, R1}`` and ``K2`` in ``{1, R2}``.
* ``col`` — ``x`` as ``(G, R1, W)`` with ``W = B * R2`` and ``R2`` small; the inner loop runs over
  the columns of a row and accumulates per column, folded into groups afterwards (channels_last
  BatchNorm, InstanceNorm and GroupNorm). Parameters are ``(P, 1, B, K2)`` as well, expanded to the
  columns of each unit; dweight/dbias partials are ``(P, W)``.

Work is split into units ``(slab chunk, row chunk, group chunk)``. With one row chunk a unit owns whole
groups and is *fused*: statistics and output are computed while the unit is still in cache, so the
input is read from memory once. Otherwise partial sums per row chunk are combined first and the
input is read a second time, each thread walking its units backwards (``_lane``) so that it starts on
what it read last.

Statistics are sums shifted by the first element of each group, which makes constant groups exact;
a group whose first element lies 4 or more standard deviations from its mean is summed again about the
mean in float64 (``_far``), rare in ordinary data and where float32 sums would lose the variance.
Short blocks are summed in float32 (vector-wide) and the blocks added in float64, which keeps long
reductions accurate; a group whose float32 squares overflow (inputs of scale 1e20) is summed again
with every term in float64. float64 input sums in float64 throughout. Backward group reductions
use the same float32 blocks added in float64; dweight/dbias partials are summed in the statistics
dtype (as the reference sums them), added into float64 lanes after each unit. ``fastmath`` only
allows reassociation and contraction (vectorized reductions, FMA); NaN and Inf keep propagating.
Division follows IEEE (numba's numpy error model): no check for a zero divisor, which would raise
inside a kernel and keeps loops from vectorizing.

Drivers take each tensor as its data pointer (an int) beside the view's dims ``(G, R1, B, R2, P, K1,
K2)`` and two type tags (a scalar of the data's and of the statistics' type); bfloat16 data is read
as its uint16 bits: ``_load`` widens an element to float32 exactly and
``_store`` rounds to nearest even (NaN to 0x7FC0), as torch's own conversion does.

Every driver is compiled twice from the same source: with ``prange`` run in parallel, and serial
for small work, single-threaded callers and forked children (the OpenMP layer is not fork-safe).
"""

from __future__ import annotations

import math
import types as pytypes

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

_FAST = {"reassoc", "contract"}
_DRIVER = dict(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")
# Helpers are inlined into the drivers: a call passing arrays costs tens of nanoseconds per slab.
_HELPER = dict(_DRIVER, inline="always")
# Elements per float32 partial sum: short enough that the partial keeps float64-level accuracy.
_BLOCK = 256
_COL_BLOCK = 64
# Rows shorter than this (elements) with a parameter each are normalized as one run (``_seg_apply_flat``).
_SHORT_RUN = 64
# The column loops sweep whole rows shorter than this many elements several at a time (``_col_reps``).
_COL_TILE = 128


@intrinsic
def _bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _address(typingctx, addr, tag):
    """The int ``addr`` as a pointer to elements of ``tag``'s type (for ``carray``)."""
    ptr = types.CPointer(tag)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(addr, tag), codegen


@njit(**_HELPER)
def _at(addr, shape, tag):
    """The C-contiguous array of ``shape`` at address ``addr`` with elements of ``tag``'s type: the
    drivers take the callers' tensors as data pointers, as turning a tensor into an ndarray costs
    microseconds a call."""
    return carray(_address(addr, tag), shape)


@njit(**_HELPER)
def _seg_at(addr, dims, tag):
    """Data of the seg loops at ``addr``: (G, R1, B, R2) of the dims ``(G, R1, B, R2, P, K1, K2)``."""
    return _at(addr, (dims[0], dims[1], dims[2], dims[3]), tag)


@njit(**_HELPER)
def _col_at(addr, dims, tag):
    """Data of the column loops at ``addr``: (G, R1, B * R2)."""
    return _at(addr, (dims[0], dims[1], dims[2] * dims[3]), tag)


@njit(**_HELPER)
def _params_at(wp, bp, dims, tag):
    """Weight and bias at ``wp``, ``bp``: (P, K1, B, K2) each."""
    shape = (dims[4], dims[5], dims[2], dims[6])
    return _at(wp, shape, tag), _at(bp, shape, tag)


@njit(**_HELPER)
def _stat_at(addr, dims, tag):
    """One statistic per group at ``addr``: (G, B)."""
    return _at(addr, (dims[0], dims[2]), tag)


@njit(**_HELPER)
def _run(a, start, n, tag):
    """``n`` elements of the C-contiguous array ``a`` (elements of ``tag``'s type) from flat index
    ``start``, as a view made from their address. Per slab or group, ``reshape`` and slices of heap
    arrays call into numba's runtime (a reshape helper, atomic reference counts), and a loop from a
    computed start index wraps negative indices on every element."""
    return _at(a.ctypes.data + start * a.itemsize, (n,), tag)


def _load(v):
    """An element as a float: bfloat16 bits (uint16) widen to float32, floats pass through."""


@overload(_load, inline="always")
def _load_impl(v):
    if isinstance(v, types.Integer):
        return lambda v: _bits_to_f32(np.uint32(v) << np.uint32(16))
    return lambda v: v


def _store(a, i, v):
    """``a[i] = v``, rounding to bfloat16 bits when ``a`` holds them."""


@overload(_store, inline="always")
def _store_impl(a, i, v):
    if isinstance(a.dtype, types.Integer):

        def impl(a, i, v):
            f = np.float32(v)
            bits = _f32_to_bits(f)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            nan = np.uint32(f != f)  # a select in arithmetic: a branch here keeps the loop from vectorizing
            a[i] = np.uint16(rounded + nan * (np.uint32(0x7FC0) - rounded))

        return impl

    def impl(a, i, v):
        a[i] = v

    return impl


def _zero(v):
    """0 in the type short reductions of ``v``'s elements run in: float64 for float64, else float32."""


@overload(_zero, inline="always")
def _zero_impl(v):
    if v == types.float64:
        return lambda v: np.float64(0.0)
    return lambda v: np.float32(0.0)


@njit(**_HELPER)
def _aligned(n, dtype):
    """``n`` uninitialised elements of ``dtype`` from a cache-line boundary. numba's arrays start on
    32-byte boundaries, and a vector loop (64 bytes a load) over scratch arrays that straddle cache
    lines ran 20-25% slower: BatchNorm 32x512x7x7 channels-last apply 42 against 34 µs with the data
    cached. Scratch arrays that a loop reads or adds into on every row are taken from here."""
    buf = np.empty(n + 16, dtype)
    start = (-buf.ctypes.data) % 64 // buf.itemsize
    return buf[start:start + n]


@njit(**_HELPER)
def _aligned_zeros(n, dtype):
    out = _aligned(n, dtype)
    out[:] = 0
    return out


def _acc_zeros(v, n):
    """Zeros of shape ``n`` in the type of ``_zero(v)`` (a 1-D length: from a cache line)."""


@overload(_acc_zeros, inline="always")
def _acc_zeros_impl(v, n):
    dtype = np.float64 if v == types.float64 else np.float32
    if isinstance(n, types.Integer):
        return lambda v, n: _aligned_zeros(n, dtype)
    return lambda v, n: np.zeros(n, dtype)


# ---- activation epilogue ---------------------------------------------------------------------
# ``act`` is a compile-time constant: None (no activation: the helpers compile to nothing) or a code
# of ``ACTIVATION_CODES``. Each driver is compiled once per activation (``_variant``), with no branch
# in its loops; the helpers select arithmetically or by a conditional expression between two values
# (which LLVM makes a select), as a branch around work in inlined code keeps numba from vectorizing the
# loop.
# Without a vector math library numba calls libm's exp and erfc one element at a time, several
# times slower than torch's activations; in float32 they are computed here with polynomials that
# vectorize (float64 keeps libm). NaN stays NaN.

ACTIVATION_CODES = {"relu": 1, "silu": 2, "gelu": 3}
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _scales_in_vectors() -> bool:
    """Whether numba compiles for AVX-512 (``NUMBA_CPU_FEATURES``, else the host's): its ``vscalefps``
    takes LLVM's vector ``ldexp`` in one instruction. The features are part of numba's cache key, so
    cached code matches."""
    features = numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


@intrinsic
def _ldexp(typingctx, x, n):
    """float32 ``x * 2**n`` for an int32 ``n`` in [-252, 254], rounded once, into inf and the subnormals.
    With AVX-512 LLVM's ``ldexp`` (one ``vscalefps`` a vector); elsewhere LLVM would call libm's
    ``ldexpf`` per element (24x slower), so there as two factors ``2**(n >> 1)`` and ``2**(n - (n >> 1))``,
    each a normal number: the first product is exact, the second rounds. No fast-math flags: the
    factors must not be combined."""

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        if _scales_in_vectors():
            fnty = ir.FunctionType(f32, [f32, i32])
            return builder.call(builder.module.declare_intrinsic("llvm.ldexp", [f32, i32], fnty), args)
        x, n = args
        half = builder.ashr(n, ir.Constant(i32, 1))
        factors = [
            builder.bitcast(builder.shl(builder.add(e, ir.Constant(i32, 127)), ir.Constant(i32, 23)), f32)
            for e in (half, builder.sub(n, half))
        ]
        return builder.fmul(builder.fmul(x, factors[0]), factors[1])

    return types.float32(types.float32, types.int32), codegen


@intrinsic
def _rounded(typingctx, t):
    """The int32 that ``t = x + 1.5 * 2**23`` holds in its low mantissa bits: ``x`` rounded to nearest,
    for |x| < 2**22, with an integer subtraction that reassociation cannot fold away; defined for every
    ``t`` (a float-to-int conversion of NaN is not)."""

    def codegen(context, builder, signature, args):
        return builder.sub(builder.bitcast(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 0x4B400000))

    return types.int32(types.float32), codegen


def _exp(v):
    """exp(v): libm for float64; for float32 a degree-6 polynomial on [-ln2/2, ln2/2] (ln2 split in two
    for the reduction) scaled by 2**n (``_ldexp``): about 1 ulp, inf past float32's range, the
    subnormals below its smallest normal number and 0 past them, so silu and gelu give torch's values
    far out in their negative tails, not a clamped exponent's 1e-8. The clamps are selects that keep a
    NaN (one ``vmaxps``/``vminps`` each), which the polynomial carries: the builtin ``max``/``min``,
    which numba lowers to one select, not conditional expressions, whose branches, inlined several
    times into one loop, tripped numba's pedantic SSA check (a ``NumbaIRAssumptionWarning`` asking for a
    bug report) on the same code."""


@overload(_exp, inline="always")
def _exp_impl(v):
    if v == types.float64:
        return lambda v: np.exp(v)
    f = np.float32

    def impl(v):
        c = min(max(v, f(-104.0)), f(88.73))
        k = _rounded(c * f(1.4426950408889634) + f(12582912.0))
        n = f(k)
        r = c - n * f(0.693359375) + n * f(2.12194440e-4)
        p = f(1.9875691500e-4) * r + f(1.3981999507e-3)
        p = p * r + f(8.3334519073e-3)
        p = p * r + f(4.1665795894e-2)
        p = p * r + f(1.6666665459e-1)
        p = p * r + f(5.0000001201e-1)
        return _ldexp(p * (r * r) + r + f(1.0), k)

    return impl


def _erfc(v):
    """erfc(v): libm for float64; for float32 the Chebyshev fit of Numerical Recipes' ``erfcc``
    (relative error below 1.2e-7), which keeps GELU's negative tail accurate."""


@overload(_erfc, inline="always")
def _erfc_impl(v):
    if v == types.float64:
        return lambda v: math.erfc(v)
    f = np.float32

    def impl(v):
        z = abs(v)
        t = f(1.0) / (f(1.0) + f(0.5) * z)
        p = f(0.17087277) * t + f(-0.82215223)
        p = p * t + f(1.48851587)
        p = p * t + f(-1.13520398)
        p = p * t + f(0.27886807)
        p = p * t + f(-0.18628806)
        p = p * t + f(0.09678418)
        p = p * t + f(0.37409196)
        p = p * t + f(1.00002368)
        ans = t * _exp(p * t + f(-1.26551223) - z * z)
        neg = f(v < f(0.0))  # arithmetic, not a branch: erfc(v) = 2 - erfc(-v)
        return neg * f(2.0) + (f(1.0) - f(2.0) * neg) * ans

    return impl


def _act(z, act):
    """activation(z)."""


@overload(_act, inline="always", prefer_literal=True)
def _act_impl(z, act):
    if isinstance(act, types.NoneType):
        return lambda z, act: z
    f = np.float64 if z == types.float64 else np.float32
    code = act.literal_value
    if code == ACTIVATION_CODES["relu"]:
        return lambda z, act: np.maximum(z, f(0.0))
    if code == ACTIVATION_CODES["silu"]:
        return lambda z, act: z / (f(1.0) + _exp(-z))
    return lambda z, act: f(0.5) * z * _erfc(z * f(-_INV_SQRT2))


def _linear(act):
    """Whether there is no activation (whose derivative would need x), known when the driver compiles."""


@overload(_linear, inline="always", prefer_literal=True)
def _linear_impl(act):
    linear = isinstance(act, types.NoneType)
    return lambda act: linear


def _costly(act):
    """Whether the activation costs more per element than the norm (an exp or erfc: silu, gelu), known
    when the driver compiles."""


@overload(_costly, inline="always", prefer_literal=True)
def _costly_impl(act):
    costly = not isinstance(act, types.NoneType) and act.literal_value != ACTIVATION_CODES["relu"]
    return lambda act: costly


def _act_grad(d, z, act):
    """``d * activation'(z)``: the gradient reaching the norm's output ``z``."""


@overload(_act_grad, inline="always", prefer_literal=True)
def _act_grad_impl(d, z, act):
    if isinstance(act, types.NoneType):
        return lambda d, z, act: d
    f = np.float64 if z == types.float64 else np.float32
    code = act.literal_value
    if code == ACTIVATION_CODES["relu"]:
        return lambda d, z, act: d * (f(1.0) - f(z <= f(0.0)))  # as torch, a NaN z lets d through

    if code == ACTIVATION_CODES["silu"]:

        def silu(d, z, act):
            s = f(1.0) / (f(1.0) + _exp(-z))
            return d * (s * (f(1.0) + z * (f(1.0) - s)))

        return silu

    def gelu(d, z, act):
        cdf = f(0.5) * _erfc(z * f(-_INV_SQRT2))
        return d * (cdf + z * _exp(f(-0.5) * z * z) * f(_INV_SQRT_2PI))

    return gelu


def _keep(out, k, d, act):
    """With an activation, ``out[k] = d``: the backward's first pass keeps the activation's gradient in
    dx's memory (overwritten by dx in the second pass), which then reads it instead of taking the
    activation's derivative again (an exp and a division per element). Not for bfloat16 dx (its
    bits would round the gradient) nor without an activation (the gradient is dy)."""


@overload(_keep, inline="always", prefer_literal=True)
def _keep_impl(out, k, d, act):
    if isinstance(act, types.NoneType) or isinstance(out.dtype, types.Integer):
        return lambda out, k, d, act: None

    def impl(out, k, d, act):
        out[k] = d

    return impl


def _kept(out, k, ds, z, act):
    """The gradient at the activation's input for ``dx``'s element ``k``: kept by ``_keep``, or
    ``_act_grad(ds, z)`` where nothing was kept."""


@overload(_kept, inline="always", prefer_literal=True)
def _kept_impl(out, k, ds, z, act):
    if isinstance(act, types.NoneType) or isinstance(out.dtype, types.Integer):
        return lambda out, k, ds, z, act: _act_grad(ds, z, act)
    return lambda out, k, ds, z, act: out[k]


@njit(**_HELPER)
def _finish(s, ss, inv_n, shift, eps, rms):
    """(mean, var, rstd) in float64 from shifted sums of ``1 / inv_n`` elements (a product: a division
    per group was a tenth of the time on 7x7 planes)."""
    if rms:
        var = ss * inv_n
        mean = 0.0
    else:
        m = s * inv_n
        var = ss * inv_n - m * m
        if var < 0.0:
            var = 0.0
        mean = shift + m
    return mean, var, 1.0 / np.sqrt(var + eps)


# A shift this many standard deviations or more from the group's mean (an outlier in the group's first
# position: a massive-activation feature in a LayerNorm row) leaves the shifted second moment mostly mean
# square; float32 partial sums then lose the variance (relative error 1e-2 on a row of 2**20 with one
# spike, against torch's 3e-8). Such groups are summed again about their mean.
_FAR = 4.0


@njit(**_HELPER)
def _far(s, ss, inv_n, rms):
    """Whether shifted sums ``s``, ``ss`` put the shift ``_FAR`` standard deviations or more from the mean
    (false for NaN: it propagates as it is)."""
    m = s * inv_n
    return not rms and m * m * (1.0 + _FAR * _FAR) > ss * inv_n * _FAR * _FAR


@njit(**_HELPER)
def _seg_stats(x, g, b, s, ss, inv_n, eps, rms):
    """``_finish`` of group ``b`` of slab ``g`` from its sums shifted by its first element; summed again
    in float64 about the mean where that shift was far (``_far``)."""
    sh = _seg_shift(x, g, b, rms)
    if _far(s, ss, inv_n, rms):
        sh += s * inv_n
        s = 0.0
        ss = 0.0
        for r in range(x.shape[1]):
            seg = x[g, r, b]
            for k in range(seg.shape[0]):
                d = np.float64(_load(seg[k])) - sh
                s += d
                ss += d * d
    return _finish(s, ss, inv_n, sh, eps, rms)


@njit(**_HELPER)
def _col_stats(x, g, b, r2, s, ss, inv_n, sh, eps, rms):
    """``_seg_stats`` for the column loops: group ``b`` is columns ``b * r2 : (b + 1) * r2`` of every row."""
    if _far(s, ss, inv_n, rms):
        sh += s * inv_n
        s = 0.0
        ss = 0.0
        for r in range(x.shape[1]):
            for j in range(b * r2, (b + 1) * r2):
                d = np.float64(_load(x[g, r, j])) - sh
                s += d
                ss += d * d
    return _finish(s, ss, inv_n, sh, eps, rms)


@njit(**_HELPER)
def _unit(u, plan, g_total, r1_total, b_total):
    """Slabs ``g0:g1``, row chunk ``rc`` = rows ``r0:r1`` and groups ``b0:b1`` of unit ``u``."""
    gchunk, nrc, rchunk, nbc, bchunk = plan
    g0 = (u // (nrc * nbc)) * gchunk
    rc = (u // nbc) % nrc
    r0 = rc * rchunk
    b0 = (u % nbc) * bchunk
    return g0, min(g_total, g0 + gchunk), rc, r0, min(r1_total, r0 + rchunk), b0, min(b_total, b0 + bchunk)


@njit(**_HELPER)
def _lane(lane, nlanes, units):
    """Units ``lo:hi`` of one lane (a thread's contiguous share of a pass). A second pass walks its
    lane backwards, so that it starts on what the first pass read last and is still cached."""
    return lane * units // nlanes, (lane + 1) * units // nlanes


@njit(**_HELPER)
def _units(plan, g_total):
    gchunk, nrc, _, nbc, _ = plan
    return -(-g_total // gchunk) * nrc * nbc


@njit(**_HELPER)
def _chunk_total(part, g, b):
    """Sum of the row-chunk partials ``part[g, :, b]``, as a loop: an array ``sum()`` outside
    ``prange`` would be a parallel region of its own, one per group."""
    t = 0.0
    for rc in range(part.shape[1]):
        t += part[g, rc, b]
    return t


@njit(**_HELPER)
def _slab_param(g, w):
    return 0 if w.shape[0] == 1 else g % w.shape[0]


# ---- seg: contiguous segments of R2 elements -------------------------------------------------


@njit(**_HELPER)
def _shift(v):
    """A group's shift from its first element ``v``: 0 where ``v`` is not finite (with an infinite shift,
    inf - inf would make a mean of inf NaN)."""
    return v if np.isfinite(v) else _zero(v)


@njit(**_HELPER)
def _seg_shift(x, g, b, rms):
    return 0.0 if rms else np.float64(_shift(_load(x[g, 0, b, 0])))


@njit(**_HELPER)
def _seg_group_sums(x, g, r0, r1, b, rms):
    """Shifted sums (float64) of rows ``r0:r1`` of group ``b`` in slab ``g``.

    Blocks of ``_BLOCK`` elements are summed in float32 (float64 input: float64) and added in
    float64; a group whose float32 squares overflow is summed again in float64. With one group per
    row (``B = 1``) the rows are one contiguous run, summed as one: short rows (GroupNorm NCHW on 7x7
    planes, whose per-channel weights keep the rows apart) would each pay a block loop."""
    B, R2 = x.shape[2], x.shape[3]
    runs = 1 if B == 1 else r1 - r0
    run = (r1 - r0) * R2 if B == 1 else R2
    n = x.shape[1] * B * R2
    slab = _run(x, g * n, n, x[0, 0, 0, 0])
    z = _zero(x[g, 0, b, 0])
    sh = z if rms else _shift(_load(x[g, 0, b, 0])) + z
    a = 0.0
    aa = 0.0
    for i in range(runs):
        start = ((r0 + i) * B + b) * R2
        seg = slab[start:start + run]
        for k0 in range(0, run, _BLOCK):
            blk = seg[k0:k0 + _BLOCK]
            ba = z
            baa = z
            for k in range(blk.shape[0]):
                d = _load(blk[k]) - sh
                ba += d
                baa += d * d
            a += np.float64(ba)
            aa += np.float64(baa)
    if not np.isfinite(aa):
        return _seg_sums_wide(x, g, r0, r1, b, rms)
    return a, aa


@njit(**_HELPER)
def _seg_sums_wide(x, g, r0, r1, b, rms):
    """Shifted sums of one group with every term in float64."""
    sh = _seg_shift(x, g, b, rms)
    a = 0.0
    aa = 0.0
    for r in range(r0, r1):
        seg = x[g, r, b]
        for k in range(seg.shape[0]):
            d = np.float64(_load(seg[k])) - sh
            a += d
            aa += d * d
    return a, aa


@njit(**_HELPER)
def _flat_tables(x, w, bias, mean, act):
    """Each row's weight and bias spread to one value per element, (2, P, R1 * R2), for
    ``_seg_apply_flat``; none (0 columns) where the rows are not short runs of one group with a
    parameter each, or without a costly activation (``_costly``): there the short loops cost less than
    filling the tables (GroupNorm 32x512x7x7 float32 forward 86 against 179 µs with the data cached,
    bfloat16 132 against 150 from memory; with SiLU in bfloat16 419 against 314). Filled once per call,
    long before the loops read them: read right after their short stores, wide loads stall on store
    forwarding (filled per group, the apply took twice as long)."""
    P, R1, B, R2 = w.shape[0], x.shape[1], x.shape[2], x.shape[3]
    flat = _costly(act) and B == 1 and R1 > 1 and R2 < _SHORT_RUN and w.shape[1] > 1 and w.shape[3] == 1
    tab = _aligned(2 * (P if flat else 0) * R1 * R2, mean.dtype).reshape((2, P if flat else 0, R1 * R2))
    for p in range(tab.shape[1]):
        for r in range(R1):
            wv = w[p, r, 0, 0]
            bv = bias[p, r, 0, 0]
            for k in range(r * R2, (r + 1) * R2):
                tab[0, p, k] = wv
            for k in range(r * R2, (r + 1) * R2):
                tab[1, p, k] = bv
    return tab


@njit(**_HELPER)
def _seg_apply(x, y, g, r0, r1, b0, b1, mean, rstd, w, bias, act, tab):
    p = _slab_param(g, w)
    k1n = w.shape[1]
    if tab.shape[1] > 0:
        _seg_apply_flat(x, y, g, r0, r1, p, mean, rstd, act, tab)
        return
    for r in range(r0, r1):
        k1 = r if k1n > 1 else 0
        for b in range(b0, b1):
            m = mean[g, b]
            rs = rstd[g, b]
            xs = x[g, r, b]
            ys = y[g, r, b]
            if w.shape[3] == 1:
                sc = rs * w[p, k1, b, 0]
                t = bias[p, k1, b, 0]
                for k in range(xs.shape[0]):
                    _store(ys, k, _act((_load(xs[k]) - m) * sc + t, act))
            else:
                ws = w[p, k1, b]
                bs = bias[p, k1, b]
                for k in range(xs.shape[0]):
                    _store(ys, k, _act((_load(xs[k]) - m) * rs * ws[k] + bs[k], act))


@njit(**_HELPER)
def _flat_run(x, other, g, r0, r1, p, tab):
    """Rows ``r0:r1`` of slab ``g`` (one group, ``B = 1``) of ``x`` and of ``other`` (same layout) as flat
    runs, with the rows' weight and bias per element from ``_flat_tables``."""
    R2 = x.shape[3]
    n = (r1 - r0) * R2
    start = (g * x.shape[1] + r0) * R2
    tag = x[0, 0, 0, 0]
    return _run(x, start, n, tag), _run(other, start, n, tag), tab[0, p, r0 * R2:r1 * R2], tab[1, p, r0 * R2:r1 * R2]


@njit(**_HELPER)
def _seg_apply_flat(x, y, g, r0, r1, p, mean, rstd, act, tab):
    """``_seg_apply`` of rows ``r0:r1`` of a group that is one contiguous run of short rows, each with
    its own weight and bias (GroupNorm NCHW on small planes), as one loop over the run with the
    parameters per element from ``_flat_tables``. Short rows each leave most of their elements to the
    vector loop's remainder (a 7x7 plane is 49 elements, one iteration of the vector loop takes 64
    float32 or 128 bfloat16), which runs far slower, most of all with an activation."""
    xs, ys, ws, bs = _flat_run(x, y, g, r0, r1, p, tab)
    m = mean[g, 0]
    rs = rstd[g, 0]
    for k in range(xs.shape[0]):
        _store(ys, k, _act((_load(xs[k]) - m) * rs * ws[k] + bs[k], act))


@njit(**_HELPER)
def _flat_dz(dy, x, g, r0, r1, p, mean, rstd, tab, dz, act):
    """The gradient at the activation's input for rows ``r0:r1`` of slab ``g`` into ``dz`` (a slab of
    the statistics dtype, rows at their own offsets), as one run (``_seg_apply_flat``): the backward's
    loops then take it as ``dy`` with no activation, instead of taking the activation's derivative
    (an exp or erfc) in short rows, once per pass where dx is bfloat16."""
    xs, ds, ws, bs = _flat_run(x, dy, g, r0, r1, p, tab)
    m = mean[g, 0]
    rs = rstd[g, 0]
    out = dz[r0 * x.shape[3]:r1 * x.shape[3]]
    for k in range(xs.shape[0]):
        out[k] = _act_grad(_load(ds[k]), (_load(xs[k]) - m) * rs * ws[k] + bs[k], act)


@njit(**_HELPER)
def _dot_sums(ds, xs, m, rs, wv, bv, act, kept):
    """sum(dz * xhat), sum(dz) of one segment, ``dz`` the gradient at the affine output ``xhat * wv + bv``
    (kept in ``kept``, see ``_keep``): float32 within blocks of ``_BLOCK``, float64 across."""
    a_dw = 0.0
    a_db = 0.0
    for k0 in range(0, xs.shape[0], _BLOCK):
        bx = xs[k0:k0 + _BLOCK]
        bd = ds[k0:k0 + _BLOCK]
        bk = kept[k0:k0 + _BLOCK]
        p_dw = _zero(m)
        p_db = p_dw
        for k in range(bx.shape[0]):
            xh = (_load(bx[k]) - m) * rs
            d = _act_grad(_load(bd[k]), xh * wv + bv, act)
            _keep(bk, k, d, act)
            p_dw += d * xh
            p_db += d
        a_dw += np.float64(p_dw)
        a_db += np.float64(p_db)
    return a_dw, a_db


@njit(**_HELPER)
def _seg_grad_sums(dy, gd, x, dx, keep, g, r0, r1, b0, b1, mean, rstd, w, bias, act, sg, sgx, dwt, dbt):
    """Add sum(dy*w), sum(dy*w*xhat) per group to ``sg``, ``sgx`` (float64) and the dweight/dbias
    sums to the lane's ``dwt``, ``dbt`` (statistics dtype, as the reference sums them; added to the
    float64 lanes after each unit). The activation's gradient is kept in ``dx`` (``_keep``), or in
    ``keep`` where that is not empty (no dx wanted: ``_sink``). ``dy`` of slab ``g`` is ``dy[gd]``
    (``_flat_dz``'s one-slab buffer, or ``dy`` itself with ``gd = g``)."""
    p = _slab_param(g, w)
    k1n = w.shape[1]
    for r in range(r0, r1):
        k1 = r if k1n > 1 else 0
        for b in range(b0, b1):
            m = mean[g, b]
            rs = rstd[g, b]
            xs = x[g, r, b]
            ds = dy[gd, r, b]
            kept = dx[g, r, b] if keep.shape[0] == 0 else keep
            if w.shape[3] == 1:
                a_dw, a_db = _dot_sums(ds, xs, m, rs, w[p, k1, b, 0], bias[p, k1, b, 0], act, kept)
                wv = np.float64(w[p, k1, b, 0])
                sg[b - b0] += wv * a_db
                sgx[b - b0] += wv * a_dw
                dwt[p, k1, b, 0] += a_dw
                dbt[p, k1, b, 0] += a_db
            else:
                ws = w[p, k1, b]
                bs = bias[p, k1, b]
                dws = dwt[p, k1, b]
                dbs = dbt[p, k1, b]
                a_g = _zero(dws[0])  # not dws[0] - dws[0]: NaN once a non-finite row reached dws
                a_gx = a_g
                for k in range(xs.shape[0]):
                    xh = (_load(xs[k]) - m) * rs
                    d = _act_grad(_load(ds[k]), xh * ws[k] + bs[k], act)
                    _keep(kept, k, d, act)
                    gg = d * ws[k]
                    a_g += gg
                    a_gx += gg * xh
                    dws[k] += d * xh
                    dbs[k] += d
                sg[b - b0] += a_g
                sgx[b - b0] += a_gx


@njit(**_HELPER)
def _flush_params(part, total, g0, g1, b0, b1):
    """Add the parameter partials of slabs ``g0:g1``, groups ``b0:b1`` to ``total`` (float64) and
    clear them: only what a unit touched, so small units stay cheap."""
    P, K1, B, K2 = part.shape
    n = (b1 - b0) * K2
    for g in range(g0, min(g1, g0 + P)):
        p = g % P
        for k1 in range(K1):
            start = ((p * K1 + k1) * B + b0) * K2
            src = _run(part, start, n, part[0, 0, 0, 0])
            dst = _run(total, start, n, total[0, 0, 0, 0])
            for k in range(n):
                dst[k] += src[k]
                src[k] = 0.0


@njit(**_HELPER)
def _seg_dx(dy, gd, x, dx, g, r0, r1, b0, b1, mean, rstd, w, bias, act, c1, c2):
    """dx = rstd * (dz*w - c1 - xhat*c2) with c1, c2 per group; ``dz`` as the first pass kept it in ``dx``
    (``_kept``); ``dy`` of slab ``g`` is ``dy[gd]`` (``_seg_grad_sums``). Fixed statistics (c1 = c2 = 0,
    evaluation) leave out the x terms: dx does not depend on x there, and a NaN in x must not reach it
    (torch gives rstd * w * dy). Where rstd**2 * c2 overflows float32 (rstd above 1.8e19: a tiny eps),
    ``_seg_dx_wide``, decided per slab: a branch in the loops over rows slowed GroupNorm 7x7 by 18%."""
    mode = _dx_mode(g, b0, b1, rstd, c1, c2, act)
    if mode == _DX_WIDE:
        _seg_dx_wide(dy, gd, x, dx, g, r0, r1, b0, b1, mean, rstd, w, bias, act, c1, c2)
        return
    fixed = mode == _DX_FIXED
    p = _slab_param(g, w)
    k1n = w.shape[1]
    for r in range(r0, r1):
        k1 = r if k1n > 1 else 0
        for b in range(b0, b1):
            m = mean[g, b]
            rs = rstd[g, b]
            bc = rs * rs * c2[g, b]
            cc = rs * c1[g, b]
            xs = x[g, r, b]
            ds = dy[gd, r, b]
            out = dx[g, r, b]
            if w.shape[3] == 1:
                a = rs * w[p, k1, b, 0]
                t = bias[p, k1, b, 0]
                if fixed:
                    for k in range(xs.shape[0]):
                        _store(out, k, a * _load(ds[k]))
                else:
                    for k in range(xs.shape[0]):
                        xc = _load(xs[k]) - m
                        _store(out, k, a * _kept(out, k, _load(ds[k]), xc * a + t, act) - bc * xc - cc)
            else:
                ws = w[p, k1, b]
                bs = bias[p, k1, b]
                if fixed:
                    for k in range(xs.shape[0]):
                        _store(out, k, rs * ws[k] * _load(ds[k]))
                else:
                    for k in range(xs.shape[0]):
                        xc = _load(xs[k]) - m
                        a = rs * ws[k]
                        _store(out, k, a * _kept(out, k, _load(ds[k]), xc * a + bs[k], act) - bc * xc - cc)


_DX_PLAIN, _DX_FIXED, _DX_WIDE = 0, 1, 2


@njit(**_HELPER)
def _dx_mode(g, b0, b1, rstd, c1, c2, act):
    """How ``_seg_dx`` (``_col_dx``) runs groups ``b0:b1`` of slab ``g``: ``_DX_FIXED`` where c1 = c2 = 0 for all
    (fixed statistics) and there is no activation, ``_DX_WIDE`` where rstd**2 * c2 overflows the
    statistics dtype for one, else ``_DX_PLAIN``."""
    fixed = _linear(act)
    for b in range(b0, b1):
        rs = rstd[g, b]
        if not np.isfinite(rs * rs * c2[g, b]):
            return _DX_WIDE
        fixed = fixed and c1[g, b] == 0 and c2[g, b] == 0
    return _DX_FIXED if fixed else _DX_PLAIN


@njit(**_HELPER)
def _seg_dx_wide(dy, gd, x, dx, g, r0, r1, b0, b1, mean, rstd, w, bias, act, c1, c2):
    """``_seg_dx`` through ``_dx_wide``."""
    p = _slab_param(g, w)
    for r in range(r0, r1):
        k1 = r if w.shape[1] > 1 else 0
        for b in range(b0, b1):
            _dx_wide(x[g, r, b], dy[gd, r, b], dx[g, r, b], mean[g, b], rstd[g, b], c1[g, b], c2[g, b], w[p, k1, b],
                     bias[p, k1, b], act)  # fmt: skip


@njit(**_HELPER)
def _dx_wide(xs, ds, out, m, rs, u, v, ws, bs, act):
    """``_seg_dx`` of one segment with rstd outside the bracket, ``rstd * (dz*w - u - v*xhat)``, in float64:
    rstd**2 overflows float32 (and with fastmath a product of two rstd factors may be reassociated back).
    ``ws``, ``bs``: one parameter per element, or one for the segment."""
    r = np.float64(rs)
    last = ws.shape[0] - 1
    for k in range(xs.shape[0]):
        wv = np.float64(ws[min(k, last)])
        xh = (np.float64(_load(xs[k])) - m) * r
        dz = _kept(out, k, _load(ds[k]), xh * wv + bs[min(k, last)], act)
        _store(out, k, r * (wv * np.float64(dz) - u - v * xh))


# ---- col: rows of W = B*R2 columns, accumulated per column -----------------------------------


@njit(**_HELPER)
def _col_shift(x, g, j0, j1, r2, rms):
    sh = _aligned_zeros(j1 - j0, np.float64)
    if not rms:
        for b in range(j0 // r2, j1 // r2):
            v = _shift(_load(x[g, 0, b * r2]))
            for i in range(r2):
                sh[b * r2 + i - j0] = v
    return sh


@njit(**_HELPER)
def _col_reps(x, j0, j1):
    """Rows the column sums, gradient sums and dx loops sweep at once: where columns ``j0:j1`` are
    whole rows of fewer than ``_COL_TILE`` elements, enough rows to make one contiguous run of about
    that length, else 1. A sweep of one short row pays the loop's set-up for a few vectors of work:
    with rows of 32 columns from a flushed cache, GroupNorm 32x32x64x64 channels-last backward took
    0.77x the time, InstanceNorm 16x32x96x96 0.86x, forwards 0.92-0.95x (``_col_apply`` keeps its
    rows)."""
    n = j1 - j0
    return max(1, _COL_TILE // n) if n == x.shape[2] else 1


@njit(**_HELPER)
def _tile(v, reps):
    """``reps`` copies of the per-column values ``v`` end to end: the per-column operand of a sweep
    of ``reps`` whole rows."""
    n = v.shape[0]
    out = _aligned(n * reps, v.dtype)
    for i in range(reps):
        out[i * n:(i + 1) * n] = v
    return out


@njit(**_HELPER)
def _rows(x, g, r, rows, j0, j1):
    """Columns ``j0:j1`` of rows ``r:r + rows`` of slab ``g`` as one flat run (``rows > 1`` only with
    whole rows, which lie end to end)."""
    W = x.shape[2]
    return _run(x, (g * x.shape[1] + r) * W + j0, (rows - 1) * W + j1 - j0, x[0, 0, 0])


@njit(**_HELPER)
def _col_pairs(x, j0, j1):
    """Whether the column sums and gradient sums take two whole rows a step: rows of ``_COL_TILE // 4``
    columns or more (shorter ones go end to end, ``_col_reps``) whose two rows lie within 512 bytes.
    Interleaved rows farther apart stream 1.5-2.5x slower from memory on a 2-core EPYC VM (two rows of
    192 float32 columns or more, four of 64); within 512 bytes as fast as one run."""
    n = j1 - j0
    return n == x.shape[2] and n >= _COL_TILE // 4 and 2 * n * x.itemsize <= 512


@njit(**_HELPER)
def _col_sums(x, g, r0, r1, j0, j1, sh, s, ss):
    """Shifted per-column sums of rows ``r0:r1``, columns ``j0:j1`` into ``s``, ``ss``.

    Two rows a step where ``_col_pairs`` (each partial loaded and stored once per two rows: rows of
    32-64 float32 columns 1.4-1.7x faster with the data cached, 7-17% from memory), else one sweep of
    ``_col_reps`` rows at a time (a single sequential stream: sweeps over rows apart stall on memory
    when the data is not in cache), into per-column partials in float32 (float64 input: float64),
    added into the float64 sums every ``_COL_BLOCK`` rows or so; if the float32 squares overflow, the
    sums are taken again in float64."""
    pairs = _col_pairs(x, j0, j1)
    reps = 1 if pairs else _col_reps(x, j0, j1)
    n = (j1 - j0) * reps
    shn = _acc_zeros(x[g, 0, 0], n)
    bs = _acc_zeros(x[g, 0, 0], n)
    bss = _acc_zeros(x[g, 0, 0], n)
    for k in range(n):
        shn[k] = sh[k % (j1 - j0)]
    s[:] = 0.0
    ss[:] = 0.0
    since = 0
    r = r0
    while r < r1:
        if pairs and r + 1 < r1:
            x0 = _rows(x, g, r, 1, j0, j1)
            x1 = _rows(x, g, r + 1, 1, j0, j1)
            for k in range(n):
                d0 = _load(x0[k]) - shn[k]
                d1 = _load(x1[k]) - shn[k]
                bs[k] += d0 + d1
                bss[k] += d0 * d0 + d1 * d1
            rows = 2
        else:
            rows = min(reps, r1 - r)
            xs = _rows(x, g, r, rows, j0, j1)
            for k in range(xs.shape[0]):
                d = _load(xs[k]) - shn[k]
                bs[k] += d
                bss[k] += d * d
        r += rows
        since += rows
        if since >= _COL_BLOCK or r == r1:
            _flush(bs, s)
            _flush(bss, ss)
            since = 0
    if not np.isfinite(ss.sum()):
        s[:] = 0.0
        ss[:] = 0.0
        _col_sums_wide(x, g, r0, r1, j0, j1, sh, s, ss)


@njit(**_HELPER)
def _flush(part, total):
    """Add the short partial sums ``part`` (``_col_reps`` rows of ``total``'s columns) to ``total``
    and clear them."""
    n = total.shape[0]
    for i in range(part.shape[0] // n):
        for k in range(n):
            total[k] += part[i * n + k]
            part[i * n + k] = 0.0


@njit(**_HELPER)
def _col_sums_wide(x, g, r0, r1, j0, j1, sh, s, ss):
    """Add per-column sums of rows ``r0:r1`` with every term in float64."""
    for r in range(r0, r1):
        xs = x[g, r, j0:j1]
        for k in range(xs.shape[0]):
            d = np.float64(_load(xs[k])) - sh[k]
            s[k] += d
            ss[k] += d * d


@njit(**_HELPER)
def _col_expand(v, g, j0, j1, r2):
    """Per-group values ``v[g]`` of columns ``j0:j1`` (whole groups), one per column. The column
    helpers loop over groups and their ``r2`` columns: with an integer division per column a unit's
    setup took twice as long (4.1 against 2.2 µs for 256 columns)."""
    out = _aligned(j1 - j0, v.dtype)
    for b in range(j0 // r2, j1 // r2):
        for i in range(r2):
            out[b * r2 + i - j0] = v[g, b]
    return out


@njit(**_HELPER)
def _col_param(w, p, j0, j1, r2):
    """Columns ``j0:j1`` of parameter row ``p`` (P, 1, B, K2), K2 in {1, r2}."""
    out = _aligned(j1 - j0, w.dtype)
    last = w.shape[3] - 1
    for b in range(j0 // r2, j1 // r2):
        for i in range(r2):
            out[b * r2 + i - j0] = w[p, 0, b, min(i, last)]
    return out


@njit(**_HELPER)
def _col_apply(x, y, g, r0, r1, j0, j1, r2, mean, rstd, w, bias, act):
    """Row by row, not in ``_col_reps`` sweeps: streaming from memory (a BatchNorm's row chunks) the
    sweeps ran 10-30% slower (BatchNorm 32x64x56x56 channels-last normalize, a bare apply loop over
    rows of 32 or 64 columns up to 1.8x), though faster with the data cached."""
    p = _slab_param(g, w)
    mc = _col_expand(mean, g, j0, j1, r2)
    sc = _col_expand(rstd, g, j0, j1, r2)
    wc = _col_param(w, p, j0, j1, r2)
    for k in range(j1 - j0):
        sc[k] *= wc[k]
    t = _col_param(bias, p, j0, j1, r2)
    for r in range(r0, r1):
        xs = x[g, r, j0:j1]
        ys = y[g, r, j0:j1]
        for k in range(xs.shape[0]):
            _store(ys, k, _act((_load(xs[k]) - mc[k]) * sc[k] + t[k], act))


@njit(**_HELPER)
def _col_grad_sums(dy, x, dx, keep, g, r0, r1, j0, j1, r2, mean, rstd, wc, tc, act, dws, dbs):
    """Add per-column sum(dz*xhat), sum(dz) of rows ``r0:r1`` to ``dws``, ``dbs``: two rows a step
    where ``_col_pairs``, else sweeps of ``_col_reps`` rows, as in ``_col_sums``, into partials in the
    statistics dtype, added to the float64 sums every ``_COL_BLOCK`` rows or so. ``wc``, ``tc``: weight
    and bias of columns ``j0:j1`` (``_col_param``). ``dx``, ``keep`` as in ``_seg_grad_sums`` (``keep``
    holds a sweep, or two rows). With a costly activation the exp per element outweighs the partials'
    loads and stores, and the sweeps stay (SiLU, rows of 32-64 columns: 0.97-1.10x with pairs)."""
    pairs = _col_pairs(x, j0, j1) and not _costly(act)
    reps = 1 if pairs else _col_reps(x, j0, j1)
    n = (j1 - j0) * reps  # one row's columns where ``pairs``
    mc = _tile(_col_expand(mean, g, j0, j1, r2), reps)
    rc = _tile(_col_expand(rstd, g, j0, j1, r2), reps)
    wt = _tile(wc, reps)
    tt = _tile(tc, reps)
    pw = _acc_zeros(mean[g, 0], n)
    pb = _acc_zeros(mean[g, 0], n)
    since = 0
    r = r0
    while r < r1:
        if pairs and r + 1 < r1:
            x0 = _rows(x, g, r, 1, j0, j1)
            x1 = _rows(x, g, r + 1, 1, j0, j1)
            d0 = _rows(dy, g, r, 1, j0, j1)
            d1 = _rows(dy, g, r + 1, 1, j0, j1)
            k0 = _rows(dx, g, r, 1, j0, j1) if keep.shape[0] == 0 else keep[:n]
            k1 = _rows(dx, g, r + 1, 1, j0, j1) if keep.shape[0] == 0 else keep[n:2 * n]
            for k in range(n):
                xh0 = (_load(x0[k]) - mc[k]) * rc[k]
                xh1 = (_load(x1[k]) - mc[k]) * rc[k]
                e0 = _act_grad(_load(d0[k]), xh0 * wt[k] + tt[k], act)
                e1 = _act_grad(_load(d1[k]), xh1 * wt[k] + tt[k], act)
                _keep(k0, k, e0, act)
                _keep(k1, k, e1, act)
                pw[k] += e0 * xh0 + e1 * xh1
                pb[k] += e0 + e1
            rows = 2
        else:
            rows = min(reps, r1 - r)
            xs = _rows(x, g, r, rows, j0, j1)
            ds = _rows(dy, g, r, rows, j0, j1)
            kept = _rows(dx, g, r, rows, j0, j1) if keep.shape[0] == 0 else keep
            for k in range(xs.shape[0]):
                xh = (_load(xs[k]) - mc[k]) * rc[k]
                d = _act_grad(_load(ds[k]), xh * wt[k] + tt[k], act)
                _keep(kept, k, d, act)
                pw[k] += d * xh
                pb[k] += d
        r += rows
        since += rows
        if since >= _COL_BLOCK or r == r1:
            _flush(pw, dws)
            _flush(pb, dbs)
            since = 0


@njit(**_HELPER)
def _col_dx(dy, x, dx, g, r0, r1, j0, j1, r2, mean, rstd, w, bias, act, c1, c2):
    """``_seg_dx`` for the column loops, per column; the unit's loop chosen by ``_dx_mode``."""
    p = _slab_param(g, w)
    mode = _dx_mode(g, j0 // r2, j1 // r2, rstd, c1, c2, act)
    if mode == _DX_WIDE:
        _col_dx_wide(dy, x, dx, g, r0, r1, j0, j1, r2, mean, rstd, w, bias, act, c1, c2, p)
        return
    fixed = mode == _DX_FIXED
    reps = _col_reps(x, j0, j1)
    a = _col_expand(rstd, g, j0, j1, r2)
    bc = _col_expand(c2, g, j0, j1, r2)
    cc = _col_expand(c1, g, j0, j1, r2)
    wc = _col_param(w, p, j0, j1, r2)
    for k in range(j1 - j0):
        bc[k] *= a[k] * a[k]
        cc[k] *= a[k]
        a[k] *= wc[k]
    mc = _tile(_col_expand(mean, g, j0, j1, r2), reps)
    a = _tile(a, reps)
    bc = _tile(bc, reps)
    cc = _tile(cc, reps)
    tc = _tile(_col_param(bias, p, j0, j1, r2), reps)
    for r in range(r0, r1, reps):
        rows = min(reps, r1 - r)
        ds = _rows(dy, g, r, rows, j0, j1)
        out = _rows(dx, g, r, rows, j0, j1)
        if fixed:
            for k in range(ds.shape[0]):
                _store(out, k, a[k] * _load(ds[k]))
            continue
        xs = _rows(x, g, r, rows, j0, j1)
        for k in range(xs.shape[0]):
            xc = _load(xs[k]) - mc[k]
            _store(out, k, a[k] * _kept(out, k, _load(ds[k]), xc * a[k] + tc[k], act) - bc[k] * xc - cc[k])


@njit(**_HELPER)
def _col_dx_wide(dy, x, dx, g, r0, r1, j0, j1, r2, mean, rstd, w, bias, act, c1, c2, p):
    """``_col_dx`` where rstd**2 * c2 overflows float32: ``_dx_wide`` per column, across the rows."""
    last = w.shape[3] - 1
    for j in range(j0, j1):
        b = j // r2
        i = min(j % r2, last)
        _dx_wide(x[g, r0:r1, j], dy[g, r0:r1, j], dx[g, r0:r1, j], mean[g, b], rstd[g, b], c1[g, b], c2[g, b],
                 w[p, 0, b, i:i + 1], bias[p, 0, b, i:i + 1], act)  # fmt: skip


@njit(**_HELPER)
def _fold(v, r2):
    """Sum consecutive runs of ``r2`` columns: per-column sums -> per-group sums."""
    out = np.zeros(v.shape[0] // r2)
    for b in range(out.shape[0]):
        for i in range(r2):
            out[b] += v[b * r2 + i]
    return out


@njit(**_HELPER)
def _sink(dx, n, want_dx):
    """Where the first backward pass keeps the activation's gradient (``_keep``): an empty array when
    it goes to ``dx`` itself, else (no dx wanted) ``n`` elements of dx's type to drop it in."""
    return np.empty(0 if want_dx else n, dx.dtype)


@njit(**_DRIVER)
def _zeros(shape, like):
    """Zeros of shape ``shape`` in the type of ``_zero(like)``, compiled apart: ``np.zeros`` written
    in a parallel driver becomes a parallel region of its own."""
    return _acc_zeros(like, shape)


# ---- drivers ---------------------------------------------------------------------------------
# ``plan`` = (gchunk, nrc, rchunk, nbc, bchunk): units of ``gchunk`` slabs x ``rchunk`` rows x
# ``bchunk`` groups. With ``nrc == 1`` a unit owns whole groups and is fused.


def forward_seg(xp, yp, wp, bp, mp, rp, vp, dims, val, acc, eps, rms, nlanes, plan):
    """Statistics of ``x`` (G, R1, B, R2) into mean/rstd/var (G, B) and the output into ``y``; unfused,
    each of ``nlanes`` lanes (one per thread) sums its units, then writes them in reverse."""
    G, R1, B, R2 = dims[:4]
    x, y = _seg_at(xp, dims, val), _seg_at(yp, dims, val)
    w, bias = _params_at(wp, bp, dims, acc)
    mean, rstd, var = _stat_at(mp, dims, acc), _stat_at(rp, dims, acc), _stat_at(vp, dims, acc)
    tab = _flat_tables(x, w, bias, mean, _ACT)
    inv_n = 1.0 / (R1 * R2)
    nrc = plan[1]
    units = _units(plan, G)
    if nrc == 1:
        for u in prange(units):
            g0, g1, _, _, _, b0, b1 = _unit(u, plan, G, R1, B)
            for g in range(g0, g1):
                for b in range(b0, b1):
                    a, aa = _seg_group_sums(x, g, 0, R1, b, rms)
                    mean[g, b], var[g, b], rstd[g, b] = _seg_stats(x, g, b, a, aa, inv_n, eps, rms)
                _seg_apply(x, y, g, 0, R1, b0, b1, mean, rstd, w, bias, _ACT, tab)
        return
    ps = _zeros((G, nrc, B), 0.0)
    pss = _zeros((G, nrc, B), 0.0)
    for lane in prange(nlanes):
        lo, hi = _lane(lane, nlanes, units)
        for u in range(lo, hi):
            g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
            for g in range(g0, g1):
                for b in range(b0, b1):
                    ps[g, rc, b], pss[g, rc, b] = _seg_group_sums(x, g, r0, r1, b, rms)
    for gb in range(G * B):
        g = gb // B
        b = gb % B
        s = _chunk_total(ps, g, b)
        ss = _chunk_total(pss, g, b)
        mean[g, b], var[g, b], rstd[g, b] = _seg_stats(x, g, b, s, ss, inv_n, eps, rms)
    for lane in prange(nlanes):
        lo, hi = _lane(lane, nlanes, units)
        for u in range(hi - 1, lo - 1, -1):
            g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
            for g in range(g0, g1):
                _seg_apply(x, y, g, r0, r1, b0, b1, mean, rstd, w, bias, _ACT, tab)


def forward_col(xp, yp, wp, bp, mp, rp, vp, dims, val, acc, eps, rms, nlanes, plan):
    """``forward_seg`` for ``x`` (G, R1, W) with groups of ``r2`` adjacent columns."""
    G, R1, B, r2 = dims[:4]
    W = B * r2
    x, y = _col_at(xp, dims, val), _col_at(yp, dims, val)
    w, bias = _params_at(wp, bp, dims, acc)
    mean, rstd, var = _stat_at(mp, dims, acc), _stat_at(rp, dims, acc), _stat_at(vp, dims, acc)
    inv_n = 1.0 / (R1 * r2)
    nrc = plan[1]
    units = _units(plan, G)
    if nrc == 1:
        for u in prange(units):
            g0, g1, _, _, _, b0, b1 = _unit(u, plan, G, R1, B)
            j0 = b0 * r2
            j1 = b1 * r2
            for g in range(g0, g1):
                sh = _col_shift(x, g, j0, j1, r2, rms)
                s = _aligned_zeros(j1 - j0, np.float64)
                ss = _aligned_zeros(j1 - j0, np.float64)
                _col_sums(x, g, 0, R1, j0, j1, sh, s, ss)
                fs = _fold(s, r2)
                fss = _fold(ss, r2)
                for b in range(b0, b1):
                    mean[g, b], var[g, b], rstd[g, b] = _col_stats(
                        x, g, b, r2, fs[b - b0], fss[b - b0], inv_n, sh[(b - b0) * r2], eps, rms
                    )
                _col_apply(x, y, g, 0, R1, j0, j1, r2, mean, rstd, w, bias, _ACT)
        return
    ps = _zeros((G, nrc, W), 0.0)
    pss = _zeros((G, nrc, W), 0.0)
    for lane in prange(nlanes):
        lo, hi = _lane(lane, nlanes, units)
        for u in range(lo, hi):
            g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
            j0 = b0 * r2
            j1 = b1 * r2
            for g in range(g0, g1):
                sh = _col_shift(x, g, j0, j1, r2, rms)
                s = _aligned_zeros(j1 - j0, np.float64)
                ss = _aligned_zeros(j1 - j0, np.float64)
                _col_sums(x, g, r0, r1, j0, j1, sh, s, ss)
                ps[g, rc, j0:j1] = s
                pss[g, rc, j0:j1] = ss
    for gb in range(G * B):
        g = gb // B
        b = gb % B
        s = 0.0
        ss = 0.0
        for rc in range(nrc):
            for j in range(b * r2, (b + 1) * r2):
                s += ps[g, rc, j]
                ss += pss[g, rc, j]
        sh = 0.0 if rms else np.float64(_shift(_load(x[g, 0, b * r2])))
        mean[g, b], var[g, b], rstd[g, b] = _col_stats(x, g, b, r2, s, ss, inv_n, sh, eps, rms)
    for lane in prange(nlanes):
        lo, hi = _lane(lane, nlanes, units)
        for u in range(hi - 1, lo - 1, -1):
            g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
            for g in range(g0, g1):
                _col_apply(x, y, g, r0, r1, b0 * r2, b1 * r2, r2, mean, rstd, w, bias, _ACT)


def apply_seg(xp, yp, wp, bp, mp, rp, dims, val, acc, eps, from_var, plan):
    """Normalize with given statistics (no reductions): one pass. With ``from_var`` the second
    statistic is the variance, and rstd is taken here."""
    G, R1, B = dims[:3]
    x, y = _seg_at(xp, dims, val), _seg_at(yp, dims, val)
    w, bias = _params_at(wp, bp, dims, acc)
    mean, rstd = _stat_at(mp, dims, acc), _rstd(_stat_at(rp, dims, acc), eps, from_var)
    tab = _flat_tables(x, w, bias, mean, _ACT)
    for u in prange(_units(plan, G)):
        g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
        for g in range(g0, g1):
            _seg_apply(x, y, g, r0, r1, b0, b1, mean, rstd, w, bias, _ACT, tab)


def apply_col(xp, yp, wp, bp, mp, rp, dims, val, acc, eps, from_var, plan):
    G, R1, B, r2 = dims[:4]
    x, y = _col_at(xp, dims, val), _col_at(yp, dims, val)
    w, bias = _params_at(wp, bp, dims, acc)
    mean, rstd = _stat_at(mp, dims, acc), _rstd(_stat_at(rp, dims, acc), eps, from_var)
    for u in prange(_units(plan, G)):
        g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
        for g in range(g0, g1):
            _col_apply(x, y, g, r0, r1, b0 * r2, b1 * r2, r2, mean, rstd, w, bias, _ACT)


def backward_seg(dyp, xp, dxp, mp, rp, wp, bp, dwp, dbp, dims, val, acc, rms, batch_stats, want_dx, nlanes, plan):
    """Gradients on the seg view: dx, and dweight/dbias (P, K1, B, K2).

    Pass 1 computes both group reductions and the parameter partials (``dwl``/``dbl``, per lane); pass
    2 computes dx, from cache when a unit owns whole groups: each slab's right after its sums (from L1),
    or, on one lane with a parameter per element (LayerNorm rows), after the sums of the whole unit
    (``whole``; see docs/architecture.md).
    """
    G, R1, B, R2, P, K1, K2 = dims
    dy, x = _seg_at(dyp, dims, val), _seg_at(xp, dims, val)
    dx = _seg_at(dxp, dims, val)[: G if want_dx else 0]  # without dx: an empty view of address 0
    mean, rstd = _stat_at(mp, dims, acc), _stat_at(rp, dims, acc)
    w, bias = _params_at(wp, bp, dims, acc)
    lanes = _zeros((2, nlanes, P, K1, B, K2), 0.0)
    dwl, dbl = lanes[0], lanes[1]
    inv_n = 1.0 / (R1 * R2)
    nrc = plan[1]
    units = _units(plan, G)
    c1 = _zeros(mean.shape, mean[0, 0])
    c2 = _zeros(mean.shape, mean[0, 0])
    fused = nrc == 1 and batch_stats and want_dx
    ps = _zeros((G, nrc, B), 0.0)
    pss = _zeros((G, nrc, B), 0.0)
    tab = _flat_tables(x, w, bias, mean, _ACT)
    flat = tab.shape[1] > 0
    whole = fused and not flat and nlanes == 1 and K2 > 1
    for lane in prange(nlanes):
        dwt = _aligned_zeros(dwl[0].size, mean.dtype).reshape(dwl.shape[1:])
        dbt = _aligned_zeros(dwl[0].size, mean.dtype).reshape(dwl.shape[1:])
        keep = _sink(dx, R2, want_dx)
        dzb = _aligned(R1 * R2 if flat else 0, mean.dtype)
        dz = _at(dzb.ctypes.data, (1, R1, 1, R2), mean[0, 0])
        lo, hi = _lane(lane, nlanes, units)
        for u in range(lo, hi):
            g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
            for g in range(g0, g1):
                if flat:
                    _flat_dz(dy, x, g, r0, r1, _slab_param(g, w), mean, rstd, tab, dzb, _ACT)
                    _seg_grad_sums(
                        dz, 0, x, dx, keep, g, r0, r1, b0, b1, mean, rstd, w, bias, None, ps[g, rc, b0:b1],
                        pss[g, rc, b0:b1], dwt, dbt,
                    )
                else:
                    _seg_grad_sums(
                        dy, g, x, dx, keep, g, r0, r1, b0, b1, mean, rstd, w, bias, _ACT, ps[g, rc, b0:b1],
                        pss[g, rc, b0:b1], dwt, dbt,
                    )
                if fused:
                    for b in range(b0, b1):
                        c1[g, b] = 0.0 if rms else ps[g, 0, b] * inv_n
                        c2[g, b] = pss[g, 0, b] * inv_n
                    if flat:
                        _seg_dx(dz, 0, x, dx, g, 0, R1, b0, b1, mean, rstd, w, bias, None, c1, c2)
                    elif g == g1 - 1 or not whole:
                        for h in range(g0 if whole else g, g + 1):  # the slabs whose sums wait for their dx
                            _seg_dx(dy, h, x, dx, h, 0, R1, b0, b1, mean, rstd, w, bias, _ACT, c1, c2)
            _flush_params(dwt, dwl[lane], g0, g1, b0, b1)
            _flush_params(dbt, dbl[lane], g0, g1, b0, b1)
    _lane_sum(lanes.reshape(2, nlanes, -1), _params_at(dwp, dbp, dims, acc))
    if fused or not want_dx:
        return
    if batch_stats:
        for gb in range(G * B):
            g = gb // B
            b = gb % B
            c1[g, b] = 0.0 if rms else _chunk_total(ps, g, b) * inv_n
            c2[g, b] = _chunk_total(pss, g, b) * inv_n
    for lane in prange(nlanes):
        dzb = _aligned(R1 * R2 if flat else 0, mean.dtype)
        dz = _at(dzb.ctypes.data, (1, R1, 1, R2), mean[0, 0])
        lo, hi = _lane(lane, nlanes, units)
        for u in range(hi - 1, lo - 1, -1):
            g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
            for g in range(g0, g1):
                if flat:
                    _flat_dz(dy, x, g, r0, r1, _slab_param(g, w), mean, rstd, tab, dzb, _ACT)
                    _seg_dx(dz, 0, x, dx, g, r0, r1, b0, b1, mean, rstd, w, bias, None, c1, c2)
                else:
                    _seg_dx(dy, g, x, dx, g, r0, r1, b0, b1, mean, rstd, w, bias, _ACT, c1, c2)


def backward_col(dyp, xp, dxp, mp, rp, wp, bp, dwp, dbp, dims, val, acc, rms, batch_stats, want_dx, nlanes, plan):
    """``backward_seg`` for the col view; ``dwl``/``dbl`` are (lanes, P, W)."""
    G, R1, B, r2, P = dims[:5]
    W = B * r2
    dy, x = _col_at(dyp, dims, val), _col_at(xp, dims, val)
    dx = _col_at(dxp, dims, val)[: G if want_dx else 0]  # without dx: an empty view of address 0
    mean, rstd = _stat_at(mp, dims, acc), _stat_at(rp, dims, acc)
    w, bias = _params_at(wp, bp, dims, acc)
    lanes = _zeros((2, nlanes, P, W), 0.0)
    dwl, dbl = lanes[0], lanes[1]
    inv_n = 1.0 / (R1 * r2)
    nrc = plan[1]
    units = _units(plan, G)
    c1 = _zeros(mean.shape, mean[0, 0])
    c2 = _zeros(mean.shape, mean[0, 0])
    fused = nrc == 1 and batch_stats and want_dx
    ps = _zeros((G, nrc, B), 0.0)
    pss = _zeros((G, nrc, B), 0.0)
    for lane in prange(nlanes):
        keep = _sink(dx, W * max(2, _col_reps(x, 0, W)), want_dx)
        lo, hi = _lane(lane, nlanes, units)
        for u in range(lo, hi):
            g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
            j0 = b0 * r2
            j1 = b1 * r2
            for g in range(g0, g1):
                p = _slab_param(g, w)
                dws = _aligned_zeros(j1 - j0, np.float64)
                dbs = _aligned_zeros(j1 - j0, np.float64)
                wc = _col_param(w, p, j0, j1, r2)
                _col_grad_sums(
                    dy, x, dx, keep, g, r0, r1, j0, j1, r2, mean, rstd, wc,
                    _col_param(bias, p, j0, j1, r2), _ACT, dws, dbs,
                )
                for b in range(b0, b1):
                    for j in range(b * r2, (b + 1) * r2):
                        wv = np.float64(wc[j - j0])
                        ps[g, rc, b] += wv * dbs[j - j0]
                        pss[g, rc, b] += wv * dws[j - j0]
                        dwl[lane, p, j] += dws[j - j0]
                        dbl[lane, p, j] += dbs[j - j0]
                if fused:
                    for b in range(b0, b1):
                        c1[g, b] = 0.0 if rms else ps[g, 0, b] * inv_n
                        c2[g, b] = pss[g, 0, b] * inv_n
                    _col_dx(dy, x, dx, g, 0, R1, j0, j1, r2, mean, rstd, w, bias, _ACT, c1, c2)
    _lane_sum(lanes.reshape(2, nlanes, -1), _params_at(dwp, dbp, dims, acc))
    if fused or not want_dx:
        return
    if batch_stats:
        for gb in range(G * B):
            g = gb // B
            b = gb % B
            c1[g, b] = 0.0 if rms else _chunk_total(ps, g, b) * inv_n
            c2[g, b] = _chunk_total(pss, g, b) * inv_n
    for lane in prange(nlanes):
        lo, hi = _lane(lane, nlanes, units)
        for u in range(hi - 1, lo - 1, -1):
            g0, g1, rc, r0, r1, b0, b1 = _unit(u, plan, G, R1, B)
            for g in range(g0, g1):
                _col_dx(dy, x, dx, g, r0, r1, b0 * r2, b1 * r2, r2, mean, rstd, w, bias, _ACT, c1, c2)


@njit(**_HELPER)
def _blend(rp, sp, n, q, val, acc, keep, take):
    """``running = keep * running + take * mean_q(per_q)`` per channel, in float64, then rounded to the
    buffer's dtype (bfloat16 buffers arrive as their bits), for the buffer at ``rp`` from the statistics
    ``per_q`` (q, n) at ``sp``."""
    running = _at(rp, (n,), val)
    per_q = _at(sp, (q, n), acc)
    for c in range(n):
        s = 0.0
        for i in range(q):
            s += per_q[i, c]
        _store(running, c, keep * _load(running[c]) + take * (s / q))


@njit(cache=True, nogil=True, error_model="numpy")
def running_update(mp, vp, smp, svp, n, q, val, acc, keep, take_mean, take_var):
    """The running-statistics update of ``n`` channels (a few hundred, serial): the running mean at
    ``mp`` from the batch means at ``smp``, the running variance at ``vp`` from the variances at ``svp``
    (``take_var`` carries the Bessel factor); address 0: no such buffer. Both in one call, as each call
    from Python costs microseconds."""
    if mp:
        _blend(mp, smp, n, q, val, acc, keep, take_mean)
    if vp:
        _blend(vp, svp, n, q, val, acc, keep, take_var)


@njit(**_HELPER)
def _rstd(stat, eps, from_var):
    """The statistic itself, or with ``from_var`` 1/sqrt(stat + eps) of a variance."""
    if not from_var:
        return stat
    r = _zeros(stat.shape, stat[0, 0])
    for g in range(stat.shape[0]):
        for b in range(stat.shape[1]):
            r[g, b] = 1.0 / np.sqrt(stat[g, b] + eps)
    return r


@njit(**_HELPER)
def _lane_sum(lanes, grads):
    """``out_i[j] = sum over lanes l and k < F of lanes[i, l, j * F + k]`` for ``out_0, out_1 = grads``
    (dweight, dbias) taken flat, ``F`` the partials per output (1, or a group's columns in the column
    loops): dweight and dbias from the backward's per-lane float64 partials, rounded once to their
    dtype."""
    n_lanes, n = lanes.shape[1], lanes.shape[2]
    dw, db = grads[0].reshape(grads[0].size), grads[1].reshape(grads[1].size)
    m = dw.shape[0]
    f = n // m
    for i in range(2):
        out = dw if i == 0 else db
        for j in range(m):
            s = 0.0
            for k in range(j * f, j * f + f):
                t = 0.0
                for lane in range(n_lanes):
                    t += lanes[i, lane, k]
                s += t
            out[j] = s


_ACT = None  # the activation a driver is compiled for: each compilation sees its own (``_variant``)


def _variant(fn, suffix: str, act: int | None):
    """A copy of ``fn`` under another name (so the on-disk cache keeps compilations apart) that sees
    ``_ACT = act``: numba freezes globals, and the activation helpers take it as a literal."""
    scope = dict(fn.__globals__, _ACT=act)
    copy = pytypes.FunctionType(fn.__code__, scope, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    return copy


def _compile(fn, activation: str | None):
    """(parallel, serial) dispatchers of one driver and activation; compiled lazily on first call,
    cached on disk."""
    act = None if activation is None else ACTIVATION_CODES[activation]
    suffix = "" if activation is None else "_" + activation
    par = njit(parallel=True, **_DRIVER)(_variant(fn, suffix, act))
    ser = njit(parallel=False, **_DRIVER)(_variant(fn, suffix + "_serial", act))
    return par, ser


# name -> activation (None or a key of ACTIVATION_CODES) -> (parallel, serial)
DRIVERS = {
    fn.__name__: {a: _compile(fn, a) for a in (None, *ACTIVATION_CODES)}
    for fn in (forward_seg, forward_col, apply_seg, apply_col, backward_seg, backward_col)
}
