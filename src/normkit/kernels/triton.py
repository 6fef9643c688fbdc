"""Triton backend: one set of kernels for every norm, on the contract's 5-D view.

Serves float32/bfloat16/float16 CUDA tensors (float32 statistics, output in the input dtype); other
cases fall back to the reference backend. Under ``TRITON_INTERPRET=1`` (set before Triton is
imported) the same kernels run on CPU tensors through Triton's interpreter, which is how the test
suite checks them without a GPU.

Forward: a group that fits one tile is normalized by one program in one read (statistics stored on
the way); a larger group gets split partial statistics, a merge kernel and an apply kernel.
Backward: per-group sums of ``g`` and ``g * xhat`` (in the same program when the group fits one
tile), then one kernel writes dx and per-program partial dweight/dbias, summed afterwards.

Every kernel also takes an optional fused activation (``activation="relu" | "silu" | "gelu"``)
applied after the affine transform; its backward needs the bias to recompute the activation input.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor

from . import _triton_kernels as kern
from ._triton_plan import MAX_FUSED, MAX_TILE, Tile, cdiv, choose_tile, finalize_blocks, split, warps_for
from .contract import (
    ACTIVATIONS, Grads, Stats, check_activation, given_rstd, grad_shape, laid_like, stat_shape, update_running, view5,
    view_param,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_PROGRAMS = 4

Launcher = Callable[[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any], int], None]


def interpreted() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and type(kern._fwd_kernel).__name__ == "InterpretedFunction"


def launch(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], constexprs: dict[str, Any], num_warps: int) -> None:
    """Run one kernel (the default launcher; tests substitute one that records instead)."""
    kernel[grid](*args, **constexprs, num_warps=num_warps)


@cache
def _cuda_programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def _activation_code(activation: str | None) -> int:
    check_activation(activation)
    return kern.ACTIVATIONS[activation]


def _param(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _spans(*params: Tensor | None) -> tuple[bool, bool]:
    """Whether the (P, K1, B, K2) parameters vary along r1 and along r2."""
    for t in params:
        if t is not None:
            return t.shape[1] != 1, t.shape[3] != 1
    return False, False


class TritonBackend:
    name = "triton"
    activations: tuple[str, ...] = ACTIVATIONS
    update_running = staticmethod(update_running)  # a few hundred elements: torch's kernels serve

    def __init__(
        self,
        *,
        max_tile: int = MAX_TILE,
        max_fused: int = MAX_FUSED,
        programs: int | None = None,
        launcher: Launcher = launch,
    ) -> None:
        """``programs``: how many programs a launch aims for (default: 4 per SM on CUDA)."""
        self.max_tile, self.max_fused = max_tile, max_fused
        self.programs, self.launcher = programs, launcher

    def supports(self, x5: Tensor, weight: Tensor | None) -> bool:
        if x5.dtype not in DTYPES or x5.numel() == 0:
            return False
        if weight is not None and weight.dtype not in DTYPES:
            return False
        if x5.device.type == "cuda":
            return True
        return x5.device.type == "cpu" and interpreted()

    def tile(self, x5: Tensor) -> Tile:
        _, _, r1, b, r2 = x5.shape
        return choose_tile(r1, b, r2, self.max_tile, self.max_fused)

    def _target(self, x: Tensor) -> int:
        if self.programs is not None:
            return self.programs
        return _cuda_programs(x.device.index or 0) if x.device.type == "cuda" else CPU_PROGRAMS

    def _run(self, kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], constexprs: dict[str, Any], warps: int) -> None:
        self.launcher(kernel, grid, args, constexprs, warps)

    def forward(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        rms: bool,
        activation: str | None = None,
        *,
        shape: Sequence[int] | None = None,
        param_shape: Sequence[int] | None = None,
    ) -> tuple[Tensor, Stats]:
        x5, weight, bias = view5(x, shape), view_param(weight, param_shape), view_param(bias, param_shape)
        q, p, r1, b, r2 = x5.shape
        tile = self.tile(x5)
        y = torch.empty_like(x)  # the kernels index it as x5: x's layout, same order
        mean, rstd, var = (x5.new_empty((q, p, b), dtype=torch.float32) for _ in range(3))
        with _device(x5):
            if tile.fused:
                self._apply(x5, y, weight, bias, mean, rstd, var, float(eps), tile, True, rms, activation)
            else:
                self._stats(x5, mean, rstd, var, float(eps), tile, rms)
                self._apply(x5, y, weight, bias, mean, rstd, var, float(eps), tile, False, rms, activation)
        return y, Stats(mean, rstd, var)

    def normalize(
        self,
        x: Tensor,
        mean: Tensor,
        rstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        activation: str | None = None,
        var_eps: float | None = None,
        *,
        shape: Sequence[int] | None = None,
        param_shape: Sequence[int] | None = None,
    ) -> Tensor:
        x5, weight, bias = view5(x, shape), view_param(weight, param_shape), view_param(bias, param_shape)
        y = torch.empty_like(x)  # the kernels index it as x5: x's layout, same order
        mean, rstd = mean.contiguous(), given_rstd(stat_shape(x5), rstd, var_eps).contiguous()
        with _device(x5):
            self._apply(x5, y, weight, bias, mean, rstd, mean, 0.0, self.tile(x5), False, False, activation)
        return y

    def _stats(self, x5: Tensor, mean: Tensor, rstd: Tensor, var: Tensor, eps: float, tile: Tile, rms: bool) -> None:
        q, p, r1, b, r2 = x5.shape
        nb, nt2 = cdiv(b, tile.bb), cdiv(r2, tile.br2)
        nt, groups, n_stats = cdiv(r1, tile.br1) * nt2, q * p * cdiv(b, tile.bb), q * p * b
        sp = split(nt, groups, self._target(x5))
        part = x5.new_empty((2, sp.programs, n_stats), dtype=torch.float64)
        blocks = dict(BR1=tile.br1, BB=tile.bb, BR2=tile.br2, FLAT=tile.flat)
        self._run(
            kern._stats_partial_kernel, (groups, sp.programs),
            (x5, part, r1, b, r2, nb, nt2, nt, sp.per_program, n_stats),
            dict(blocks, RMS=rms), tile.num_warps,
        )
        bs, bg = finalize_blocks(sp.programs)
        self._run(
            kern._stats_finalize_kernel, (cdiv(n_stats, bg),),
            (x5, part, mean, rstd, var, eps, r1, b, r2, n_stats, sp.programs),
            dict(BS=bs, BG=bg, RMS=rms), warps_for(bs * bg),
        )

    def _apply(
        self,
        x5: Tensor,
        y: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        rstd: Tensor,
        var: Tensor,
        eps: float,
        tile: Tile,
        fused: bool,
        rms: bool,
        activation: str | None,
    ) -> None:
        q, p, r1, b, r2 = x5.shape
        w, bi = _param(weight), _param(bias)
        span_r1, span_r2 = _spans(w, bi)
        nb, nt2 = cdiv(b, tile.bb), cdiv(r2, tile.br2)
        nt, groups = cdiv(r1, tile.br1) * nt2, q * p * nb
        chunks = split(nt, groups, self._target(x5))
        self._run(
            kern._fwd_kernel, (groups, chunks.programs),
            (x5, y, x5 if w is None else w, x5 if bi is None else bi, mean, rstd, var, eps,
             p, r1, b, r2, nb, nt2, nt, chunks.per_program),
            dict(
                BR1=tile.br1, BB=tile.bb, BR2=tile.br2, FLAT=tile.flat, FUSED=fused, RMS=rms, HAS_W=w is not None,
                HAS_B=bi is not None, SPAN_R1=span_r1, SPAN_R2=span_r2, ACT=_activation_code(activation),
            ),
            tile.num_warps,
        )

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
        need_dx, need_dw, need_db = output_mask
        if not any(output_mask):
            return Grads(None, None, None)
        dy5, x5 = view5(laid_like(dy, x), shape), view5(x, shape)
        gshape = grad_shape(weight, param_shape)
        weight, bias = view_param(weight, param_shape), view_param(bias, param_shape)
        q, p, r1, b, r2 = x5.shape
        tile = self.tile(x5)
        w, bi = _param(weight), _param(bias)
        dy5, mean, rstd = dy5.contiguous(), mean.contiguous(), rstd.contiguous()
        act = _activation_code(activation)
        span_r1, span_r2 = param_shape[1] != 1, param_shape[3] != 1
        nb, nt1, nt2 = cdiv(b, tile.bb), cdiv(r1, tile.br1), cdiv(r2, tile.br2)
        nt, n_stats = nt1 * nt2, q * p * b
        target = self._target(x5)
        flags = dict(HAS_W=w is not None, HAS_B=bi is not None, SPAN_R1=span_r1, SPAN_R2=span_r2, ACT=act)
        blocks = dict(BR1=tile.br1, BB=tile.bb, BR2=tile.br2, FLAT=tile.flat)
        wp, bp = (x5 if w is None else w), (x5 if bi is None else bi)
        dx = torch.empty_like(x) if need_dx else None
        sums = mean
        with _device(x5):
            if need_dx and batch_stats and not tile.fused:
                sp = split(nt, q * p * nb, target)
                part = x5.new_empty((2, n_stats, sp.programs), dtype=torch.float32)
                self._run(
                    kern._bwd_sums_kernel, (q * p * nb, sp.programs),
                    (x5, dy5, wp, bp, mean, rstd, part, p, r1, b, r2, nb, nt2, nt, sp.per_program, n_stats),
                    dict(blocks, **flags), tile.num_warps,
                )
                sums = part.sum(2)
            chunks = split(nt1, p * nb * nt2, target)
            qs = min(q, max(1, target // (p * nb * nt2 * chunks.programs)))
            slots = (1 if span_r1 else chunks.programs) * (1 if span_r2 else nt2)
            # dweight and dbias partials share one buffer, so one reduction finishes both.
            parts = x5.new_empty((need_dw + need_db, math.prod(param_shape), qs * slots), dtype=torch.float32)
            dw_part = parts[0] if need_dw else x5
            db_part = parts[-1] if need_db else x5
            self._run(
                kern._bwd_kernel, (chunks.programs * nt2, p * nb, qs),
                (x5, dy5, x5 if dx is None else dx, wp, bp, mean, rstd, sums, dw_part, db_part,
                 q, p, r1, b, r2, nb, nt2, nt1, chunks.per_program, n_stats, slots),
                dict(
                    blocks, **flags, FUSED=tile.fused, BATCH_STATS=batch_stats, RMS=rms,
                    NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
                ),
                tile.num_warps,
            )
        totals = parts.sum(2) if need_dw or need_db else parts
        dw = totals[0].view(gshape) if need_dw else None
        db = totals[-1].view(gshape) if need_db else None
        return Grads(dx, dw, db)


def _device(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
