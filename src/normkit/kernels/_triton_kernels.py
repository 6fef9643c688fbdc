"""Triton kernels on the 5-D normalization view ``(Q, P, R1, B, R2)`` (see ``contract``).

A program works on tiles of ``BB`` neighbouring groups ``b`` by a ``(BR1, BR2)`` window of their
reduced axes; the reduced axes of one group are walked as ``NT = NT1 * NT2`` tiles, tile ``t``
covering rows ``t // NT2`` and columns ``t % NT2``. With ``FUSED`` the whole group is one tile and a
program reads it once. With ``FLAT`` (``BR2 == R2``, several groups side by side, as in channels-last
GroupNorm) a tile row is one contiguous run of ``BB * BR2`` elements: it is loaded and stored as a 2-D
block, so the accesses vectorize, and reshaped to ``(BR1, BB, BR2)`` for the arithmetic.

Statistics are float32 and overflow-free. A group that fits one tile is reduced in two passes over
registers: its mean accumulated in float64 (exact for a constant float32 group, whose deviations are
then exactly zero), then the squared deviations held as ``scale**2 * ssq`` with ``scale`` the
largest deviation, so inputs near 1e30 do not overflow. A streamed group is summed in float64 as
deviations from its first element (the CPU backend's scheme): every element slot of a tile keeps
its own sums, reduced once per program and added across programs by the finalize kernel.

``ACT`` selects a fused activation epilogue applied to ``weight * xhat + bias``: 0 none, 1 ReLU,
2 SiLU, 3 GELU (erf); the backward kernels recompute its input to apply the derivative.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {None: 0, "relu": 1, "silu": 2, "gelu": 3}
_HUGE = tl.constexpr(1.0e38)


@triton.jit
def _tile(
    qp, bb, t, R1, B, R2, NT2, BR1: tl.constexpr, BB: tl.constexpr, BR2: tl.constexpr, FLAT: tl.constexpr
):
    """Tile ``t`` of groups ``(qp, bb*BB + i)``: memory offsets and mask (2-D with ``FLAT``), the
    ``(BR1, BB, BR2)`` validity mask and coordinates, and the valid count per group."""
    t1 = t // NT2
    t2 = t % NT2
    r1 = (t1 * BR1 + tl.arange(0, BR1))[:, None, None]
    b = (bb * BB + tl.arange(0, BB))[None, :, None]
    r2 = (t2 * BR2 + tl.arange(0, BR2))[None, None, :]
    valid = (r1 < R1) & (b < B) & (r2 < R2)
    base = qp.to(tl.int64) * R1 * B * R2  # offsets in int64: one sample or row may pass 2**31 elements
    if FLAT:
        rows = (t1 * BR1 + tl.arange(0, BR1))[:, None]
        cols = ((bb * BB).to(tl.int64) * BR2 + tl.arange(0, BB * BR2))[None, :]
        row = tl.cast(B, tl.int64) * R2
        offs = base + rows.to(tl.int64) * row + cols
        mask = (rows < R1) & (cols < row)
    else:
        offs = base + (r1.to(tl.int64) * B + b) * R2 + r2
        mask = valid
    count = tl.minimum(R1 - t1 * BR1, BR1) * tl.minimum(R2 - t2 * BR2, BR2) * 1.0
    return offs, mask, valid, r1, b, r2, count


@triton.jit
def _load_tile(ptr, offs, mask, BR1: tl.constexpr, BB: tl.constexpr, BR2: tl.constexpr, FLAT: tl.constexpr):
    """A tile of ``ptr`` as float32 ``(BR1, BB, BR2)``, zero outside the tensor."""
    v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FLAT:
        v = tl.reshape(v, (BR1, BB, BR2))
    return v


@triton.jit
def _store_tile(ptr, offs, mask, v, BR1: tl.constexpr, BB: tl.constexpr, BR2: tl.constexpr, FLAT: tl.constexpr):
    if FLAT:
        v = tl.reshape(v, (BR1, BB * BR2))
    tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _param_index(p, r1, b, r2, R1, B, R2, SPAN_R1: tl.constexpr, SPAN_R2: tl.constexpr):
    """Offsets into the (P, K1, B, K2) parameters; shaped to broadcast against the tile."""
    if SPAN_R1:
        off = (p * R1 + r1) * B + b
        mask = (r1 < R1) & (b < B)
    else:
        off = p * B + b
        mask = b < B
    if SPAN_R2:
        off = off * R2 + r2
        mask = mask & (r2 < R2)
    return off, mask


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _activate_grad(z, ACT: tl.constexpr):
    """d activation / dz at z (ACT != 0)."""
    if ACT == 1:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        d = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return d


@triton.jit
def _affine(xhat, w, bias, woff, wmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    z = xhat
    if HAS_W:
        z = z * tl.load(w + woff, mask=wmask, other=0.0).to(tl.float32)
    if HAS_B:
        z = z + tl.load(bias + woff, mask=wmask, other=0.0).to(tl.float32)
    return z


@triton.jit
def _moments(xt, mask, count, BB: tl.constexpr, RMS: tl.constexpr):
    """(float64 mean, scale, ssq) of a tile per group; deviations are ``scale * sqrt(ssq)``."""
    if RMS:
        m = tl.zeros((BB,), tl.float64)
    else:
        m = tl.sum(tl.sum(xt.to(tl.float64), axis=2), axis=0) / count
    c = tl.where(mask, xt - m.to(tl.float32)[None, :, None], 0.0)
    s = tl.max(tl.max(tl.abs(c), axis=2), axis=0)
    sb = s[None, :, None]
    # c / s, not c * (1 / s), which overflows for a subnormal s; the largest deviations are exactly +-1,
    # also where s is Inf (an RMS group holding Inf: its variance is Inf, not Inf / Inf = NaN)
    c = tl.where((tl.abs(c) == sb) & (sb > 0.0), tl.where(c < 0.0, -1.0, 1.0), c / tl.where(sb > 0.0, sb, 1.0))
    return m, s, tl.sum(tl.sum(c * c, axis=2), axis=0)


@triton.jit
def _finish(n, m, s, q, eps):
    """(mean, rstd, var) in float32; rstd comes from the standard deviation when the variance overflows,
    and is NaN where the variance is (a group holding NaN or Inf: its output is NaN)."""
    r = q / tl.maximum(n, 1.0)
    var = s * (s * r)
    std = s * tl.sqrt(r)
    rstd = tl.where(var < _HUGE, 1.0 / tl.sqrt(var + eps), 1.0 / tl.where(std > 0.0, std, 1.0))
    rstd = tl.where(var == var, rstd, var)
    return m.to(tl.float32), rstd, var


@triton.jit
def _fwd_kernel(
    x, y, w, bias, mean, rstd, var, eps,
    P, R1, B, R2, NB, NT2, NT, TPC,
    BR1: tl.constexpr, BB: tl.constexpr, BR2: tl.constexpr, FLAT: tl.constexpr,
    FUSED: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    SPAN_R1: tl.constexpr, SPAN_R2: tl.constexpr, ACT: tl.constexpr,
):
    """y = act(weight * (x - mean) * rstd + bias). FUSED: one tile per group, statistics computed
    here and stored; otherwise the given statistics are applied to tiles ``[TPC*pid1, ...)``."""
    pid = tl.program_id(0)
    qp = pid // NB
    bb = pid % NB
    p = qp % P
    bv = bb * BB + tl.arange(0, BB)
    bmask = bv < B
    g = qp.to(tl.int64) * B + bv
    if FUSED:
        offs, mask, valid, r1, b, r2, count = _tile(qp, bb, 0, R1, B, R2, NT2, BR1, BB, BR2, FLAT)
        xt = _load_tile(x, offs, mask, BR1, BB, BR2, FLAT)
        m, s, q = _moments(xt, valid, count, BB, RMS)
        mu, rs, vr = _finish(count, m, s, q, eps)
        tl.store(mean + g, mu, mask=bmask)
        tl.store(rstd + g, rs, mask=bmask)
        tl.store(var + g, vr, mask=bmask)
        woff, wmask = _param_index(p, r1, b, r2, R1, B, R2, SPAN_R1, SPAN_R2)
        xhat = (xt - mu[None, :, None]) * rs[None, :, None]
        z = _activate(_affine(xhat, w, bias, woff, wmask, HAS_W, HAS_B), ACT)
        _store_tile(y, offs, mask, z, BR1, BB, BR2, FLAT)
    else:
        mu = tl.load(mean + g, mask=bmask, other=0.0).to(tl.float32)[None, :, None]
        rs = tl.load(rstd + g, mask=bmask, other=0.0).to(tl.float32)[None, :, None]
        start = tl.program_id(1) * TPC
        for t in range(start, tl.minimum(start + TPC, NT)):
            offs, mask, valid, r1, b, r2, count = _tile(qp, bb, t, R1, B, R2, NT2, BR1, BB, BR2, FLAT)
            xt = _load_tile(x, offs, mask, BR1, BB, BR2, FLAT)
            woff, wmask = _param_index(p, r1, b, r2, R1, B, R2, SPAN_R1, SPAN_R2)
            z = _activate(_affine((xt - mu) * rs, w, bias, woff, wmask, HAS_W, HAS_B), ACT)
            _store_tile(y, offs, mask, z, BR1, BB, BR2, FLAT)


@triton.jit
def _shift(x, g, R1, B, R2, mask, RMS: tl.constexpr):
    """Float64 first element of groups ``g`` (zero for RMS statistics): the shift of their sums."""
    if RMS:
        return tl.zeros(g.shape, tl.float64)
    first = (g // B) * R1 * B * R2 + (g % B) * R2
    return tl.load(x + first, mask=mask, other=0.0).to(tl.float64)


@triton.jit
def _stats_partial_kernel(
    x, part, R1, B, R2, NB, NT2, NT, TPC, G,
    BR1: tl.constexpr, BB: tl.constexpr, BR2: tl.constexpr, FLAT: tl.constexpr, RMS: tl.constexpr,
):
    """Per-group float64 sums of ``d = x - shift`` and ``d * d`` over tiles ``[TPC*pid1, ...)``:
    part[2, SPLIT, G]. Each element slot accumulates on its own and the tile is reduced once at the
    end, so the loop holds no cross-thread reduction."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    qp = pid // NB
    bb = pid % NB
    bv = bb * BB + tl.arange(0, BB)
    bmask = bv < B
    g = qp.to(tl.int64) * B + bv
    shift = _shift(x, g, R1, B, R2, bmask, RMS)[None, :, None]
    acc_s = tl.zeros((BR1, BB, BR2), tl.float64)
    acc_q = tl.zeros((BR1, BB, BR2), tl.float64)
    start = split * TPC
    for t in range(start, tl.minimum(start + TPC, NT)):
        offs, mask, valid, r1, b, r2, count = _tile(qp, bb, t, R1, B, R2, NT2, BR1, BB, BR2, FLAT)
        xt = _load_tile(x, offs, mask, BR1, BB, BR2, FLAT)
        d = tl.where(valid, xt.to(tl.float64) - shift, 0.0)
        acc_s += d
        acc_q += d * d
    at = part + split.to(tl.int64) * G + g
    tl.store(at, tl.sum(tl.sum(acc_s, axis=2), axis=0), mask=bmask)
    tl.store(at + tl.num_programs(1).to(tl.int64) * G, tl.sum(tl.sum(acc_q, axis=2), axis=0), mask=bmask)


@triton.jit
def _stats_finalize_kernel(
    x, part, mean, rstd, var, eps, R1, B, R2, G, SPLIT, BS: tl.constexpr, BG: tl.constexpr, RMS: tl.constexpr,
):
    """Add the SPLIT partial sums of BG groups and store mean, rstd and var (computed in float64).

    The shift is an element of its group, so ``|mean - shift| <= std * sqrt(n)``: the subtraction
    ``E[d*d] - E[d]**2`` loses at most ``log10(n)`` of float64's 16 digits, and a constant group
    gives exactly zero variance and its value as mean."""
    gv = tl.program_id(0).to(tl.int64) * BG + tl.arange(0, BG)
    gmask = gv < G
    sv = tl.arange(0, BS)
    mask = (sv[:, None] < SPLIT) & gmask[None, :]
    at = part + sv[:, None] * G + gv[None, :]
    n = tl.cast(R1, tl.float64) * R2  # R1 * R2 in int32 wraps from 2**31 elements a group
    m = tl.sum(tl.load(at, mask=mask, other=0.0), axis=0) / n
    v = tl.sum(tl.load(at + SPLIT * G, mask=mask, other=0.0), axis=0) / n
    mu = _shift(x, gv, R1, B, R2, gmask, RMS)
    if not RMS:
        v = v - m * m
        v = tl.where(v < 0.0, 0.0, v)
        mu = mu + m
    tl.store(mean + gv, mu.to(tl.float32), mask=gmask)
    tl.store(rstd + gv, (1.0 / tl.sqrt(v + eps)).to(tl.float32), mask=gmask)
    tl.store(var + gv, v.to(tl.float32), mask=gmask)


@triton.jit
def _grad_tile(
    x, dy, w, bias, offs, mask, valid, woff, wmask, mu, rs,
    BR1: tl.constexpr, BB: tl.constexpr, BR2: tl.constexpr, FLAT: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
):
    """(xhat, dy through the activation, g = dy * weight) for one tile."""
    xt = _load_tile(x, offs, mask, BR1, BB, BR2, FLAT)
    dyt = _load_tile(dy, offs, mask, BR1, BB, BR2, FLAT)
    xhat = tl.where(valid, (xt - mu) * rs, 0.0)
    if ACT != 0:
        dyt = dyt * _activate_grad(_affine(xhat, w, bias, woff, wmask, HAS_W, HAS_B), ACT)
    g = dyt
    if HAS_W:
        g = dyt * tl.load(w + woff, mask=wmask, other=0.0).to(tl.float32)
    return xhat, dyt, g


@triton.jit
def _bwd_sums_kernel(
    x, dy, w, bias, mean, rstd, part, P, R1, B, R2, NB, NT2, NT, TPC, G,
    BR1: tl.constexpr, BB: tl.constexpr, BR2: tl.constexpr, FLAT: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPAN_R1: tl.constexpr, SPAN_R2: tl.constexpr,
    ACT: tl.constexpr,
):
    """Per-group partial sums of g and g * xhat over tiles ``[TPC*pid1, ...)``: part[2, G, SPLIT] (the
    split innermost, so the caller's sum over it reads contiguous rows). Like the statistics, every
    element slot accumulates on its own and the tile is reduced once at the end."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    qp = pid // NB
    bb = pid % NB
    p = qp % P
    bv = bb * BB + tl.arange(0, BB)
    bmask = bv < B
    g_idx = qp.to(tl.int64) * B + bv
    mu = tl.load(mean + g_idx, mask=bmask, other=0.0).to(tl.float32)[None, :, None]
    rs = tl.load(rstd + g_idx, mask=bmask, other=0.0).to(tl.float32)[None, :, None]
    acc_g = tl.zeros((BR1, BB, BR2), tl.float32)
    acc_gx = tl.zeros((BR1, BB, BR2), tl.float32)
    start = split * TPC
    for t in range(start, tl.minimum(start + TPC, NT)):
        offs, mask, valid, r1, b, r2, count = _tile(qp, bb, t, R1, B, R2, NT2, BR1, BB, BR2, FLAT)
        woff, wmask = _param_index(p, r1, b, r2, R1, B, R2, SPAN_R1, SPAN_R2)
        xhat, dyt, g = _grad_tile(
            x, dy, w, bias, offs, mask, valid, woff, wmask, mu, rs, BR1, BB, BR2, FLAT, HAS_W, HAS_B, ACT
        )
        acc_g += g
        acc_gx += g * xhat
    splits = tl.num_programs(1).to(tl.int64)
    at = part + g_idx * splits + split
    tl.store(at, tl.sum(tl.sum(acc_g, axis=2), axis=0), mask=bmask)
    tl.store(at + G * splits, tl.sum(tl.sum(acc_gx, axis=2), axis=0), mask=bmask)


@triton.jit
def _param_partials(
    dw_part, db_part, acc_w, acc_b, p, t1, t2, bv, slot, slots, R1, B, R2,
    BR1: tl.constexpr, BR2: tl.constexpr, SPAN_R1: tl.constexpr, SPAN_R2: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
):
    """Store accumulated dweight/dbias terms, reduced over the axes the parameters do not span, as
    column ``slot`` of ``part[P * K1 * B * K2, slots]``."""
    if not SPAN_R1:
        acc_w = tl.expand_dims(tl.sum(acc_w, axis=0), 0)
        acc_b = tl.expand_dims(tl.sum(acc_b, axis=0), 0)
    if not SPAN_R2:
        acc_w = tl.expand_dims(tl.sum(acc_w, axis=2), 2)
        acc_b = tl.expand_dims(tl.sum(acc_b, axis=2), 2)
    r1 = (t1 * BR1 + tl.arange(0, BR1))[:, None, None]
    b = bv[None, :, None]
    r2 = (t2 * BR2 + tl.arange(0, BR2))[None, None, :]
    woff, wmask = _param_index(p, r1, b, r2, R1, B, R2, SPAN_R1, SPAN_R2)
    at = woff.to(tl.int64) * slots + slot
    if NEED_DW:
        tl.store(dw_part + at, acc_w, mask=wmask)
    if NEED_DB:
        tl.store(db_part + at, acc_b, mask=wmask)


@triton.jit
def _bwd_kernel(
    x, dy, dx, w, bias, mean, rstd, sums, dw_part, db_part,
    Q, P, R1, B, R2, NB, NT2, NT1, TPC, G, NS,
    BR1: tl.constexpr, BB: tl.constexpr, BR2: tl.constexpr, FLAT: tl.constexpr,
    FUSED: tl.constexpr, BATCH_STATS: tl.constexpr, RMS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPAN_R1: tl.constexpr, SPAN_R2: tl.constexpr,
    ACT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
):
    """dx for groups q = pid2, pid2 + QS, ... and their per-program partial dweight/dbias.

    Grid (chunks * NT2, P * NB, QS), the long axis first (CUDA's second and third stop at 65,535): a
    program walks tile rows ``[TPC*chunk, ...)`` of tile column ``t2 = pid0 % NT2``, accumulating dy * xhat and dy over its groups. Parameters that do not vary
    along r1 take one reduction per program at the end; parameters along r1 are stored tile by tile.
    Each goes to its own slot of ``part[P * K1 * B * K2, NS * QS]`` (the slots innermost, so the
    caller's sum over them reads contiguous rows): one per chunk unless the parameters span r1, one
    per tile column unless they span r2, one per ``pid2``. FUSED: the tile is the whole
    group and the batch-statistics sums are computed here; otherwise ``sums[2, G]`` holds them.
    """
    pid = tl.program_id(1)
    pq = tl.program_id(2)
    p = pid // NB
    bb = pid % NB
    bv = bb * BB + tl.arange(0, BB)
    bmask = bv < B
    inv_n = 1.0 / (tl.cast(R1, tl.float32) * R2)
    t2 = tl.program_id(0) % NT2
    chunk = tl.program_id(0) // NT2
    start = chunk * TPC
    slot = chunk * 0
    if not SPAN_R1:
        slot = chunk
    if not SPAN_R2:
        slot = slot * NT2 + t2
    slot = slot * tl.num_programs(2) + pq
    slots = NS * tl.num_programs(2)
    acc_w = tl.zeros((BR1, BB, BR2), tl.float32)
    acc_b = tl.zeros((BR1, BB, BR2), tl.float32)
    for t1 in range(start, tl.minimum(start + TPC, NT1)):
        for qi in range(pq, Q, tl.num_programs(2)):
            qp = qi * P + p
            offs, mask, valid, r1, b, r2, count = _tile(qp, bb, t1 * NT2 + t2, R1, B, R2, NT2, BR1, BB, BR2, FLAT)
            woff, wmask = _param_index(p, r1, b, r2, R1, B, R2, SPAN_R1, SPAN_R2)
            g_idx = qp.to(tl.int64) * B + bv
            mu = tl.load(mean + g_idx, mask=bmask, other=0.0).to(tl.float32)[None, :, None]
            rs = tl.load(rstd + g_idx, mask=bmask, other=0.0).to(tl.float32)[None, :, None]
            xhat, dyt, g = _grad_tile(
                x, dy, w, bias, offs, mask, valid, woff, wmask, mu, rs, BR1, BB, BR2, FLAT, HAS_W, HAS_B, ACT
            )
            if NEED_DX:
                if BATCH_STATS:
                    if FUSED:
                        sum_g = tl.sum(tl.sum(g, axis=2), axis=0)
                        sum_gx = tl.sum(tl.sum(g * xhat, axis=2), axis=0)
                    else:
                        sum_g = tl.load(sums + g_idx, mask=bmask, other=0.0)
                        sum_gx = tl.load(sums + G + g_idx, mask=bmask, other=0.0)
                    proj = (sum_gx * inv_n)[None, :, None]
                    if RMS:
                        centred = g
                    else:
                        centred = g - (sum_g * inv_n)[None, :, None]
                    dxt = (centred - xhat * proj) * rs
                else:
                    dxt = g * rs
                _store_tile(dx, offs, mask, dxt, BR1, BB, BR2, FLAT)
            if NEED_DW:
                acc_w += dyt * xhat
            if NEED_DB:
                acc_b += dyt
        if SPAN_R1:
            _param_partials(
                dw_part, db_part, acc_w, acc_b, p, t1, t2, bv, slot, slots, R1, B, R2,
                BR1, BR2, SPAN_R1, SPAN_R2, NEED_DW, NEED_DB,
            )
            acc_w = tl.zeros((BR1, BB, BR2), tl.float32)
            acc_b = tl.zeros((BR1, BB, BR2), tl.float32)
    if not SPAN_R1:
        _param_partials(
            dw_part, db_part, acc_w, acc_b, p, start, t2, bv, slot, slots, R1, B, R2,
            BR1, BR2, SPAN_R1, SPAN_R2, NEED_DW, NEED_DB,
        )
